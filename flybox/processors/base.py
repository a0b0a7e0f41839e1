"""The processor contract and the two kinds of items that flow through a chain.

A *chain* is an ordered list of named steps (DESIGN.md §4)::

    micrograph steps  ──►  extract  ──►  particle steps  ──►  fan-out  ──►  particle steps
    (Micrograph→Micrograph)  (→ParticleStack)  (stack→stack)   (stack→{stream: stack})  (per stream)

Every step is a :class:`Processor` subclass with a pydantic ``Settings`` model, validated when
the chain is built and never halfway through a run. Processors are pure array code: no file
I/O, no asyncio. Built-in steps and plugins are discovered the same way (entry-point group
``flybox.processors``, see :mod:`flybox.plugins.registry`).

Conventions (ALGORITHMS.md §0.2): images are ``(rows=y, cols=x)``, the centre pixel of an axis
of length N is index ``N//2``, and spectra use numpy scaling (unnormalised forward transform).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from flybox.processors.edges import apply_edge_fill, partial_windows
from flybox.processors.fft import irfftn_last, rfftn_last
from flybox.types import CtfParams, ImageStats

if TYPE_CHECKING:  # pandas costs 0.2 s to import; array-only callers (masks) never need it
    import pandas as pd

__all__ = [
    "MAIN_STREAM",
    "Extractor",
    "Micrograph",
    "MicrographProcessor",
    "ParticleProcessor",
    "ParticleStack",
    "Processor",
    "StepKind",
    "StepSettings",
    "StreamSplitter",
    "check_stream_name",
    "scaled_radius",
]

FloatArray = npt.NDArray[np.float32]
StepKind = Literal["micrograph", "extract", "particles", "fanout"]

#: Name of the stream produced by extraction, before any fan-out.
MAIN_STREAM = "particles"


def check_stream_name(stream: str) -> str:
    """``stream`` if it is a valid stream name (lower_snake_case, as DESIGN.md §6 maps it to a
    folder), else ``ValueError``."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", stream):
        raise ValueError(f"stream name {stream!r} must be lower_snake_case")
    return stream


def scaled_radius(radius: float, box: int, extraction_box: int) -> int:
    """A radius given for the extraction box, scaled to a stream of size ``box``.

    RELION's rule (pipeline_jobs.cpp): ``int(R · box / extraction_box)``, truncating.
    """
    return int(radius * box / extraction_box)


@dataclass
class Micrograph:
    """One micrograph with its picks, as micrograph steps and the extractor see it.

    Attributes
    ----------
    image
        ``(ny, nx)`` image. May be a read-only memory map of any supported MRC dtype; steps
        that change pixels return a new float32 array and never write into it.
    pixel_size_a
        Pixel size in Å.
    name
        ``rlnMicrographName`` written into every particle row.
    picks
        One row per pick: ``rlnCoordinateX``/``rlnCoordinateY`` (float, this micrograph's
        pixels, array frame) plus any per-pick columns to carry into the particle rows.
    ctf
        CTF of the micrograph, if known.
    stats
        Micrograph-level figures computed by steps (e.g. ``gini``), reported per micrograph.
    """

    image: npt.NDArray[Any]
    pixel_size_a: float
    name: str
    picks: pd.DataFrame
    ctf: CtfParams | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        ny, nx = self.image.shape
        return int(ny), int(nx)

    _image_cache: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def mean(self) -> float:
        """Mean of the whole micrograph, accumulated in float64 (RELION's ``mic_avg``).

        Computed once per image and shared by the chunks made with :meth:`with_picks`.
        """
        if "mean" not in self._image_cache:
            self._image_cache["mean"] = float(np.mean(self.image, dtype=np.float64))
        return self._image_cache["mean"]

    def with_image(self, image: npt.NDArray[Any]) -> Micrograph:
        """A copy with a new image (and a fresh cached mean), same picks and CTF."""
        return Micrograph(
            image, self.pixel_size_a, self.name, self.picks, self.ctf, dict(self.stats)
        )

    def with_picks(self, picks: pd.DataFrame) -> Micrograph:
        """A copy sharing the image, its cached mean and its stats, with other picks."""
        return replace(self, picks=picks, stats=self.stats, _image_cache=self._image_cache)


