"""Local micrograph descriptors of Xmipp's noisy-zone filter (ALGORITHMS.md §12.1).

``xmipp_coordinates_noisy_zones_filter`` scores picks by the local variance of the micrograph
(``scoreByVariance``) and the micrograph by a Gini coefficient (``scoreByGiniCoeff``). With
patch size P and ``h = P//2``:

1. Interval normalisation to the 25th/75th percentiles of 1000 random pixels. It is an
   affine map and every later quantity is invariant to affine maps of the image, so it is
   skipped (no randomness).
2. Relative variance map R: σ_pop of ``2h×2h`` windows centred on the grid
   ``{h, 2h, …, ≤ H−h} × {h, 2h, …, ≤ W−h}`` put into a zero image V, a Gaussian low-pass
   ``exp(−π²·h²·|f|²)`` (f in cycles/pixel per axis, periodic), division by mean(V), and a
   border band of width P that repeats the value at the clamped position
   ``V[clip(i, P, H−P), clip(j, P, W−P)]``.
3. Gini coefficient of the occupancy of a 256-bin histogram of R rescaled to [0, 1].
4. Per-pick score: R smoothed again with ``w1 = P//8``, sampled at the integer position.

Implementation: V is a sum of grid impulses and the Gaussian filter is separable, so the
smoothed map is exactly ``Gy·S·Gxᵀ`` with ``S`` the grid of window σ values and ``Gy``, ``Gx``
the columns of the periodic 1D kernels (inverse FFTs of the 1D filters). The border clamp
selects rows of ``Gy`` and ``Gx``; the second smoothing is a 1D FFT of each of their columns.
A 4096² micrograph therefore costs one pass for the window sums, one small matrix product
and a histogram, instead of full-size 2D FFTs. :class:`DescriptorsStep` uses this factorised
form; the public functions work on the dense map and give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from flybox.errors import ConfigError
from flybox.processors.base import Micrograph, MicrographProcessor, StepSettings
from flybox.processors.fft import irfftn_last, rfftn_last
from flybox.processors.jit import njit

__all__ = [
    "DescriptorsSettings",
    "DescriptorsStep",
    "gini_coefficient",
    "local_variance_scores",
    "relative_variance_map",
]

Float64Array = npt.NDArray[np.float64]

_BINS = 256
_CHUNK_ROWS = 256


@njit()
def _block_sums(
    image: Any, h: int, n_rows: int, n_cols: int, shift: float
) -> tuple[Any, Any]:  # pragma: no cover - compiled
    # Sums and sums of squares (float64) of ``image − shift`` over the h×h blocks covering the
    # window grid. The shift (a rough image mean) keeps E[x²] − E[x]² accurate when the
    # intensities sit on a large offset; σ does not depend on it.
    s1 = np.zeros((n_rows, n_cols), dtype=np.float64)
    s2 = np.zeros((n_rows, n_cols), dtype=np.float64)
    for i in range(n_rows * h):
        a = i // h
        for b in range(n_cols):
            t1 = 0.0
            t2 = 0.0
            for j in range(b * h, (b + 1) * h):
                value = np.float64(image[i, j]) - shift
                t1 += value
                t2 += value * value
            s1[a, b] += t1
            s2[a, b] += t2
    return s1, s2


@njit()
def _histogram(
    values: Any, lo: float, hi: float, row_weights: Any, col_weights: Any, counts: Any
) -> None:  # pragma: no cover - compiled
    # numpy.histogram(q, 256, (0, 1)) of q = (v − lo)/(hi − lo): the edges k/256 are exact,
    # so the bin is floor(256·q), with q = 1 in the last bin. A flat map goes to bin 0.
    span = hi - lo
    for r in range(values.shape[0]):
        weight = row_weights[r]
        for c in range(values.shape[1]):
            value = values[r, c]
            if value != value:
                continue
            index = 0
            if span > 0:
                index = int(((value - lo) / span) * 256.0)
                if index > 255:
                    index = 255
            counts[index] += weight * col_weights[c]


def _periodic_gaussian(n: int, width: int) -> Float64Array:
    """Impulse response of the filter ``exp(−π²·w²·f²)``, f = k/n, on a periodic axis."""
    freq = np.arange(n // 2 + 1, dtype=np.float64) / n
    response = np.exp(-(np.pi**2) * float(width) ** 2 * freq**2).astype(np.complex128)
    kernel: Float64Array = irfftn_last(response, (n,)).astype(np.float64)
    return kernel


def _smooth_rows(values: Float64Array, width: int) -> Float64Array:
    """Periodic Gaussian smoothing ``exp(−π²·w²·f²)`` of each row of ``values``.

    Batched 1D real transforms keep memory at the size of the input; smoothing the rows and
    then the columns is exactly the separable 2D filter.
    """
    n = values.shape[-1]
    freq = np.arange(n // 2 + 1, dtype=np.float64) / n
    response = np.exp(-(np.pi**2) * float(width) ** 2 * freq**2)
    spectrum = rfftn_last(np.ascontiguousarray(values, dtype=np.float64), ndim=1) * response
    smoothed: Float64Array = irfftn_last(spectrum, (n,)).astype(np.float64, copy=False)
    return smoothed


@dataclass(frozen=True)
class _Axis:
    """The clamped Gaussian columns of one axis: value of row i is ``kernel[index[i]]``."""

    kernel: Float64Array  # (n_unique, n_centres) Gaussian columns at the unique clamped rows
    index: npt.NDArray[np.intp]  # (n,) row i -> unique row
    weights: npt.NDArray[np.int64]  # (n_unique,) rows sharing each unique row


def _axis(n: int, h: int, patch: int, n_centres: int) -> _Axis:
    centres = h * np.arange(1, n_centres + 1)
    clamped = np.clip(np.arange(n), patch, n - patch)
    unique, index, weights = np.unique(clamped, return_inverse=True, return_counts=True)
    kernel = _periodic_gaussian(n, h)[(unique[:, None] - centres[None, :]) % n]
    return _Axis(kernel, index.astype(np.intp), weights.astype(np.int64))


@dataclass(frozen=True)
class _VarianceModel:
    """Factorised relative variance map: ``R[i, j] = rows[i] · core · cols[j]``."""

    shape: tuple[int, int]
    patch: int
    rows: _Axis
    cols: _Axis
    core: Float64Array  # window σ grid divided by mean(V)
    flat: bool  # no variance anywhere: R ≡ 1

    def unique_chunks(self) -> Iterator[tuple[int, Float64Array]]:
        """Yield ``(start, values)`` blocks of the map at the unique rows and columns."""
        left = self.rows.kernel @ self.core
        right = np.ascontiguousarray(self.cols.kernel.T)
        for start in range(0, left.shape[0], _CHUNK_ROWS):
            block: Float64Array = left[start : start + _CHUNK_ROWS] @ right
            if self.flat:
                block = np.ones_like(block)
            yield start, block

    def dense(self) -> Float64Array:
        """The full ``(H, W)`` map."""
        unique = np.empty((self.rows.weights.size, self.cols.weights.size), dtype=np.float64)
        for start, block in self.unique_chunks():
            unique[start : start + block.shape[0]] = block
        dense: Float64Array = unique[np.ix_(self.rows.index, self.cols.index)]
        return dense

    def gini(self) -> float:
        """Gini coefficient of the map (same as :func:`gini_coefficient` of :meth:`dense`)."""
        blocks = list(self.unique_chunks())
        lo = min(float(np.nanmin(block)) for _, block in blocks)
        hi = max(float(np.nanmax(block)) for _, block in blocks)
        counts = np.zeros(_BINS, dtype=np.int64)
        for start, block in blocks:
            weights = self.rows.weights[start : start + block.shape[0]]
            _histogram(block, lo, hi, weights, self.cols.weights, counts)
        return _gini_from_counts(counts)

    def scores(self, x_int: npt.ArrayLike, y_int: npt.ArrayLike) -> Float64Array:
        """Second smoothing (``w1 = P//8``) sampled at integer positions (clipped)."""
        ny, nx = self.shape
        xs = np.clip(np.asarray(x_int, dtype=np.int64), 0, nx - 1)
        ys = np.clip(np.asarray(y_int, dtype=np.int64), 0, ny - 1)
        if self.flat:
            return np.ones(xs.shape, dtype=np.float64)
        width = self.patch // 8
        rows = _smooth_rows(self.rows.kernel[self.rows.index].T, width).T
        cols = _smooth_rows(self.cols.kernel[self.cols.index].T, width).T
        scores: Float64Array = np.einsum("nk,kl,nl->n", rows[ys], self.core, cols[xs])
        return scores


def _variance_model(image: npt.NDArray[Any], patch: int) -> _VarianceModel:
    source = np.asarray(image)
    if source.ndim != 2:
        raise ValueError(f"expected a 2D micrograph, got shape {source.shape}")
    ny, nx = source.shape
    if patch < 2 or patch > min(ny, nx):
        raise ValueError(f"patch size {patch} must lie in [2, {min(ny, nx)}] for a {nx}x{ny} image")
    h = patch // 2
    n_rows, n_cols = ny // h - 1, nx // h - 1
    stride = max(1, int(np.sqrt(ny * nx / 65536)))
    shift = float(np.mean(source[::stride, ::stride], dtype=np.float64))
    s1, s2 = _block_sums(source, h, n_rows + 1, n_cols + 1, shift if np.isfinite(shift) else 0.0)

    def windows(blocks: Float64Array) -> Float64Array:
        total: Float64Array = blocks[:-1, :-1] + blocks[:-1, 1:] + blocks[1:, :-1] + blocks[1:, 1:]
        return total

    n = float(4 * h * h)
    mean = windows(s1) / n
    sigma = np.sqrt(np.abs(windows(s2) / n - mean * mean))
    rows = _axis(ny, h, patch, n_rows)
    cols = _axis(nx, h, patch, n_cols)
    gain_y = float(_periodic_gaussian(ny, h).sum())
    gain_x = float(_periodic_gaussian(nx, h).sum())
    mean_v = gain_y * gain_x * float(sigma.sum()) / (ny * nx)
    flat = not mean_v > 0
    core = np.zeros_like(sigma) if flat else sigma / mean_v
    return _VarianceModel((ny, nx), patch, rows, cols, core, flat)


def _gini_from_counts(counts: npt.NDArray[np.int64]) -> float:
    ordered = np.sort(counts).astype(np.float64)
    area = float(np.sum(np.cumsum(ordered) - ordered / 2.0))
    fair = float(ordered.sum()) * _BINS / 2.0
    return (fair - area) / fair if fair > 0 else 0.0


def relative_variance_map(image: npt.NDArray[Any], patch: int) -> Float64Array:
    """Xmipp's relative variance map R (ALGORITHMS.md §12.1 steps 2.1–2.6).

    The interval normalisation (step 1) is skipped: it is an affine map of the image and R
    is invariant to affine maps (σ scales, the division by mean(V) cancels the scale).

    Parameters
    ----------
    image
        ``(H, W)`` micrograph, any real dtype (a memory map is read, never copied).
    patch
        Patch size P in pixels (Scipion: ``int(1.5 × box)``); windows are ``2·(P//2)`` wide.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float64 map with mean ≈ 1 before the border clamp. A micrograph without
        any variance gives a map of ones (Xmipp would divide 0 by 0).

    Raises
    ------
    ValueError
        When ``patch`` is below 2 or larger than the image.
    """
    return _variance_model(image, patch).dense()


def gini_coefficient(rel_map: npt.NDArray[np.floating]) -> float:
    """Xmipp's ``scoreByGiniCoeff`` of a relative variance map (§12.1 step 3).

    The map is rescaled to [0, 1] by its min and max and binned into 256 bins (the maximum
    in the last bin, as ``numpy.histogram(q, 256, (0, 1))``). With the counts sorted
    ascending, ``c₁ ≤ … ≤ c₂₅₆`` and ``C_k = Σ_{m≤k} c_m``::

        area = Σ_k (C_k − c_k/2),   fair = n·256/2,   G = (fair − area)/fair

    so G = 0 when every bin holds the same number of pixels and 255/256 when all pixels share
    one bin (a flat map). It measures how unequally the bins are occupied.

    Parameters
    ----------
    rel_map
        Relative variance map (any shape; NaNs are ignored).

    Returns
    -------
    float
        The coefficient in [0, 255/256].
    """
    values = np.asarray(rel_map, dtype=np.float64)
    if values.size == 0:
        return 0.0
    values = values.reshape(values.shape[0] if values.ndim else 1, -1)
    counts = np.zeros(_BINS, dtype=np.int64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    _histogram(
        values,
        lo,
        hi,
        np.ones(values.shape[0], dtype=np.int64),
        np.ones(values.shape[1], dtype=np.int64),
        counts,
    )
    return _gini_from_counts(counts)


def local_variance_scores(
    rel_map: npt.NDArray[np.floating],
    x_int: npt.ArrayLike,
    y_int: npt.ArrayLike,
    patch: int,
) -> Float64Array:
    """Xmipp's ``scoreByVariance`` of picks (§12.1 step 4).

    The map is smoothed again with the periodic Gaussian ``exp(−π²·w1²·|f|²)``,
    ``w1 = P//8`` (σ = w1/√2 px), and sampled at the integer positions.

    Parameters
    ----------
    rel_map
        ``(H, W)`` relative variance map from :func:`relative_variance_map`.
    x_int, y_int
        Integer pick positions (column, row) in pixels; positions outside the image are
        clipped to the nearest edge pixel.
    patch
        Patch size P used for the map.

    Returns
    -------
    numpy.ndarray
        One float64 score per pick.
    """
    values = np.asarray(rel_map, dtype=np.float64)
    ny, nx = values.shape
    width = patch // 8
    xs = np.clip(np.asarray(x_int, dtype=np.int64), 0, nx - 1)
    ys = np.clip(np.asarray(y_int, dtype=np.int64), 0, ny - 1)
    # Smooth along x everywhere, then along y only in the columns that hold picks.
    columns, which = np.unique(xs, return_inverse=True)
    along_x = _smooth_rows(values, width)
    along_y = _smooth_rows(along_x[:, columns].T, width)
    scores: Float64Array = along_y[which.reshape(-1), ys.reshape(-1)].reshape(xs.shape)
    return scores


class DescriptorsSettings(StepSettings):
    """Settings of the ``descriptors`` step.

    Attributes
    ----------
    patch_size
        Patch size P in pixels; ``None`` takes Scipion's default ``int(1.5 × extraction box)``.
    """

    patch_size: int | None = Field(default=None, ge=2)


class DescriptorsStep(MicrographProcessor[DescriptorsSettings]):
    """Xmipp's local variance and Gini descriptors (``doEvalVar``), per micrograph.

    Adds the per-pick columns ``flyboxLocalVariance`` (score at the truncated pick position)
    and ``flyboxGini`` (the micrograph value on every row) to a copy of the picks, and sets
    ``stats["gini"]`` and ``stats["local_variance_median"]`` (the latter only when there are
    picks).
    """

    name: ClassVar[str] = "descriptors"
    Settings: ClassVar[type[StepSettings]] = DescriptorsSettings

    def __init__(self, settings: DescriptorsSettings) -> None:
        super().__init__(settings)
        self._extraction_box: int | None = None

    def bind(self, extraction_box: int) -> None:
        """Remember the extraction box, which sets the default patch size."""
        self._extraction_box = int(extraction_box)
        if self.patch_size < 2:
            raise ConfigError(
                "descriptors.patch_size",
                f"patch size {self.patch_size} px is too small (extraction box {extraction_box})",
            )

    @property
    def patch_size(self) -> int:
        """The patch size P in pixels."""
        if self.settings.patch_size is not None:
            return self.settings.patch_size
        if self._extraction_box is None:
            raise ConfigError(
                "descriptors.patch_size",
                "no patch size: set patch_size or bind the step to the extraction box",
            )
        return int(1.5 * self._extraction_box)

    def apply(self, micrograph: Micrograph) -> Micrograph:
        """Return a copy of ``micrograph`` with descriptor columns and statistics."""
        model = _variance_model(micrograph.image, self.patch_size)
        gini = model.gini()
        picks = micrograph.picks.copy()
        xs = np.trunc(picks["rlnCoordinateX"].to_numpy(dtype=np.float64)) if len(picks) else []
        ys = np.trunc(picks["rlnCoordinateY"].to_numpy(dtype=np.float64)) if len(picks) else []
        scores = model.scores(np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64))
        picks["flyboxLocalVariance"] = scores
        picks["flyboxGini"] = gini
        result = micrograph.with_picks(picks)
        result.stats = dict(micrograph.stats)
        result.stats["gini"] = gini
        if scores.size:
            result.stats["local_variance_median"] = float(np.median(scores))
        return result
