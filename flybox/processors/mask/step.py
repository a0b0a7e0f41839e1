"""Applying masks (fill types) and the ``mask`` chain step; shapes live in :mod:`.shapes`.

Binary masks (circular, box, crown, cylinder) substitute a fill value for the pixels they
remove: ``value``, or the ``min``, ``max`` or ``avg`` of the whole image before masking
(Xmipp's ``--substitute``). Soft masks (gaussian, raised cosine, raised crown) multiply.
``soft_background`` works with any mask: RELION's ``softMaskOutsideMap`` blend
``m·x + (1-m)·b`` towards the ``(1-m)``-weighted mean ``b`` of each image (ALGORITHMS.md §11).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import field_validator

from flybox.errors import ConfigError
from flybox.processors.base import ParticleProcessor, ParticleStack, StepSettings, scaled_radius
from flybox.processors.mask.shapes import (
    FillMode,
    MaskSettings,
    ShapeName,
    build_mask,
    mask_2d,
)

__all__ = [
    "MaskCache",
    "MaskStep",
    "MaskStepSettings",
    "apply_mask",
    "fill_rule",
    "is_binary_mask",
]

FloatArray = npt.NDArray[np.float32]


class MaskCache:
    """Masks built once per (image shape, settings) and shared read-only afterwards.

    Parameters
    ----------
    max_entries
        Masks kept; the oldest is dropped beyond this (a 256³ mask takes 64 MiB).
    """

    def __init__(self, max_entries: int = 8) -> None:
        self._masks: dict[tuple[tuple[int, ...], MaskSettings], FloatArray] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, shape: Sequence[int], settings: MaskSettings) -> FloatArray:
        """The (read-only) mask for ``shape``, built on first use."""
        key = (tuple(int(n) for n in shape), settings)
        with self._lock:
            mask = self._masks.get(key)
            if mask is None:
                mask = build_mask(key[0], settings)
                mask.setflags(write=False)
                if len(self._masks) >= self._max:
                    del self._masks[next(iter(self._masks))]
                self._masks[key] = mask
            return mask

    def __len__(self) -> int:
        return len(self._masks)


def is_binary_mask(mask: npt.NDArray[Any]) -> bool:
    """Whether every value of ``mask`` is exactly 0 or 1."""
    return bool(np.all((mask == 0) | (mask == 1)))


def apply_mask(
    images: npt.NDArray[Any],
    mask: npt.NDArray[Any],
    fill: FillMode | None = None,
    fill_value: float = 0.0,
    *,
    binary: bool | None = None,
) -> FloatArray:
    """Mask one image/volume or a batch, with Xmipp's or RELION's fill semantics (§11).

    Parameters
    ----------
    images
        ``(..., *mask.shape)``: one image ``(b, b)``, a batch ``(n, b, b)`` or a volume.
        Any real dtype; read, never modified.
    mask
        The mask (1 keeps a pixel), e.g. from :func:`build_mask` or a file.
    fill
        Binary masks: pixels where the mask is 0 become ``fill_value`` (``value``, the
        default) or the ``min``/``max``/``avg`` of the same image over all its pixels before
        masking. Soft masks ignore these and multiply (Xmipp). ``soft_background``, for any
        mask, gives ``m·x + (1-m)·b`` with ``b = Σ(1-m)·x / Σ(1-m)`` per image (RELION's
        ``softMaskOutsideMap``; the sum runs in float32 BLAS, relative error ~1e-7).
    fill_value
        Substitute value of the ``value`` fill.
    binary
        Whether ``mask`` is 0/1; worked out from its values when ``None``.

    Returns
    -------
    numpy.ndarray
        New float32 array shaped like ``images``.

    Notes
    -----
    Substitution is computed as ``x·m + v·(1-m)``, one multiplication pass (twice as fast as
    ``numpy.where``): kept pixels are bit-identical and removed pixels equal ``v`` exactly,
    except that non-finite input pixels (NaN, inf) stay non-finite.
    """
    nd = mask.ndim
    if images.shape[images.ndim - nd :] != mask.shape:
        raise ValueError(f"images of shape {images.shape} do not fit a mask of {mask.shape}")
    x = np.asarray(images, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)
    out: FloatArray = np.multiply(x, m)
    if fill_rule(m, fill, fill_value, binary) == "multiply":
        return out
    flat_in, flat_out = x.reshape(-1, m.size), out.reshape(-1, m.size)
    removed = (1.0 - m).ravel()
    total = np.float32(removed.sum(dtype=np.float64))
    if total == 0:
        return out
    # Blocks of ~1 MiB keep the temporaries in cache.
    step = max(1, _BLOCK_BYTES // (4 * m.size))
    for start in range(0, flat_in.shape[0], step):
        block, target = flat_in[start : start + step], flat_out[start : start + step]
        values: npt.NDArray[np.float32]
        if fill == "soft_background":
            values = ((block @ removed) / total).astype(np.float32, copy=False)
        else:
            values = _fill_values(block, fill, fill_value)
        target += values[:, np.newaxis] * removed
    return out


_BLOCK_BYTES = 1 << 20

FillRule = Literal["multiply", "value", "min", "max", "avg", "soft_background"]


def fill_rule(
    mask: npt.NDArray[Any], fill: FillMode | None, fill_value: float, binary: bool | None
) -> FillRule:
    """How :func:`apply_mask` fills: ``multiply`` (soft masks, or a binary mask filled with 0),
    ``soft_background``, or substitution of the removed pixels (``value``/``min``/``max``/
    ``avg``, binary masks only). Shared with steps that apply a mask inside their own pass."""
    if fill == "soft_background":
        return "soft_background"
    if binary is None:
        binary = is_binary_mask(mask)
    if not binary or (fill in (None, "value") and fill_value == 0):
        return "multiply"
    return "value" if fill is None else fill


def _fill_values(
    block: FloatArray, fill: FillMode | None, fill_value: float
) -> npt.NDArray[np.float32]:
    """Per-image substitute values of a ``(k, pixels)`` block."""
    values: npt.NDArray[np.float32]
    if fill == "avg":
        # float64 sums through BLAS: as exact as ndarray.mean(dtype=float64), and faster
        sums = block.astype(np.float64) @ np.ones(block.shape[1])
        values = (sums / block.shape[1]).astype(np.float32)
    elif fill == "min":
        values = block.min(axis=1)
    elif fill == "max":
        values = block.max(axis=1)
    else:
        values = np.full(block.shape[0], fill_value, dtype=np.float32)
    return values


class MaskStepSettings(MaskSettings):
    """Settings of the ``mask`` chain step: particle (2D) shapes only.

    Radii, sizes, heights and the centre are given for the *extraction* box and scaled to
    each stream with RELION's rule ``int(R · box / extraction_box)``; ``sigma`` and ``decay``
    (widths of soft profiles) scale proportionally without truncation.
    """

    @field_validator("shape", mode="after")
    @classmethod
    def _particle_shape(cls, value: ShapeName) -> ShapeName:
        if value == "cylinder":
            raise ValueError(
                "cylinder is a 3D shape; particles take circular, box, crown, gaussian, "
                "raised_cosine or raised_crown"
            )
        return value

    @field_validator("center", mode="after")
    @classmethod
    def _particle_center(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) != 2:
            raise ValueError("takes 2 values (x y) for particles")
        return value

    @field_validator("size", mode="after")
    @classmethod
    def _particle_size(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and len(value) == 3:
            raise ValueError("takes 1 or 2 values (x y) for particles")
        return value

    def for_stream(self, box: int, extraction_box: int) -> MaskStepSettings:
        """These settings scaled from the extraction box to a stream sampled at ``box`` pixels
        (its Fourier-crop size, :attr:`ParticleStack.sampled_box`)."""

        def scaled(value: float) -> float:
            return float(scaled_radius(value, box, extraction_box))

        update: dict[str, Any] = {"center": tuple(scaled(c) for c in self.center)}
        for name in ("radius", "inner", "outer", "height"):
            if (value := getattr(self, name)) is not None:
                update[name] = scaled(value)
        for name in ("sigma", "decay"):
            if (value := getattr(self, name)) is not None:
                update[name] = value * box / extraction_box
        if self.size is not None:
            update["size"] = tuple(max(1, int(scaled(v))) for v in self.size)
        return self.model_copy(update=update)


class MaskStep(ParticleProcessor[MaskStepSettings]):
    """The ``mask`` step: masks every particle of every stream (DESIGN.md §4-5).

    Lengths given for the extraction box are scaled to each stream's sampling
    (:meth:`MaskStepSettings.for_stream`); defaults are those of the stream's own box. The mask
    of each (box, sampled box, extraction box) is built once and reused for every batch.
    """

    name: ClassVar[str] = "mask"
    Settings: ClassVar[type[StepSettings]] = MaskStepSettings

    def __init__(self, settings: MaskStepSettings) -> None:
        super().__init__(settings)
        self._masks: dict[tuple[int, int, int], FloatArray] = {}
        self._lock = threading.Lock()

    def bind(self, extraction_box: int) -> None:
        """Refuse a centre shift that puts the mask centre outside the extraction box."""
        limit = extraction_box / 2
        if any(abs(c) > limit for c in self.settings.center):
            raise ConfigError(
                "mask.center",
                f"shift {tuple(self.settings.center)} puts the mask centre outside the "
                f"{extraction_box}-px box",
            )

    def mask_for(self, box: int, extraction_box: int, sampled_box: int | None = None) -> FloatArray:
        """The read-only mask for ``box``-pixel particles of a stream.

        Parameters
        ----------
        box
            Image size in pixels.
        extraction_box
            Box at extraction, for which the settings' lengths are given.
        sampled_box
            Size the stream's sampling corresponds to (differs from ``box`` after a
            real-space window); default ``box``.
        """
        key = (int(box), int(sampled_box or box), int(extraction_box))
        with self._lock:
            mask = self._masks.get(key)
            if mask is None:
                mask = mask_2d(key[0], self.settings.for_stream(key[1], key[2]))
                mask.setflags(write=False)
                self._masks[key] = mask
            return mask

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Mask the stack's images with the mask of its stream."""
        mask = self.mask_for(stack.box, stack.extraction_box, stack.sampled_box)
        images = apply_mask(
            stack.real(),
            mask,
            self.settings.fill,
            self.settings.fill_value,
            binary=self.settings.binary,
        )
        return stack.set_real(images)