@dataclass
class ParticleStack:
    """A batch of square particle images of one stream, plus their future STAR rows.

    The stack holds its images in real space (``images``), as a half spectrum
    (``spectrum``, numpy scaling of :func:`flybox.processors.fft.rfftn_last`), or both when
    they agree. Steps ask for the representation they need with :meth:`real` or
    :meth:`fourier` and hand back a new one with :meth:`set_real` / :meth:`set_fourier`, so
    that consecutive Fourier steps (box-level phase flip, then Fourier crop) share one forward
    FFT.

    Border fill can be *pending* (``pending_fill``): RELION pads boxes that cross the
    micrograph edge with the micrograph mean, applies the box-level phase flip, and only then
    replaces the outside pixels by the nearest inside pixels (ALGORITHMS.md §3). A pending fill
    is applied the first time real-space pixels are requested; ``fourier(before_fill=True)``
    gives the spectrum of the unfilled, mean-padded boxes.

    Attributes
    ----------
    table
        One row per particle (the particle STAR rows, without ``rlnImageName``).
    pixel_size_a
        Pixel size of these images in Å.
    extraction_box
        Box size in micrograph pixels at extraction (radii in settings refer to it).
    stream
        Stream name (``particles``, ``particles_small``, …).
    images
        ``(n, box, box)`` float32, or ``None`` when only the spectrum is current.
    spectrum
        ``(n, box, box//2 + 1)`` complex64, or ``None`` when only the images are current.
    box
        Current image size in pixels.
    sampled_box
        Box size this stream's sampling corresponds to (the Fourier-crop size); differs from
        ``box`` only after a real-space window. ``None`` means ``box``.
    pending_fill
        ``(n, 4)`` int array of valid ``[y0, y1, x0, x1)`` windows (box coordinates) whose
        outside must still be edge-filled, or ``None``.
    ctf
        CTF of the source micrograph, if known.
    image_stats
        Statistics of the current pixels when the step that made them computed them (the
        stack writer then needs no pass of its own); cleared whenever the pixels change.
    outside_value
        Gives the value that pixels outside the micrograph hold until a pending fill is
        applied (RELION's ``mic_avg``); called only when a step asks for the unfilled boxes,
        so the micrograph mean is computed only when it matters.
    """

    table: pd.DataFrame
    pixel_size_a: float
    extraction_box: int
    box: int
    stream: str = MAIN_STREAM
    images: FloatArray | None = None
    spectrum: npt.NDArray[np.complex64] | None = None
    pending_fill: npt.NDArray[np.int64] | None = None
    ctf: CtfParams | None = None
    sampled_box: int | None = None
    outside_value: Callable[[], float] | None = field(default=None, repr=False)
    image_stats: ImageStats | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images is None and self.spectrum is None:
            raise ValueError("a ParticleStack needs images or a spectrum")
        if self.sampled_box is None:
            self.sampled_box = self.box

    def __len__(self) -> int:
        return len(self.table)

    def scale_radius(self, radius: float) -> int:
        """A radius given for the extraction box, scaled to this stream (RELION's rule)."""
        assert self.sampled_box is not None
        return scaled_radius(radius, self.sampled_box, self.extraction_box)

    def real(self) -> FloatArray:
        """Real-space images, with any pending border fill applied first."""
        if self.images is None:
            assert self.spectrum is not None
            self.images = np.ascontiguousarray(
                irfftn_last(self.spectrum, (self.box, self.box)), dtype=np.float32
            )
        if self.pending_fill is not None:
            # Only boxes that cross the micrograph edge change; the spectra of the others
            # stay valid, so a later Fourier step does not transform them again.
            partial = partial_windows(self.pending_fill, self.box)
            if partial.size:
                filled = apply_edge_fill(self.images[partial], self.pending_fill[partial])
                self.images[partial] = filled
                self.image_stats = None
                if self.spectrum is not None:
                    self.spectrum[partial] = rfftn_last(filled)
            self.pending_fill = None
        return self.images

    def fourier(self, *, before_fill: bool = False) -> npt.NDArray[np.complex64]:
        """Half spectra of the images (numpy scaling).

        Parameters
        ----------
        before_fill
            Give the spectrum of the boxes *before* a pending border fill (RELION's
            box-level phase flip works on the mean-padded box). The fill stays pending.
        """
        if self.pending_fill is not None and not before_fill:
            self.real()
        if self.pending_fill is not None and self.spectrum is None and self.outside_value:
            self._pad_outside(self.outside_value())
        if self.spectrum is None:
            assert self.images is not None
            self.spectrum = rfftn_last(self.images).astype(np.complex64, copy=False)
        return self.spectrum

    def _pad_outside(self, value: float) -> None:
        assert self.images is not None
        assert self.pending_fill is not None
        for k in partial_windows(self.pending_fill, self.box):
            y0, y1, x0, x1 = (int(v) for v in self.pending_fill[k])
            inside = self.images[k, y0:y1, x0:x1].copy()
            self.images[k] = value
            self.images[k, y0:y1, x0:x1] = inside
        self.outside_value = None

    def set_real(self, images: FloatArray, stats: ImageStats | None = None) -> ParticleStack:
        """Replace the pixels (the spectrum becomes stale). Returns ``self``.

        ``stats`` are the statistics of ``images`` when the caller has them for free.
        """
        if images.shape[1:] != (self.box, self.box) or images.shape[0] != len(self.table):
            raise ValueError(f"images of shape {images.shape} do not fit this stack")
        self.images = images
        self.spectrum = None
        self.image_stats = stats
        return self

    def set_fourier(self, spectrum: npt.NDArray[np.complex64]) -> ParticleStack:
        """Replace the spectrum (the pixels become stale). Returns ``self``.

        A pending border fill stays pending and is applied after the inverse transform.
        """
        self.spectrum = spectrum
        self.images = None
        self.image_stats = None
        return self

    def derive(
        self,
        *,
        stream: str,
        box: int,
        pixel_size_a: float,
        images: FloatArray | None = None,
        spectrum: npt.NDArray[np.complex64] | None = None,
        sampled_box: int | None = None,
    ) -> ParticleStack:
        """A new stack for another stream (fan-out) or size (window), with a copy of the table."""
        return ParticleStack(
            table=self.table.copy(),
            pixel_size_a=pixel_size_a,
            extraction_box=self.extraction_box,
            box=box,
            stream=stream,
            images=images,
            spectrum=spectrum,
            pending_fill=None,
            ctf=self.ctf,
            sampled_box=sampled_box,
        )


