"""Per-particle normalisation and contrast inversion (ALGORITHMS.md §5, §6).

Methods (``method``):

``whole``
    ``(x − mean(all)) / σ(all)`` (Xmipp OldXmipp).
``background``
    ``(x − μ_bg) / σ_bg`` over the background ring (RELION ``--norm --no_ramp``, Xmipp NewXmipp).
``ramp``
    Least-squares plane ``a·j + b·i + c`` fitted to the background (logical coordinates,
    centre N//2) and subtracted from every pixel; then RELION divides ``(x − μ_bg)`` by σ_bg,
    while Xmipp only divides by σ_bg (no mean subtraction) and only if σ_bg > 1e−6.
``none``
    Nothing (dust removal still runs when enabled).

Convention details (``convention`` sets them; explicit settings override):

=====================  ===========================  ==============================
                       relion                       xmipp
=====================  ===========================  ==============================
background set         ``i² + j² > R²`` (strict)    ``i² + j² ≥ R²`` (inclusive)
σ estimator            population (n)               sample (n − 1)
default radius R       ``int(0.375 · box)``         ``int(box / 2)``
ramp mean subtraction  yes                          no
=====================  ===========================  ==============================

Radii are given for the extraction box and scaled to each stream with RELION's rule
``int(R · M / N)``. RELION's per-particle dust removal (``white_dust``/``black_dust``, random
replacement from the background distribution) runs first when enabled, with seeds derived
from the micrograph name and pick position so that reruns give identical particles.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from flybox.errors import ConfigError
from flybox.processors.base import ParticleProcessor, ParticleStack, StepSettings, scaled_radius
from flybox.processors.jit import njit
from flybox.types import ImageStats

__all__ = [
    "InvertSettings",
    "InvertStep",
    "NormalizeSettings",
    "NormalizeStep",
    "background_mask",
    "normalize_images",
    "particle_seeds",
]

Method = Literal["none", "whole", "background", "ramp"]

#: numba's fast-math flags for the kernels' sums: reassociation (vectorised sums, fused
#: multiply-add), not the no-NaN/no-Inf assumptions that ``fastmath=True`` adds. A non-finite
#: pixel therefore always reaches the sums, and the worker checks a stack's finiteness on
#: its statistics instead of on its pixels (:func:`flybox.pipeline.job.run_job`).
_SUMS_MATH = {"reassoc", "contract", "nsz", "arcp"}


class NormalizeSettings(StepSettings):
    """Settings of the ``normalize`` step (see the module docstring for the conventions).

    Attributes
    ----------
    method
        ``none``, ``whole``, ``background`` or ``ramp``.
    bg_radius
        Background radius in pixels of the extraction box; ``None`` takes the convention's
        default. Scaled to each stream as ``int(R · M / N)``.
    convention
        ``relion`` or ``xmipp``: defaults for the four settings below.
    sigma
        ``population`` or ``sample`` σ estimator.
    background
        ``strict`` (r² > R²) or ``inclusive`` (r² ≥ R²).
    ramp_mean
        Subtract the background mean after removing the plane (RELION yes, Xmipp no).
    white_dust, black_dust
        RELION per-particle dust thresholds in σ; ≤ 0 disables.
    """

    method: Method = "ramp"
    bg_radius: float | None = Field(default=None, gt=0)
    convention: Literal["relion", "xmipp"] = "relion"
    sigma: Literal["population", "sample"] | None = None
    background: Literal["strict", "inclusive"] | None = None
    ramp_mean: bool | None = None
    white_dust: float = -1.0
    black_dust: float = -1.0


@lru_cache(maxsize=64)
def background_mask(box: int, radius: int, inclusive: bool) -> npt.NDArray[np.bool_]:
    """Background pixels of a ``box``-sized image: ``r² > R²`` (or ``≥`` when inclusive).

    Logical coordinates have their origin at ``box//2`` on both axes. The returned array is
    read-only (it is cached and shared).
    """
    index = np.arange(box) - box // 2
    r2 = index[:, None] ** 2 + index[None, :] ** 2
    mask = r2 >= radius * radius if inclusive else r2 > radius * radius
    mask.setflags(write=False)
    return mask


@dataclass(frozen=True)
class _Geometry:
    """The background of one (box, radius, set) as row segments, and its plane-fit matrix.

    In row ``r`` the pixels ``[inside_start[r], inside_stop[r])`` are *not* background (the
    disc is convex, so they are contiguous); every other pixel of the row is.
    """

    inside_start: npt.NDArray[np.int64]
    inside_stop: npt.NDArray[np.int64]
    count: int
    sum_j: float
    sum_i: float
    gram_inverse: npt.NDArray[np.float64]


@lru_cache(maxsize=64)
def _geometry(box: int, radius: int, inclusive: bool, whole: bool) -> _Geometry:
    mask = np.ones((box, box), dtype=bool) if whole else background_mask(box, radius, inclusive)
    start = np.full(box, box, dtype=np.int64)
    stop = np.full(box, box, dtype=np.int64)
    for row in range(box):
        inside = np.flatnonzero(~mask[row])
        if inside.size:
            start[row], stop[row] = inside[0], inside[-1] + 1
    rows, cols = np.nonzero(mask)
    design = np.stack([cols - box // 2, rows - box // 2, np.ones(rows.size)], axis=1)
    gram_inverse = np.linalg.inv(design.T @ design) if rows.size >= 3 else np.zeros((3, 3))
    return _Geometry(
        start,
        stop,
        int(rows.size),
        float((cols - box // 2).sum()),
        float((rows - box // 2).sum()),
        np.ascontiguousarray(gram_inverse, dtype=np.float64),
    )


@njit(fastmath=_SUMS_MATH)
def _background_sums(
    image: npt.NDArray[np.float32],
    inside_start: npt.NDArray[np.int64],
    inside_stop: npt.NDArray[np.int64],
    ref: float,
) -> tuple[float, float, float, float]:  # pragma: no cover - compiled
    # Σv, Σv·j, Σv·i, Σv² over the background, v = x − ref; the fast-math flags only reorder
    # these float64 sums (vectorised), pixel values are untouched.
    ny, nx = image.shape
    cy = ny // 2
    cx = nx // 2
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for r in range(ny):
        row0 = 0.0
        row1 = 0.0
        row3 = 0.0
        for c in range(inside_start[r]):
            v = image[r, c] - ref
            row0 += v
            row1 += v * (c - cx)
            row3 += v * v
        for c in range(inside_stop[r], nx):
            v = image[r, c] - ref
            row0 += v
            row1 += v * (c - cx)
            row3 += v * v
        s0 += row0
        s1 += row1
        s2 += row0 * (r - cy)
        s3 += row3
    return s0, s1, s2, s3


@njit(fastmath=_SUMS_MATH)
def _image_sums(
    image: npt.NDArray[np.float32], sums: npt.NDArray[np.float64]
) -> None:  # pragma: no cover
    # Σv, Σv² with v = x − x₀ (x₀ the first pixel), for the stack header (min and max are
    # taken by numpy afterwards: its SIMD reductions are several times faster than a loop).
    ref = np.float64(image[0, 0])
    s1 = 0.0
    s2 = 0.0
    for r in range(image.shape[0]):
        row = image[r]
        for c in range(row.size):
            d = np.float64(row[c]) - ref
            s1 += d
            s2 += d * d
    sums[0] = s1
    sums[1] = s2
    sums[2] = ref


@njit(fastmath=_SUMS_MATH)
def _min_max(image: npt.NDArray[np.float32]) -> tuple[float, float]:  # pragma: no cover
    low = np.float32(np.inf)
    high = np.float32(-np.inf)
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            low = min(low, image[r, c])
            high = max(high, image[r, c])
    return np.float64(low), np.float64(high)


@njit()
def _normalize_batch(
    images: npt.NDArray[np.float32],
    inside_start: npt.NDArray[np.int64],
    inside_stop: npt.NDArray[np.int64],
    gram_inverse: npt.NDArray[np.float64],
    count: int,
    sum_j: float,
    sum_i: float,
    mode: int,
    ddof: int,
    ramp_mean: bool,
    min_sigma: float,
    sign: float,
    mask: npt.NDArray[np.float32],
    fill: int,
    fill_value: float,
    removed: float,
    out: npt.NDArray[np.float32],
    sums: npt.NDArray[np.float64],
) -> None:  # pragma: no cover - compiled
    # One image at a time, while it is in the CPU cache: background sums, the fit in closed
    # form, then out = (x − a·j − b·i − c)·s, an optional mask, and the output's statistics.
    # mode: 0 none, 1 whole, 2 background, 3 ramp (see normalize_images).
    # fill (mask): -1 no mask, 0 multiply, 1 value, 2 min, 3 max, 4 avg, 5 soft_background;
    # the result equals apply_mask() on the float32 normalised image. removed = Σ(1−m).
    n, ny, nx = images.shape
    cy = ny // 2
    cx = nx // 2
    first_row = 0
    while first_row < ny and inside_start[first_row] == 0 and inside_stop[first_row] == nx:
        first_row += 1
    first_col = 0 if inside_start[min(first_row, ny - 1)] > 0 else inside_stop[first_row]
    for k in range(n):
        image = images[k]
        slope_x = 0.0
        slope_y = 0.0
        offset = 0.0
        scale = sign
        if mode != 0:
            ref = np.float64(image[first_row, first_col])
            s0, s1, s2, s3 = _background_sums(image, inside_start, inside_stop, ref)
            if mode == 3:
                # Least squares on v = x − ref: β = G⁻¹·[Σv·j, Σv·i, Σv]; RSS = Σv² − β·rhs.
                b0 = gram_inverse[0, 0] * s1 + gram_inverse[0, 1] * s2 + gram_inverse[0, 2] * s0
                b1 = gram_inverse[1, 0] * s1 + gram_inverse[1, 1] * s2 + gram_inverse[1, 2] * s0
                b2 = gram_inverse[2, 0] * s1 + gram_inverse[2, 1] * s2 + gram_inverse[2, 2] * s0
                slope_x = b0
                slope_y = b1
                mean = (s0 - b0 * sum_j - b1 * sum_i - b2 * count) / count
                squares = s3 - (b0 * s1 + b1 * s2 + b2 * s0)
                residual_mean = mean
                plane_offset = b2 + ref
            else:
                mean_v = s0 / count
                mean = mean_v + ref
                squares = s3 - s0 * mean_v
                residual_mean = 0.0
                plane_offset = 0.0
            variance = (squares - count * residual_mean * residual_mean) / (count - ddof)
            sigma = np.sqrt(max(variance, 0.0))
            # Below min_sigma both programs leave the division (and the mean) out; a fitted
            # ramp is still removed.
            small = sigma < min_sigma
            offset = plane_offset
            if not small and (mode != 3 or ramp_mean):
                offset += mean
            scale = sign if small else sign / sigma
        target = out[k]
        # The fill value's sum is taken row by row while the row is in L1 (avg: Σx; soft
        # background: Σ(1−m)·x), so that masking adds one pass, not two.
        accumulated = 0.0
        for r in range(ny):
            row_offset = slope_y * (r - cy) + offset
            for c in range(nx):
                target[r, c] = (image[r, c] - slope_x * (c - cx) - row_offset) * scale
            if fill == 4:
                accumulated += _row_sum(target[r])
            elif fill == 5:
                accumulated += _row_removed_sum(target[r], mask[r])
        if fill < 0:
            _image_sums(target, sums[k])
            continue
        if fill == 5:
            value = np.float32(accumulated / removed) if removed > 0 else np.float32(0.0)
        elif fill == 4:
            value = np.float32(accumulated / target.size)
        elif fill >= 2:
            low, high = _min_max(target)
            value = np.float32(low if fill == 2 else high)
        else:
            value = np.float32(fill_value if fill == 1 else 0.0)
        _substitute_sums(target, mask, value, sums[k])


@njit(fastmath=_SUMS_MATH)
def _row_sum(row: npt.NDArray[np.float32]) -> float:  # pragma: no cover - compiled
    total = 0.0
    for c in range(row.size):
        total += row[c]
    return total


@njit(fastmath=_SUMS_MATH)
def _row_removed_sum(
    row: npt.NDArray[np.float32], mask_row: npt.NDArray[np.float32]
) -> float:  # pragma: no cover - compiled
    total = 0.0
    for c in range(row.size):
        total += (1.0 - np.float64(mask_row[c])) * row[c]
    return total


@njit(fastmath=_SUMS_MATH)
def _substitute_sums(
    image: npt.NDArray[np.float32],
    mask: npt.NDArray[np.float32],
    value: np.float32,
    sums: npt.NDArray[np.float64],
) -> None:  # pragma: no cover - compiled
    # x·m + v·(1−m) in place (apply_mask's formula; fastmath may fuse it into one rounding),
    # with the statistics of the result (as _image_sums) in the same pass.
    one = np.float32(1.0)
    ref = np.float64(image[0, 0] * mask[0, 0] + value * (one - mask[0, 0]))
    s1 = 0.0
    s2 = 0.0
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            result = image[r, c] * mask[r, c] + value * (one - mask[r, c])
            image[r, c] = result
            d = np.float64(result) - ref
            s1 += d
            s2 += d * d
    sums[0] = s1
    sums[1] = s2
    sums[2] = ref


_MODES = {"none": 0, "whole": 1, "background": 2, "ramp": 3}
_FILLS = {"multiply": 0, "value": 1, "min": 2, "max": 3, "avg": 4, "soft_background": 5}
_NO_MASK = np.ones((1, 1), dtype=np.float32)


def normalize_images(
    images: npt.NDArray[np.float32],
    *,
    method: Method,
    radius: int,
    ddof: int = 0,
    inclusive: bool = False,
    ramp_mean: bool = True,
    min_sigma: float = 1e-10,
    sign: float = 1.0,
    mask: npt.NDArray[np.float32] | None = None,
    fill: str = "multiply",
    fill_value: float = 0.0,
    out: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], ImageStats]:
    """Normalise a batch of ``(n, b, b)`` images; returns a float32 array and its stats.

    Parameters
    ----------
    images
        Particle images.
    method
        ``none``, ``whole``, ``background`` or ``ramp``.
    radius
        Background radius in pixels of these images (ignored for ``whole``/``none``).
    ddof
        0 for the population σ (RELION), 1 for the sample σ (Xmipp).
    inclusive
        Background is ``r² ≥ R²`` instead of ``r² > R²``.
    ramp_mean
        After removing the plane, also subtract the background mean (RELION).
    min_sigma
        Below this σ the division is skipped (RELION warns and skips at 1e−10; Xmipp's ramp
        skips at 1e−6).
    sign
        −1 also inverts the contrast (an ``invert`` step folded into this pass).
    mask, fill, fill_value
        A ``(b, b)`` mask applied to the result in the same pass (a ``mask`` step folded into
        this one), with :func:`flybox.processors.mask.fill_rule`'s rule; the result equals
        :func:`flybox.processors.mask.apply_mask` on the normalised images.
    out
        Where to write the result: a new array when ``None``; may be ``images`` itself (a
        C-contiguous float32 array), which saves allocating (and page-faulting) a stack.

    Returns
    -------
    images, stats
        The normalised images and their statistics (for the stack header).

    Raises
    ------
    ValueError
        When the background is empty (radius too large for the box).

    Notes
    -----
    One compiled pass per image, while it sits in the CPU cache: the background sums
    ``Σv, Σv·j, Σv·i, Σv²`` (``v = x − x₀``, ``x₀`` a background pixel, which keeps the float64
    sums well conditioned for raw data with a large offset), then the plane (3×3 normal
    equations), mean and σ in closed form, then the output ``(x − plane − μ)/σ`` with its
    statistics.
    """
    n, box, _ = images.shape
    images = np.ascontiguousarray(images, dtype=np.float32)
    geometry = _geometry(box, radius, inclusive, method in ("whole", "none"))
    count = geometry.count
    if method != "none" and (count <= ddof or (method == "ramp" and count < 3)):
        raise ValueError(f"background radius {radius} leaves no background in a {box}-px box")
    if out is None:
        out = np.empty_like(images)
    elif out.shape != images.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of the images' shape")
    sums = np.empty((n, 3))  # per image: Σv, Σv², x₀ (v = x − x₀)
    mask_array = _NO_MASK if mask is None else np.ascontiguousarray(mask, dtype=np.float32)
    removed = float(np.sum(1.0 - mask_array.astype(np.float64)))  # Σ(1−m), soft fill
    low, high = np.inf, -np.inf
    # In chunks of a few images, so that numpy's min/max read them while they are in cache.
    chunk = max(1, (1 << 20) // (4 * box * box))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        _normalize_batch(
            images[start:stop],
            geometry.inside_start,
            geometry.inside_stop,
            geometry.gram_inverse,
            count,
            geometry.sum_j,
            geometry.sum_i,
            _MODES[method],
            ddof,
            ramp_mean,
            min_sigma,
            sign,
            mask_array,
            -1 if mask is None else _FILLS[fill],
            fill_value,
            removed,
            out[start:stop],
            sums[start:stop],
        )
        # np.minimum/np.maximum, unlike min()/max(), keep a NaN.
        low = float(np.minimum(low, out[start:stop].min()))
        high = float(np.maximum(high, out[start:stop].max()))
    size = box * box
    mean_delta = sums[:, 0] / size
    variances = np.maximum(sums[:, 1] / size - mean_delta**2, 0.0)
    if not n:
        low = high = 0.0
    return out, ImageStats(low, high, sums[:, 2] + mean_delta, variances)


def _writable_float32(images: npt.NDArray[Any]) -> bool:
    return bool(images.dtype == np.float32 and images.flags.writeable and images.flags.c_contiguous)


def particle_seeds(table: pd.DataFrame) -> npt.NDArray[np.uint64]:
    """Reproducible per-particle RNG seeds from micrograph name and pick position."""
    names = (
        table["rlnMicrographName"].astype(str).to_numpy()
        if "rlnMicrographName" in table
        else np.full(len(table), "")
    )
    xs = table["rlnCoordinateX"].to_numpy(dtype=np.float64)
    ys = table["rlnCoordinateY"].to_numpy(dtype=np.float64)
    seeds = [
        zlib.crc32(f"{name}:{x:.3f}:{y:.3f}".encode())
        for name, x, y in zip(names, xs, ys, strict=True)
    ]
    return np.asarray(seeds, dtype=np.uint64)


class NormalizeStep(ParticleProcessor[NormalizeSettings]):
    """Normalise every particle of every stream (RELION or Xmipp conventions)."""

    name: ClassVar[str] = "normalize"
    Settings: ClassVar[type[StepSettings]] = NormalizeSettings

    def __init__(self, settings: NormalizeSettings) -> None:
        super().__init__(settings)
        relion = settings.convention == "relion"
        sigma = settings.sigma or ("population" if relion else "sample")
        background = settings.background or ("strict" if relion else "inclusive")
        self.ddof = 0 if sigma == "population" else 1
        self.inclusive = background == "inclusive"
        self.ramp_mean = relion if settings.ramp_mean is None else settings.ramp_mean
        self.min_sigma = 1e-10 if (relion or settings.method != "ramp") else 1e-6
        self.default_fraction = 0.375 if relion else 0.5
        self.sign = 1.0
        self.mask_step: Any = None

    def absorb(self, following: ParticleProcessor[Any]) -> bool:  # type: ignore[override]
        """Fold a following ``invert`` (x → −x), then a following ``mask``, into the
        normalisation pass: both are free there, while as steps of their own each costs a
        pass over every particle (measured: a mask step added ~20 % to the chain)."""
        from flybox.processors.mask import MaskStep

        if isinstance(following, InvertStep) and self.mask_step is None:
            self.sign = -self.sign
            return True
        if isinstance(following, MaskStep) and self.mask_step is None:
            self.mask_step = following
            return True
        return False

    def bind(self, extraction_box: int) -> None:
        """Check the background radius against the extraction box."""
        radius = self.settings.bg_radius
        if radius is not None and 2 * radius > extraction_box:
            raise ConfigError(
                "normalize.bg_radius",
                f"background radius {radius:g} px is larger than half the {extraction_box}-px box",
            )

    def radius_for(self, stack: ParticleStack) -> int:
        """Background radius in pixels of ``stack``'s images."""
        assert stack.sampled_box is not None
        if self.settings.bg_radius is None:
            radius = self.default_fraction * stack.extraction_box
        else:
            radius = self.settings.bg_radius
        return scaled_radius(radius, stack.sampled_box, stack.extraction_box)

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Dust removal (if enabled), then normalisation, on every particle of ``stack``."""
        images = stack.real()
        radius = self.radius_for(stack)
        if self.settings.white_dust > 0 or self.settings.black_dust > 0:
            from flybox.processors.dust import remove_dust_relion  # numba: only when used

            images = remove_dust_relion(
                images,
                radius,
                self.settings.white_dust,
                self.settings.black_dust,
                particle_seeds(stack.table),
            )
        mask, fill, fill_value = None, "multiply", 0.0
        if self.mask_step is not None:
            from flybox.processors.mask import fill_rule

            step = self.mask_step
            mask = step.mask_for(stack.box, stack.extraction_box, stack.sampled_box)
            fill_value = step.settings.fill_value
            fill = fill_rule(mask, step.settings.fill, fill_value, step.settings.binary)
        normalized, stats = normalize_images(
            images,
            method=self.settings.method,
            radius=radius,
            ddof=self.ddof,
            inclusive=self.inclusive,
            ramp_mean=self.ramp_mean,
            min_sigma=self.min_sigma,
            sign=self.sign,
            mask=mask,
            fill=fill,
            fill_value=fill_value,
            # The stack owns writable images (steps replace or modify them): normalise in
            # place rather than allocate another stack.
            out=images if _writable_float32(images) else None,
        )
        return stack.set_real(normalized, stats)


class InvertSettings(StepSettings):
    """The ``invert`` step has no settings."""


class InvertStep(ParticleProcessor[InvertSettings]):
    """Contrast inversion ``x → −x`` (RELION; equal to Xmipp's after normalisation, §5)."""

    name: ClassVar[str] = "invert"
    Settings: ClassVar[type[StepSettings]] = InvertSettings

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Negate every pixel."""
        images = stack.real()
        if images.flags.writeable:
            np.negative(images, out=images)
            return stack.set_real(images)
        return stack.set_real(np.negative(images))
