"""Image work of the picker: binning, band-pass channels, candidates and rotation-invariant
window features (pure numpy/scipy, no I/O).

Conventions: positions are ``(x, y)`` = (column, row). A :class:`Prepared` micrograph is binned
by an integer factor so that the particle is 32-63 px across; a binned pixel ``i`` covers
micrograph pixels ``[b·i, b·i + b)``, so its centre is at ``b·i + (b − 1)/2`` in micrograph
pixels. Channels are scaled to unit noise (1.4826 × median absolute deviation), so features are
in units of the noise and comparable between micrographs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft
from scipy import ndimage

__all__ = [
    "FEATURE_NAMES",
    "Prepared",
    "binning_for",
    "candidate_peaks",
    "correlation_map",
    "prepare",
    "rotational_average",
    "window_features",
]

Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

#: Binned particle diameter the learner aims at (PICKING.md §1: Xmipp uses ~50 px).
TARGET_BINNED_DIAMETER = 32
#: Rings over the window (0 … 1.5 radius) and angular harmonics per band.
N_RINGS = 9
HARMONICS = (1, 2, 3, 4, 5, 6)
BANDS = ((0.0, 0.45), (0.45, 0.8), (0.8, 1.15))


def binning_for(particle_size: float) -> int:
    """Integer binning that brings a particle of ``particle_size`` px to 32-63 px across."""
    return max(1, int(particle_size // TARGET_BINNED_DIAMETER))


def bin_image(image: npt.NDArray[Any], factor: int) -> Float32Array:
    """Mean over ``factor × factor`` blocks (the trailing partial block is dropped)."""
    data = np.asarray(image)
    if factor == 1:  # a copy: the input may be a read-only memory map
        return np.array(data, dtype=np.float32, copy=True)
    ny, nx = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    blocks = data[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    if blocks.dtype != np.float32:
        blocks = blocks.astype(np.float32)
    summed: Float32Array = blocks.sum(axis=(1, 3), dtype=np.float32)
    summed *= np.float32(1.0 / (factor * factor))
    return summed


def _frequency_radius(shape: tuple[int, int]) -> FloatArray:
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    radius: FloatArray = np.sqrt(fy * fy + fx * fx)
    return radius


def _band_pass(spectrum: npt.NDArray[np.complex64], f: FloatArray, low: float, high: float) -> Any:
    """Gaussian band-pass: keeps scales between 1/high and 1/low pixels."""
    gain = np.exp(-0.5 * (f / high) ** 2) * (1.0 - np.exp(-0.5 * (f / low) ** 2))
    return spectrum * gain.astype(np.float32)


def _unit_noise(channel: Float32Array) -> Float32Array:
    sample = channel[::3, ::3]
    mad = float(np.median(np.abs(sample - np.median(sample))))
    scale = 1.4826 * mad if mad > 0 else float(channel.std()) or 1.0
    out: Float32Array = (channel * np.float32(1.0 / scale)).astype(np.float32, copy=False)
    return out


@dataclass(frozen=True)
class Prepared:
    """A micrograph ready for proposals and features.

    Attributes
    ----------
    coarse
        Band-pass at the particle's scale (1/2d … 6/d), unit noise, binned pixels.
    fine
        Band-pass of the particle's details (6/d … 14/d), unit noise.
    log_stack
        Scale-normalised Laplacian of Gaussian (dark blobs positive) at 0.6, 1 and 1.4 × the
        particle radius, shape ``(3, ny, nx)``.
    factor
        Binning factor.
    radius
        Particle radius in binned pixels.
    shape
        Shape of the original micrograph ``(ny, nx)``.
    """

    coarse: Float32Array
    fine: Float32Array
    log_stack: Float32Array
    factor: int
    radius: float
    shape: tuple[int, int]

    def to_binned(self, xy: npt.ArrayLike) -> npt.NDArray[np.intp]:
        """Micrograph pixel positions ``(n, 2)`` → nearest binned pixel ``(n, 2)`` (x, y)."""
        points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        binned = np.rint((points - (self.factor - 1) / 2.0) / self.factor).astype(np.intp)
        limits = np.array([self.coarse.shape[1] - 1, self.coarse.shape[0] - 1])
        clipped: npt.NDArray[np.intp] = np.clip(binned, 0, limits)
        return clipped

    def to_micrograph(self, xy: npt.ArrayLike) -> FloatArray:
        """Binned pixel positions ``(n, 2)`` → micrograph pixels (centre of the bin)."""
        points = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return points * self.factor + (self.factor - 1) / 2.0


def prepare(image: npt.NDArray[Any], particle_size: float) -> Prepared:
    """Bin and band-pass a micrograph for the learner.

    Parameters
    ----------
    image
        ``(ny, nx)`` micrograph, any real dtype (a memory map is fine).
    particle_size
        Particle diameter in micrograph pixels.
    """
    if particle_size <= 0:
        raise ValueError(f"particle size must be positive, not {particle_size}")
    factor = binning_for(particle_size)
    binned = bin_image(image, factor)
    binned -= np.float32(binned.mean())
    diameter = particle_size / factor
    radius = diameter / 2.0
    f = _frequency_radius(binned.shape)
    spectrum = scipy.fft.rfft2(binned, workers=1)
    coarse = scipy.fft.irfft2(
        _band_pass(spectrum, f, 0.5 / diameter, 6.0 / diameter), s=binned.shape
    )
    fine = scipy.fft.irfft2(
        _band_pass(spectrum, f, 6.0 / diameter, 14.0 / diameter), s=binned.shape
    )
    coarse_unit = _unit_noise(coarse.astype(np.float32))
    logs = np.empty((3, *binned.shape), dtype=np.float32)
    coarse_spectrum = scipy.fft.rfft2(coarse_unit, workers=1)
    for i, scale in enumerate((0.6, 1.0, 1.4)):
        sigma = scale * radius / math.sqrt(2.0)
        # Fourier transform of σ²∇²G: −σ²·4π²f²·exp(−2π²σ²f²); dark blobs → positive.
        gain = (4 * math.pi**2 * sigma**2) * f**2 * np.exp(-2 * math.pi**2 * sigma**2 * f**2)
        logs[i] = -scipy.fft.irfft2(coarse_spectrum * gain.astype(np.float32), s=binned.shape)
    return Prepared(
        coarse=coarse_unit,
        fine=_unit_noise(fine.astype(np.float32)),
        log_stack=logs,
        factor=factor,
        radius=radius,
        shape=(int(image.shape[0]), int(image.shape[1])),
    )


def _radius_grid(half: int) -> FloatArray:
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    radius: FloatArray = np.hypot(x, y)
    return radius


def window_half(radius: float) -> int:
    """Half-width of feature windows and templates: 1.5 × the radius."""
    return math.ceil(1.5 * radius)


def extract_windows(image: Float32Array, centres: npt.NDArray[np.intp], half: int) -> Float32Array:
    """Windows ``(n, 2·half+1, 2·half+1)`` centred on binned ``(x, y)`` positions (zero padded)."""
    padded = np.pad(image, half, mode="constant")
    views = np.lib.stride_tricks.sliding_window_view(padded, (2 * half + 1, 2 * half + 1))
    windows: Float32Array = views[centres[:, 1], centres[:, 0]]
    return windows


def rotational_average(patch: FloatArray) -> Float32Array:
    """Rotational average of a square patch about its centre (linear interpolation in r)."""
    half = patch.shape[0] // 2
    r = _radius_grid(half)
    index = r.astype(np.intp)
    sums = np.bincount(index.ravel(), weights=patch.ravel())
    counts = np.maximum(np.bincount(index.ravel()), 1)
    profile = sums / counts
    averaged = np.interp(r, np.arange(profile.size), profile)
    averaged[r > half] = 0.0
    return averaged.astype(np.float32)


def correlation_map(prepared: Prepared, template: Float32Array) -> Float32Array:
    """Cross-correlation of the coarse channel with a (zero-mean) template, in noise units."""
    ny, nx = prepared.coarse.shape
    half = template.shape[0] // 2
    kernel = np.zeros((ny, nx), dtype=np.float32)
    centred = (template - template.mean()).astype(np.float32)
    norm = float(np.sqrt((centred * centred).sum())) or 1.0
    centred /= np.float32(norm)
    # Place the template with its centre at (0, 0), wrapping around.
    ys = (np.arange(-half, half + 1) % ny)[:, None]
    xs = (np.arange(-half, half + 1) % nx)[None, :]
    kernel[ys, xs] = centred
    product = scipy.fft.rfft2(prepared.coarse, workers=1) * np.conj(
        scipy.fft.rfft2(kernel, workers=1)
    )
    out: Float32Array = scipy.fft.irfft2(product, s=(ny, nx)).astype(np.float32)
    return out


def candidate_peaks(
    score_map: Float32Array, radius: float, *, limit: int | None = None
) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """Local maxima of ``score_map`` at least ~radius apart, best first.

    Parameters
    ----------
    score_map
        Binned map where particles are high (correlation or LoG).
    radius
        Particle radius in binned pixels; maxima are taken over a ``radius``-wide square and
        borders of ``radius/2`` are excluded.
    limit
        At most this many (default: one per (0.8 × diameter)² of area, the densest packing).

    Returns
    -------
    positions, values
        ``(n, 2)`` binned ``(x, y)``, and the map's value there.
    """
    size = max(3, round(radius) | 1)
    peaks = ndimage.maximum_filter(score_map, size=size, mode="nearest") == score_map
    border = max(1, int(radius / 2))
    peaks[:border] = peaks[-border:] = False
    peaks[:, :border] = peaks[:, -border:] = False
    ys, xs = np.nonzero(peaks)
    values = score_map[ys, xs].astype(np.float64)
    if limit is None:
        limit = max(10, int(score_map.size / (1.6 * radius) ** 2))
    order = np.argsort(-values, kind="stable")[:limit]
    return np.stack([xs[order], ys[order]], axis=1).astype(np.intp), values[order]


def _feature_names() -> list[str]:
    names = ["correlation", "log_small", "log_particle", "log_large"]
    names += [f"coarse_ring_mean_{i}" for i in range(N_RINGS)]
    names += [f"coarse_ring_std_{i}" for i in range(N_RINGS)]
    names += [f"fine_ring_std_{i}" for i in range(N_RINGS)]
    for channel in ("coarse", "fine"):
        names += [f"{channel}_harmonic_{k}_band_{b}" for b in range(len(BANDS)) for k in HARMONICS]
    names += ["core_p10", "core_p50", "core_p90"]
    return names


#: Names of the columns :func:`window_features` returns, in order.
FEATURE_NAMES = tuple(_feature_names())


class _Bases:
    """Ring masks and angular-harmonic bases for one window size (cached per size)."""

    cache: dict[tuple[int, float], _Bases] = {}  # noqa: RUF012 - a per-process cache

    def __init__(self, half: int, radius: float) -> None:
        y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
        r = np.hypot(x, y) / radius
        theta = np.arctan2(y, x)
        edges = np.linspace(0.0, 1.5, N_RINGS + 1)
        rings = np.stack([(r >= a) & (r < b) for a, b in itertools.pairwise(edges)])
        rings_flat = rings.reshape(N_RINGS, -1).astype(np.float64)
        self.rings = (rings_flat / np.maximum(rings_flat.sum(axis=1, keepdims=True), 1)).T.astype(
            np.float32
        )
        columns = []
        for a, b in BANDS:
            # The centre pixel has no angle: leaving it in would break rotation invariance.
            band = ((r >= a) & (r < b) & (r > 0)).ravel()
            count = max(int(band.sum()), 1)
            for k in HARMONICS:
                columns.append(band * np.exp(-1j * k * theta.ravel()) / math.sqrt(count))
        self.harmonics = np.stack(columns, axis=1).astype(np.complex64)
        self.core = (r <= 0.6).ravel()

    @classmethod
    def get(cls, half: int, radius: float) -> _Bases:
        key = (half, round(radius, 3))
        if key not in cls.cache:
            cls.cache[key] = cls(half, radius)
        return cls.cache[key]


def window_features(
    prepared: Prepared, correlation: Float32Array, centres: npt.NDArray[np.intp]
) -> Float32Array:
    """Rotation-invariant features of windows centred on binned positions.

    Per window: the template correlation and the LoG responses at three scales at the centre;
    ring means and standard deviations of the coarse channel (9 rings to 1.5 radii); ring
    standard deviations of the fine channel; magnitudes of angular harmonics 1-6 in three
    radial bands of both channels (rotation changes only their phases); deciles 10/50/90 of
    the core (within 0.6 radius). All vectorised as matrix products over the windows.

    Returns
    -------
    numpy.ndarray
        ``(n, len(FEATURE_NAMES))`` float32.
    """
    n = centres.shape[0]
    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    half = window_half(prepared.radius)
    bases = _Bases.get(half, prepared.radius)
    xs, ys = centres[:, 0], centres[:, 1]
    out[:, 0] = correlation[ys, xs]
    out[:, 1:4] = prepared.log_stack[:, ys, xs].T
    column = 4
    coarse = extract_windows(prepared.coarse, centres, half).reshape(n, -1)
    fine = extract_windows(prepared.fine, centres, half).reshape(n, -1)
    coarse_mean = coarse @ bases.rings
    coarse_sq = (coarse * coarse) @ bases.rings
    fine_mean = fine @ bases.rings
    fine_sq = (fine * fine) @ bases.rings
    out[:, column : column + N_RINGS] = coarse_mean
    column += N_RINGS
    out[:, column : column + N_RINGS] = np.sqrt(np.maximum(coarse_sq - coarse_mean**2, 0))
    column += N_RINGS
    out[:, column : column + N_RINGS] = np.sqrt(np.maximum(fine_sq - fine_mean**2, 0))
    column += N_RINGS
    width = bases.harmonics.shape[1]
    out[:, column : column + width] = np.abs(coarse @ bases.harmonics)
    column += width
    out[:, column : column + width] = np.abs(fine @ bases.harmonics)
    column += width
    out[:, column : column + 3] = np.percentile(coarse[:, bases.core], [10, 50, 90], axis=1).T
    return out
