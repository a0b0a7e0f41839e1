"""Plain data types shared by the readers (:mod:`flybox.io`) and the processors.

No logic beyond conversions lives here, so that ``io`` and ``processors`` both depend on this
module and never on each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["CTF_STAR_COLUMNS", "CtfParams", "ImageStats", "OpticsGroup"]

#: STAR columns a :class:`CtfParams` contributes to each particle row (RELION 3.1 layout;
#: voltage, Cs and amplitude contrast live in the optics table instead).
CTF_STAR_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnPhaseShift",
)


@dataclass(frozen=True)
class CtfParams:
    """CTF of one micrograph, in RELION's units and sign conventions (ALGORITHMS.md §7.1).

    Attributes
    ----------
    defocus_u_a, defocus_v_a
        Defocus along the major/minor axes in Å; positive is underfocus.
    defocus_angle_deg
        Astigmatism angle φ in degrees, from the +x (column) axis towards +y (row).
    voltage_kv
        Acceleration voltage in kV (``None`` when unknown).
    cs_mm
        Spherical aberration in mm (``None`` when unknown).
    amplitude_contrast
        Amplitude contrast Q0 as a fraction (``None`` when unknown).
    phase_shift_deg
        Additional phase shift (phase plate) in degrees.
    bfactor_a2
        Envelope B-factor in Å² (RELION's ``rlnCtfBfactor``).
    scale
        RELION's ``rlnCtfScalefactor``.
    extra
        Further per-micrograph STAR values to carry into particle rows, such as
        ``rlnCtfMaxResolution`` and ``rlnCtfFigureOfMerit``.
    """

    defocus_u_a: float
    defocus_v_a: float
    defocus_angle_deg: float
    voltage_kv: float | None = None
    cs_mm: float | None = None
    amplitude_contrast: float | None = None
    phase_shift_deg: float = 0.0
    bfactor_a2: float = 0.0
    scale: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether voltage, Cs and amplitude contrast are known (needed to evaluate the CTF)."""
        return None not in (self.voltage_kv, self.cs_mm, self.amplitude_contrast)

    @property
    def mean_defocus_a(self) -> float:
        """Mean of the two defocus values in Å."""
        return 0.5 * (self.defocus_u_a + self.defocus_v_a)

    def star_values(self) -> dict[str, float]:
        """The per-particle STAR columns of this CTF (RELION 3.1 ``data_particles``)."""
        values = {
            "rlnDefocusU": self.defocus_u_a,
            "rlnDefocusV": self.defocus_v_a,
            "rlnDefocusAngle": self.defocus_angle_deg,
            "rlnCtfBfactor": self.bfactor_a2,
            "rlnCtfScalefactor": self.scale,
            "rlnPhaseShift": self.phase_shift_deg,
        }
        values.update(self.extra)
        return values

    def wavelength_a(self) -> float:
        """Relativistic electron wavelength in Å (ALGORITHMS.md §7.1)."""
        if self.voltage_kv is None:
            raise ValueError("the CTF has no voltage")
        volts = self.voltage_kv * 1e3
        return 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


@dataclass(frozen=True)
class OpticsGroup:
    """One row of a RELION 3.1+ ``data_optics`` table for micrographs.

    Attributes
    ----------
    name, number
        ``rlnOpticsGroupName`` and the 1-based ``rlnOpticsGroup``.
    micrograph_pixel_size_a
        ``rlnMicrographPixelSize`` in Å (``None`` when unknown).
    voltage_kv, cs_mm, amplitude_contrast
        ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``.
    original_pixel_size_a
        ``rlnMicrographOriginalPixelSize`` (movie pixel size) when known.
    extra
        Other optics columns to copy into particle optics tables (beam tilt, Zernike terms…).
    """

    name: str = "opticsGroup1"
    number: int = 1
    micrograph_pixel_size_a: float | None = None
    voltage_kv: float | None = None
    cs_mm: float | None = None
    amplitude_contrast: float | None = None
    original_pixel_size_a: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_ctf(cls, ctf: CtfParams | None, pixel_size_a: float | None) -> OpticsGroup:
        """The single optics group of micrographs whose CTF source gives the optics."""
        group = cls(micrograph_pixel_size_a=pixel_size_a)
        return group if ctf is None else group.with_optics_of(ctf)

    def with_optics_of(self, ctf: CtfParams) -> OpticsGroup:
        """This group with the voltage, Cs and amplitude contrast of ``ctf``."""
        return dataclasses.replace(
            self,
            voltage_kv=ctf.voltage_kv,
            cs_mm=ctf.cs_mm,
            amplitude_contrast=ctf.amplitude_contrast,
        )

    def complete_ctf(self, ctf: CtfParams) -> CtfParams:
        """``ctf`` with the optics it lacks (voltage, Cs, amplitude contrast) from this group."""
        return dataclasses.replace(
            ctf,
            voltage_kv=ctf.voltage_kv if ctf.voltage_kv is not None else self.voltage_kv,
            cs_mm=ctf.cs_mm if ctf.cs_mm is not None else self.cs_mm,
            amplitude_contrast=(
                ctf.amplitude_contrast
                if ctf.amplitude_contrast is not None
                else self.amplitude_contrast
            ),
        )


class ImageStats(NamedTuple):
    """Statistics of a batch of images, as an MRC stack header needs them.

    ``minimum``/``maximum`` over all pixels; ``means`` and ``variances`` (population) per
    image. Computed by the step that produced the pixels when it can do so for free (the
    normalisation kernel), so the stack writer needs no extra pass over the data.
    """

    minimum: float
    maximum: float
    means: npt.NDArray[np.float64]
    variances: npt.NDArray[np.float64]

    @classmethod
    def of(cls, images: npt.NDArray[Any]) -> ImageStats:
        """Compute the statistics of ``(n, …)`` images (float64 accumulation)."""
        flat = images.reshape(images.shape[0], -1)
        means = flat.mean(axis=1, dtype=np.float64)
        variances = flat.var(axis=1, dtype=np.float64)
        return cls(float(flat.min()), float(flat.max()), means, variances)
