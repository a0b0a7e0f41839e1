"""CTF evaluation and phase flipping (ALGORITHMS.md §7).

The CTF is evaluated as RELION 5 does in ``CTF::getCTF`` (src/ctf.h, src/ctf.cpp), on the
rfft half grid of an image (``CtfHelper::getFftwImage``):

* frequencies ``kx = j/(nx·p)`` for columns ``j = 0..nx//2`` and ``ky = k/(ny·p)`` with
  ``k = r`` for rows ``r ≤ ny//2`` and ``r − ny`` otherwise (§0.2), so for even ``ny`` the
  Nyquist row is **+ny/2** (RELION's ``FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM2D``; Xmipp's
  ``FFT_IDX2DIGFREQ`` agrees);
* astigmatism as RELION's bilinear form ``A = Qᵀ·diag(−ΔfU, −ΔfV)·Q`` with ``Q`` the
  rotation by φ = ``rlnDefocusAngle``, which equals ``−Δf(θ)·u²`` with
  ``Δf(θ) = ΔfU·cos²(θ−φ) + ΔfV·sin²(θ−φ)``, θ measured from +x (columns) towards +y (rows);
* ``γ = πλ·(kᵀAk) + (π/2)·Cs·λ³·u⁴ − ψ − α`` with Cs in Å, α = atan(Q0/√(1−Q0²)), ψ the phase
  shift in radians, and ``CTF = −sin(γ)`` (times ``exp(−B·u²/4)`` when asked).

RELION's box-level flip (``relion_preprocess --phase_flip``) multiplies the spectrum by
``scale · (−1 if CTF < 0 else +1)`` with the damped CTF (the B-factor envelope is positive,
so it cannot change the sign) and clamps factors below 1e−8 in magnitude to ±1e−8, as
``getCTF`` does. Anisotropic magnification and even Zernike aberrations of an optics group
are not modelled (:class:`flybox.types.CtfParams` does not carry them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from flybox.errors import ProcessingError
from flybox.processors.base import (
    Micrograph,
    MicrographProcessor,
    ParticleProcessor,
    ParticleStack,
    StepSettings,
)
from flybox.processors.fft import irfftn_last, rfftn_last
from flybox.types import CtfParams

__all__ = [
    "MicrographPhaseFlipSettings",
    "MicrographPhaseFlipStep",
    "PhaseFlipSettings",
    "PhaseFlipStep",
    "ctf_grid",
    "flip_signs",
    "frequency_axes",
    "relion_flip_factors",
]

Float64Array = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]

_NEEDS_CTF = "phase flip needs a CTF with voltage, Cs and amplitude contrast"


def frequency_axes(
    shape: tuple[int, int], pixel_size_a: float
) -> tuple[Float64Array, Float64Array]:
    """Spatial frequencies (1/Å) of the rfft half grid of an image of ``shape = (ny, nx)``.

    Returns
    -------
    ky, kx
        ``ky`` of shape ``(ny, 1)`` (row ``r`` ↦ ``r`` if ``r ≤ ny//2`` else ``r − ny``, over
        ``ny·p``) and ``kx`` of shape ``(1, nx//2 + 1)`` (``j/(nx·p)``).
    """
    ny, nx = shape
    rows = np.arange(ny, dtype=np.float64)
    rows = np.where(rows <= ny // 2, rows, rows - ny)
    ky = (rows / (float(ny) * pixel_size_a))[:, None]
    kx = (np.arange(nx // 2 + 1, dtype=np.float64) / (float(nx) * pixel_size_a))[None, :]
    return ky, kx


def ctf_grid(
    shape: tuple[int, int],
    pixel_size_a: float,
    ctf: CtfParams,
    *,
    phase_shift: bool = True,
    vpp_radius: float = 0.0,
    envelope: bool = False,
) -> Float64Array:
    """CTF values on the rfft half grid of an image (ALGORITHMS.md §7.1).

    Parameters
    ----------
    shape
        ``(ny, nx)`` of the real-space image (need not be square).
    pixel_size_a
        Pixel size in Å.
    ctf
        The CTF; voltage, Cs and amplitude contrast must be known.
    phase_shift
        Apply ``ctf.phase_shift_deg`` as a constant ψ (RELION, default). ``False`` is Xmipp's
        behaviour: the shift is ignored unless ``vpp_radius > 0``.
    vpp_radius
        Xmipp's phase-plate radius in 1/Å. When > 0 the shift becomes
        ``ψ(u) = ψ·(1 − exp(−u²/(2·vpp_radius²)))`` whatever ``phase_shift`` says.
    envelope
        Multiply by the B-factor envelope ``exp(−B·u²/4)`` (``ctf.bfactor_a2``), as RELION's
        damped CTF. Off by default (the pure CTF).

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(ny, nx//2 + 1)``.

    Raises
    ------
    ValueError
        When the CTF lacks voltage, Cs or amplitude contrast, Q0 is outside [0, 1], or the
        pixel size is not positive.
    """
    cs_mm, amplitude_contrast = ctf.cs_mm, ctf.amplitude_contrast
    if ctf.voltage_kv is None or cs_mm is None or amplitude_contrast is None:
        raise ValueError("the CTF needs voltage, Cs and amplitude contrast")
    q0 = float(amplitude_contrast)
    if not 0.0 <= q0 <= 1.0:
        raise ValueError(f"amplitude contrast {q0} is outside [0, 1]")
    if pixel_size_a <= 0:
        raise ValueError(f"pixel size {pixel_size_a} Å is not positive")

    # Constants in the order RELION's CTF::initialise computes them.
    wavelength = ctf.wavelength_a()
    k1 = math.pi / 2 * 2 * wavelength
    k2 = math.pi / 2 * (cs_mm * 1e7) * wavelength * wavelength * wavelength
    k3 = math.atan2(q0, math.sqrt(1.0 - q0 * q0))  # = atan(Q0/√(1−Q0²)), defined at Q0 = 1
    azimuth = ctf.defocus_angle_deg * math.pi / 180
    cos_az, sin_az = math.cos(azimuth), math.sin(azimuth)
    # A = (Qᵀ·D)·Q with Q = [[c, s], [−s, c]] and D = diag(−U, −V), as RELION multiplies.
    du, dv = -ctf.defocus_u_a, -ctf.defocus_v_a
    axx = (cos_az * du) * cos_az + (-sin_az * dv) * -sin_az
    axy = (cos_az * du) * sin_az + (-sin_az * dv) * cos_az
    ayy = (sin_az * du) * sin_az + (cos_az * dv) * cos_az

    ky, kx = frequency_axes(shape, pixel_size_a)
    u2 = kx * kx + ky * ky
    u4 = u2 * u2
    gamma = k1 * (axx * kx * kx + 2.0 * axy * kx * ky + ayy * ky * ky) + k2 * u4
    psi = ctf.phase_shift_deg * math.pi / 180
    if vpp_radius > 0:
        gamma = gamma - psi * (1.0 - np.exp(-u2 / (2.0 * vpp_radius * vpp_radius)))
    elif phase_shift:
        gamma = gamma - psi
    gamma = gamma - k3
    values: Float64Array = -np.sin(gamma)
    if envelope:
        values = values * np.exp((-ctf.bfactor_a2 / 4.0) * u2)
    return values


def flip_signs(grid: npt.NDArray[np.floating]) -> Float32Array:
    """Phase-flip signs of a CTF grid: −1 where CTF < 0, +1 elsewhere (0 is not flipped)."""
    signs: Float32Array = np.where(grid < 0, np.float32(-1.0), np.float32(1.0))
    return signs


def relion_flip_factors(grid: npt.NDArray[np.floating], scale: float) -> Float32Array:
    """RELION's flip multipliers: ``scale · sign`` with magnitudes below 1e−8 set to ±1e−8.

    Parameters
    ----------
    grid
        (Damped) CTF values.
    scale
        ``rlnCtfScalefactor``.
    """
    factors = flip_signs(grid).astype(np.float64) * float(scale)
    if abs(scale) < 1e-8:
        factors = np.where(factors >= 0, 1e-8, -1e-8)
    result: Float32Array = factors.astype(np.float32)
    return result


def _ctf_key(ctf: CtfParams) -> tuple[float | None, ...]:
    # CtfParams holds a dict (``extra``) and is therefore not hashable.
    return (
        ctf.defocus_u_a,
        ctf.defocus_v_a,
        ctf.defocus_angle_deg,
        ctf.voltage_kv,
        ctf.cs_mm,
        ctf.amplitude_contrast,
        ctf.phase_shift_deg,
        ctf.bfactor_a2,
        ctf.scale,
    )


class _GridCache:
    """A small LRU of per-(shape, pixel size, CTF) arrays kept by a step instance."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.items: OrderedDict[tuple[object, ...], Float32Array] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> Float32Array | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple[object, ...], value: Float32Array) -> None:
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)


def _micrograph_name(table: pd.DataFrame, fallback: str) -> str:
    if "rlnMicrographName" in table and len(table):
        return str(table["rlnMicrographName"].iloc[0])
    return fallback


class PhaseFlipSettings(StepSettings):
    """Settings of the box-level ``phase_flip`` step.

    Attributes
    ----------
    phase_shift
        Include ``rlnPhaseShift`` in the CTF (RELION always does).
    """

    phase_shift: bool = True


class PhaseFlipStep(ParticleProcessor[PhaseFlipSettings]):
    """RELION's box-level phase flip (``relion_preprocess --phase_flip``, §7.2).

    Works on ``stack.fourier(before_fill=True)``: the spectrum of the mean-padded boxes, so a
    pending border fill is applied after the flip, as RELION does. The spectrum is multiplied
    by :func:`relion_flip_factors` of the damped CTF on the ``(box, box)`` grid at the
    stack's pixel size.
    """

    name: ClassVar[str] = "phase_flip"
    Settings: ClassVar[type[StepSettings]] = PhaseFlipSettings
    requires_ctf: ClassVar[bool] = True

    def __init__(self, settings: PhaseFlipSettings) -> None:
        super().__init__(settings)
        self._cache = _GridCache()

    def factors(self, box: int, pixel_size_a: float, ctf: CtfParams) -> Float32Array:
        """Flip multipliers for a ``box``-sized particle (cached per box, pixel size, CTF)."""
        key = (box, pixel_size_a, *_ctf_key(ctf))
        cached = self._cache.get(key)
        if cached is None:
            grid = ctf_grid(
                (box, box),
                pixel_size_a,
                ctf,
                phase_shift=self.settings.phase_shift,
                envelope=True,
            )
            cached = relion_flip_factors(grid, ctf.scale)
            self._cache.put(key, cached)
        return cached

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Flip the phases of every particle of ``stack`` (in place; returns ``stack``)."""
        ctf = stack.ctf
        if ctf is None or not ctf.complete:
            raise ProcessingError(
                path=_micrograph_name(stack.table, f"stream {stack.stream}"),
                problem=_NEEDS_CTF,
            )
        if len(stack) == 0:
            return stack
        spectrum = stack.fourier(before_fill=True)
        factors = self.factors(stack.box, stack.pixel_size_a, ctf)
        flipped = (spectrum * factors).astype(np.complex64, copy=False)
        return stack.set_fourier(flipped)


class MicrographPhaseFlipSettings(StepSettings):
    """Settings of the ``phase_flip_micrograph`` step.

    Attributes
    ----------
    phase_shift
        Apply the phase shift as a constant (RELION's model). Default ``False``: Xmipp ignores
        the shift unless the CTF has a phase-plate radius.
    vpp_radius
        Xmipp's phase-plate radius in 1/Å (0: none).
    """

    phase_shift: bool = False
    vpp_radius: float = Field(default=0.0, ge=0)


class MicrographPhaseFlipStep(MicrographProcessor[MicrographPhaseFlipSettings]):
    """Xmipp's whole-micrograph phase flip (``xmipp_ctf_phase_flip``, §7.2).

    The full (possibly non-square) micrograph is transformed with pyFFTW in float32, every
    coefficient with CTF < 0 changes sign (no scale factor, no envelope), and the image is
    transformed back.
    """

    name: ClassVar[str] = "phase_flip_micrograph"
    Settings: ClassVar[type[StepSettings]] = MicrographPhaseFlipSettings
    requires_ctf: ClassVar[bool] = True

    def __init__(self, settings: MicrographPhaseFlipSettings) -> None:
        super().__init__(settings)
        self._cache = _GridCache(size=2)

    def signs(self, shape: tuple[int, int], pixel_size_a: float, ctf: CtfParams) -> Float32Array:
        """Flip signs for a micrograph of ``shape`` (cached per shape, pixel size, CTF)."""
        key = (shape, pixel_size_a, *_ctf_key(ctf))
        cached = self._cache.get(key)
        if cached is None:
            grid = ctf_grid(
                shape,
                pixel_size_a,
                ctf,
                phase_shift=self.settings.phase_shift,
                vpp_radius=self.settings.vpp_radius,
            )
            cached = flip_signs(grid)
            self._cache.put(key, cached)
        return cached

    def apply(self, micrograph: Micrograph) -> Micrograph:
        """Return a copy of ``micrograph`` with its phases flipped."""
        ctf = micrograph.ctf
        if ctf is None or not ctf.complete:
            raise ProcessingError(path=micrograph.name, problem=_NEEDS_CTF)
        image = np.asarray(micrograph.image, dtype=np.float32)
        spectrum = rfftn_last(image)
        spectrum *= self.signs(micrograph.shape, micrograph.pixel_size_a, ctf)
        flipped = np.ascontiguousarray(irfftn_last(spectrum, micrograph.shape), dtype=np.float32)
        return micrograph.with_image(flipped)
