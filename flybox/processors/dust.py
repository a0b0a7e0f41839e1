"""Dust (outlier pixel) removal: Xmipp per micrograph, RELION per particle (ALGORITHMS.md §4).

* :func:`remove_dust_xmipp` is Xmipp's ``--bad_pixels outliers t`` (BadPixelFilter →
  pixelDesvFilter → boundMedianFilter): deterministic, iterative 5×5 median of good
  neighbours. :class:`DustStep` runs it as a micrograph step.
* :func:`remove_dust_relion` is RELION's ``--white_dust/--black_dust`` inside ``--norm``:
  outliers relative to the background statistics of each particle are replaced by Gaussian
  noise, drawn here from seeded generators so that reruns are reproducible.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from flybox.processors.base import Micrograph, MicrographProcessor, StepSettings
from flybox.processors.jit import njit

__all__ = ["DustSettings", "DustStep", "remove_dust_relion", "remove_dust_xmipp"]

FloatArray = npt.NDArray[np.float32]


@njit()
def _image_stats(image: Any) -> tuple[float, float]:  # pragma: no cover - compiled
    # Xmipp's computeStats: sequential double sums; the n/(n-1) factor is integer arithmetic
    # there (1 for n > 2), so this is σ_pop; |var| guards against round-off (as Xmipp does).
    ny, nx = image.shape
    total = 0.0
    total2 = 0.0
    for i in range(ny):
        for j in range(nx):
            value = np.float64(image[i, j])
            total += value
            total2 += value * value
    n = ny * nx
    mean = total / n
    if n <= 1:
        return mean, 0.0
    return mean, np.sqrt(np.abs(total2 / n - mean * mean))


@njit()
def _outliers(image: Any, low: float, high: float) -> Any:  # pragma: no cover - compiled
    ny, nx = image.shape
    count = 0
    for i in range(ny):
        for j in range(nx):
            value = np.float64(image[i, j])
            if value < low or value > high:
                count += 1
    flagged = np.empty(count, dtype=np.int64)
    k = 0
    for i in range(ny):
        for j in range(nx):
            value = np.float64(image[i, j])
            if value < low or value > high:
                flagged[k] = i * nx + j
                k += 1
    return flagged


@njit()
def _bound_median(
    image: Any, low: float, high: float, flagged: Any
) -> tuple[Any, Any]:  # pragma: no cover - compiled
    # Xmipp's boundMedianFilter over the flagged pixels only. ``flagged`` is in raster order
    # (sorted), so a neighbour that was flagged at the start is found by binary search; its
    # current value is the double replacement once it has been repaired.
    ny, nx = image.shape
    n_flagged = flagged.size
    bad = np.ones(n_flagged, dtype=np.bool_)
    replaced = np.zeros(n_flagged, dtype=np.float64)
    neighbours = np.empty(25, dtype=np.float64)
    remaining = n_flagged
    while remaining > 0:
        progress = 0
        for k in range(n_flagged):
            if not bad[k]:
                continue
            i = flagged[k] // nx
            j = flagged[k] % nx
            count = 0
            for ii in range(max(i - 2, 0), min(i + 3, ny)):
                for jj in range(max(j - 2, 0), min(j + 3, nx)):
                    value = np.float64(image[ii, jj])
                    if value < low or value > high:
                        m = np.searchsorted(flagged, ii * nx + jj)
                        if bad[m]:
                            continue
                        value = replaced[m]
                    # insertion sort, as Xmipp does
                    index = count
                    neighbours[index] = value
                    while index > 0 and neighbours[index - 1] > neighbours[index]:
                        swap = neighbours[index - 1]
                        neighbours[index - 1] = neighbours[index]
                        neighbours[index] = swap
                        index -= 1
                    count += 1
            if count == 0:
                continue
            if count % 2 == 0:
                replaced[k] = 0.5 * (neighbours[count // 2 - 1] + neighbours[count // 2])
            else:
                replaced[k] = neighbours[count // 2]
            bad[k] = False
            progress += 1
        remaining -= progress
        if progress == 0:
            break
    return replaced, bad


def remove_dust_xmipp(image: npt.NDArray[Any], threshold_sigma: float) -> tuple[FloatArray, int]:
    """Xmipp's ``xmipp_transform_filter --bad_pixels outliers t`` (ALGORITHMS.md §4.1).

    1. μ and σ_pop of the whole image, accumulated in float64.
    2. A pixel ``v`` is flagged when ``v < μ − t·σ`` or ``v > μ + t·σ`` (strict).
    3. Raster sweeps over the flagged pixels: each one still flagged takes the median of the
       unflagged pixels of its 5×5 neighbourhood (clipped at the edges; the mean of the two
       middle values for an even count) and is unflagged at once, so it counts as good for
       pixels visited later in the same sweep. Pixels without a good neighbour wait for the
       next sweep.
    4. Sweeps repeat until no flagged pixel is left. Xmipp would loop forever when a sweep
       repairs nothing (an image that is all outliers); here such pixels are left as they
       are.

    Medians are computed in float64 (as Xmipp, which works in double) and the result is
    rounded to float32 once. Only flagged pixels cost more than two passes over the image.

    Parameters
    ----------
    image
        ``(ny, nx)`` micrograph, any real dtype (a read-only memory map is fine; it is never
        written).
    threshold_sigma
        Threshold ``t`` in units of σ; ``t ≤ 0`` disables the filter.

    Returns
    -------
    cleaned, replaced
        A new float32 image and the number of pixels replaced.
    """
    source = np.asarray(image)
    if source.ndim != 2:
        raise ValueError(f"expected a 2D micrograph, got shape {source.shape}")
    out = np.array(source, dtype=np.float32, copy=True, order="C")
    if threshold_sigma <= 0 or source.size == 0:
        return out, 0
    mean, sigma = _image_stats(source)
    low = mean - threshold_sigma * sigma
    high = mean + threshold_sigma * sigma
    flagged = _outliers(source, low, high)
    if flagged.size == 0:
        return out, 0
    replaced, still_bad = _bound_median(source, low, high, flagged)
    done = ~still_bad
    out.reshape(-1)[flagged[done]] = replaced[done].astype(np.float32)
    return out, int(np.count_nonzero(done))


def remove_dust_relion(
    images: FloatArray,
    bg_radius: int,
    white_sigma: float,
    black_sigma: float,
    seeds: npt.ArrayLike,
) -> FloatArray:
    """RELION's per-particle dust removal (``--white_dust``/``--black_dust``, §4.2).

    For each particle, μ and σ_pop come from the background pixels only (logical
    coordinates with the centre at ``N//2``, ``i² + j² > R²``), computed once in float64.
    The white pass replaces every pixel with ``v − μ > s_w·σ`` by a draw from N(μ, σ); then
    the black pass replaces every pixel with ``v − μ < −s_b·σ`` (on the image left by the
    white pass). Draws come from ``numpy.random.default_rng(seed)`` of the particle, white
    draws first, each pass in raster order, so a rerun with the same seeds is identical
    (RELION's own draws cannot be reproduced; compare flagged positions instead).

    Parameters
    ----------
    images
        ``(n, b, b)`` float32 particle images (not modified).
    bg_radius
        Background radius R in pixels.
    white_sigma, black_sigma
        Thresholds ``s_w`` and ``s_b`` in σ; a value ≤ 0 disables that pass.
    seeds
        ``n`` non-negative integer seeds, one per particle.

    Returns
    -------
    numpy.ndarray
        A new ``(n, b, b)`` float32 array.

    Raises
    ------
    ValueError
        When the background is empty (R too large) or the seeds do not match the images.
    """
    stack = np.asarray(images, dtype=np.float32)
    if stack.ndim != 3:
        raise ValueError(f"expected (n, b, b) images, got shape {stack.shape}")
    out = np.array(stack, dtype=np.float32, copy=True)
    seed_values = np.asarray(seeds).reshape(-1)
    if seed_values.size != stack.shape[0]:
        raise ValueError(f"{seed_values.size} seeds for {stack.shape[0]} images")
    if (white_sigma <= 0 and black_sigma <= 0) or stack.shape[0] == 0:
        return out
    ny, nx = stack.shape[1:]
    rows = np.arange(ny) - ny // 2
    cols = np.arange(nx) - nx // 2
    background = rows[:, None] ** 2 + cols[None, :] ** 2 > bg_radius * bg_radius
    if not background.any():
        raise ValueError(f"background radius {bg_radius} leaves no background pixels")
    values = stack[:, background].astype(np.float64)
    mean = values.mean(axis=1)
    sigma = np.sqrt(np.maximum((values * values).mean(axis=1) - mean * mean, 0.0))

    generators: dict[int, np.random.Generator] = {}

    def generator(k: int) -> np.random.Generator:
        if k not in generators:
            generators[k] = np.random.default_rng(int(seed_values[k]))
        return generators[k]

    passes = ((white_sigma, 1.0), (black_sigma, -1.0))
    for threshold, direction in passes:
        if threshold <= 0:
            continue
        limit = (threshold * sigma)[:, None, None]
        deviation = (out.astype(np.float64) - mean[:, None, None]) * direction
        flagged = deviation > limit
        for k in np.flatnonzero(flagged.any(axis=(1, 2))):
            where = flagged[k]
            draws = generator(int(k)).normal(mean[k], sigma[k], size=int(where.sum()))
            out[k][where] = draws.astype(np.float32)
    return out


class DustSettings(StepSettings):
    """Settings of the ``dust`` step.

    Attributes
    ----------
    sigma
        Outlier threshold t in units of the micrograph's σ (Scipion's default 5; its help
        suggests 3.5 for cryo data).
    """

    sigma: float = Field(default=5.0, gt=0)


class DustStep(MicrographProcessor[DustSettings]):
    """Xmipp-style dust removal on the whole micrograph (:func:`remove_dust_xmipp`).

    Records the number of replaced pixels as ``stats["dust_pixels"]``.
    """

    name: ClassVar[str] = "dust"
    Settings: ClassVar[type[StepSettings]] = DustSettings

    def apply(self, micrograph: Micrograph) -> Micrograph:
        """Return a copy of ``micrograph`` with outlier pixels replaced."""
        cleaned, count = remove_dust_xmipp(micrograph.image, self.settings.sigma)
        result = micrograph.with_image(cleaned)
        result.stats["dust_pixels"] = float(count)
        return result