class StepSettings(BaseModel):
    """Base of every step's settings model: strict (unknown keys are errors) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SettingsT = TypeVar("SettingsT", bound=StepSettings)


class Processor(abc.ABC, Generic[SettingsT]):
    """A named processing step, configured once and then applied to many items.

    Subclasses set ``name`` (the ``step`` key in the configuration), ``kind`` and
    ``Settings``, and implement ``apply``. Expensive per-shape setup (masks, CTF grids) is
    cached inside the instance, keyed by shape, so that it is done once per stream.

    Class attributes
    ----------------
    name
        Step name used in configuration files, e.g. ``"normalize"``.
    kind
        Which items the step maps (see the module docstring).
    Settings
        pydantic model of the step's settings.
    requires_ctf
        True when the step cannot run without the micrograph's CTF (the service waits for it).
    """

    name: ClassVar[str]
    kind: ClassVar[StepKind]
    Settings: ClassVar[type[StepSettings]]
    requires_ctf: ClassVar[bool] = False

    def __init__(self, settings: SettingsT) -> None:
        self.settings = settings

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Processor[Any]:
        """Validate ``values`` (without the ``step`` key) and build the step."""
        settings: Any = cls.Settings.model_validate(dict(values))
        return cls(settings)

    def bind(self, extraction_box: int) -> None:
        """Called once when the chain is built, with the extraction box in pixels.

        Steps whose defaults depend on the box (patch sizes, radii) resolve and check them
        here, so that bad combinations are refused before any micrograph is processed
        (raise :class:`flybox.errors.ConfigError`).
        """

    def absorb(self, following: Processor[Any]) -> bool:
        """Take over the work of the step that follows this one, if this step can do it for
        free (e.g. normalisation folds a contrast inversion into its final pass).

        Returns ``True`` when absorbed: the chain then skips ``following``. The chain's
        description and settings hash are unaffected.
        """
        return False

    def settings_dict(self) -> dict[str, Any]:
        """Settings as plain JSON-able values (used for the chain's settings hash)."""
        return self.settings.model_dump(mode="json")


class MicrographProcessor(Processor[SettingsT]):
    """A step that maps a :class:`Micrograph` to a :class:`Micrograph`."""

    kind: ClassVar[StepKind] = "micrograph"

    @abc.abstractmethod
    def apply(self, micrograph: Micrograph) -> Micrograph:
        """Return the processed micrograph; never modify ``micrograph.image`` in place."""


class Extractor(Processor[SettingsT]):
    """The step that cuts boxes out of a micrograph: :class:`Micrograph` → stack.

    ``apply`` is called with micrographs whose ``picks`` hold a chunk of the picks, so that
    memory stays bounded for micrographs with many particles.
    """

    kind: ClassVar[StepKind] = "extract"

    @property
    @abc.abstractmethod
    def box(self) -> int:
        """Extraction box size in micrograph pixels."""

    @abc.abstractmethod
    def apply(self, micrograph: Micrograph) -> tuple[ParticleStack, int]:
        """Extract the picks of ``micrograph``.

        Returns
        -------
        stack, excluded
            The particles of stream ``particles`` and the number of picks excluded at the
            border.
        """


class ParticleProcessor(Processor[SettingsT]):
    """A step that maps a :class:`ParticleStack` to one of the same stream."""

    kind: ClassVar[StepKind] = "particles"

    @abc.abstractmethod
    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Return the processed stack (may be ``stack`` itself, updated)."""


class StreamSplitter(Processor[SettingsT]):
    """A step that fans one stream out into several named streams."""

    kind: ClassVar[StepKind] = "fanout"

    @abc.abstractmethod
    def streams(self, extraction_box: int) -> dict[str, int]:
        """Names and box sizes of the streams produced, in output order."""

    @abc.abstractmethod
    def apply(self, stack: ParticleStack) -> dict[str, ParticleStack]:
        """Return one stack per output stream."""
