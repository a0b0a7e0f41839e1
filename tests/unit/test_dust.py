"""Dust removal: Xmipp's iterative 5×5 median and RELION's random replacement (ALGORITHMS.md §4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from pydantic import ValidationError

from flybox.processors.base import Micrograph
from flybox.processors.dust import DustStep, remove_dust_relion, remove_dust_xmipp


def xmipp_reference(image: npt.NDArray[np.float64], t: float) -> tuple[np.ndarray, int, int]:
    """Plain-loop transcription of pixelDesvFilter + boundMedianFilter (double precision).

    Returns the cleaned image, the number of replaced pixels and the number of sweeps.
    """
    v = image.astype(np.float64).copy()
    n = v.size
    mean = v.sum() / n
    sigma = np.sqrt(abs((v * v).sum() / n - mean * mean))
    mask = (v < mean - t * sigma) | (v > mean + t * sigma)
    ny, nx = v.shape
    replaced = 0
    sweeps = 0
    while mask.any():
        sweeps += 1
        progress = 0
        for i in range(ny):
            for j in range(nx):
                if not mask[i, j]:
                    continue
                good = sorted(
                    v[ii, jj]
                    for ii in range(max(i - 2, 0), min(i + 3, ny))
                    for jj in range(max(j - 2, 0), min(j + 3, nx))
                    if not mask[ii, jj]
                )
                if not good:
                    continue
                count = len(good)
                v[i, j] = (
                    good[count // 2]
                    if count % 2
                    else 0.5 * (good[count // 2 - 1] + good[count // 2])
                )
                mask[i, j] = False
                progress += 1
        replaced += progress
        if progress == 0:
            break
    return v, replaced, sweeps


def test_planted_hot_and_cold_pixels_take_the_median_of_their_neighbourhood() -> None:
    rows, cols = np.mgrid[0:64, 0:64]
    image = (rows + cols).astype(np.float32)  # a ramp: medians are easy to state
    image[10, 10] = 1e6
    image[40, 20] = -1e6
    cleaned, count = remove_dust_xmipp(image, 3.0)
    assert count == 2
    # 5×5 neighbourhood of a ramp without its centre: 24 values, the middle two are both
    # equal to the centre value (i + j).
    assert cleaned[10, 10] == 20.0
    assert cleaned[40, 20] == 60.0
    untouched = np.ones(image.shape, dtype=bool)
    untouched[10, 10] = untouched[40, 20] = False
    np.testing.assert_array_equal(cleaned[untouched], image[untouched])


def test_even_neighbour_count_takes_the_mean_of_the_two_middle_values() -> None:
    image = np.zeros((32, 32), dtype=np.float32)
    image[0, 0] = 5000.0  # corner: 3×3 clipped window, 8 good neighbours
    image[0, 1] = 3.0
    image[1, 0] = 1.0
    cleaned, count = remove_dust_xmipp(image, 5.0)
    assert count == 1
    # neighbours sorted: 0×6, 1, 3 → middle two are 0 and 0
    assert cleaned[0, 0] == 0.0
    image[1, 1] = 2.0
    image[0, 2] = 4.0
    image[2, 0] = 6.0
    image[2, 1] = 7.0
    image[2, 2] = 8.0
    cleaned, _ = remove_dust_xmipp(image, 5.0)
    # window of (0, 0) is rows 0..2, cols 0..2: 3, 4, 1, 2, 6, 7, 8, and (1, 2) = 0
    # sorted 0, 1, 2, 3, 4, 6, 7, 8 → (3 + 4)/2
    assert cleaned[0, 0] == 3.5


def test_result_matches_a_plain_transcription_of_xmipp_on_noise_with_clusters() -> None:
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 1.0, (96, 80)).astype(np.float32)
    image[20:27, 30:38] = 60.0  # a 7×8 hot cluster, larger than the 5×5 window
    image[rng.integers(0, 96, 15), rng.integers(0, 80, 15)] = -40.0
    expected, expected_count, _ = xmipp_reference(image, 3.5)
    cleaned, count = remove_dust_xmipp(image, 3.5)
    assert count == expected_count
    np.testing.assert_array_equal(cleaned, expected.astype(np.float32))


def test_a_corner_cluster_needs_several_sweeps_and_still_converges() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    image[:9, :9] = 80.0  # pixels near the corner have no good neighbour in the first sweep
    expected, expected_count, sweeps = xmipp_reference(image, 3.0)
    assert sweeps > 1
    cleaned, count = remove_dust_xmipp(image, 3.0)
    assert count == expected_count == 81
    np.testing.assert_array_equal(cleaned, expected.astype(np.float32))
    assert np.all(np.abs(cleaned[:9, :9]) < 5.0)


def test_nothing_flagged_gives_an_identical_float32_copy() -> None:
    image = np.random.default_rng(1).normal(size=(40, 50)).astype(np.float32)
    cleaned, count = remove_dust_xmipp(image, 10.0)
    assert count == 0
    assert cleaned.dtype == np.float32
    assert cleaned is not image
    np.testing.assert_array_equal(cleaned, image)


@pytest.mark.parametrize("threshold", [0.0, -1.0])
def test_non_positive_threshold_disables_the_filter(threshold: float) -> None:
    image = np.zeros((16, 16), dtype=np.int16)
    image[3, 3] = 1000
    cleaned, count = remove_dust_xmipp(image, threshold)
    assert count == 0
    np.testing.assert_array_equal(cleaned, image.astype(np.float32))


def test_thresholds_are_strict() -> None:
    # ±1 checkerboard: μ = 0 and σ_pop = 1 exactly, so every pixel lies exactly on μ ± 1·σ.
    rows, cols = np.mgrid[0:8, 0:8]
    image = np.where((rows + cols) % 2 == 0, 1.0, -1.0).astype(np.float32)
    cleaned, count = remove_dust_xmipp(image, 1.0)
    assert count == 0
    np.testing.assert_array_equal(cleaned, image)
    # Slightly below: every pixel is flagged, none has a good neighbour; nothing can change.
    cleaned, count = remove_dust_xmipp(image, 0.999)
    assert count == 0
    np.testing.assert_array_equal(cleaned, image)


def test_reads_a_read_only_int16_memory_map(tmp_path: Path) -> None:
    data = np.full((48, 48), 100, dtype=np.int16)
    data[5, 7] = 30000
    path = tmp_path / "mic.raw"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.int16, mode="r", shape=(48, 48))
    cleaned, count = remove_dust_xmipp(mapped, 5.0)
    assert count == 1
    assert cleaned.dtype == np.float32
    assert cleaned[5, 7] == 100.0
    assert mapped[5, 7] == 30000


def test_rejects_stacks() -> None:
    with pytest.raises(ValueError, match="2D"):
        remove_dust_xmipp(np.zeros((2, 8, 8), dtype=np.float32), 5.0)


# --- RELION per-particle variant -------------------------------------------------------


def _background_stats(images: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    b = images.shape[-1]
    logical = np.arange(b) - b // 2
    background = logical[:, None] ** 2 + logical[None, :] ** 2 > radius**2
    values = images[:, background].astype(np.float64)
    return values.mean(axis=1), values.std(axis=1)


@pytest.fixture
def dusty() -> np.ndarray:
    rng = np.random.default_rng(11)
    images = rng.normal(0.0, 1.0, (4, 32, 32)).astype(np.float32)
    images[0, 16, 16] = 25.0  # white, inside the particle region
    images[0, 2, 3] = 30.0  # white, in the background
    images[1, 10, 20] = -25.0  # black
    images[2, 5, 5] = 25.0
    images[2, 6, 6] = -25.0
    return images


def test_relion_dust_replaces_exactly_the_expected_pixels(dusty: np.ndarray) -> None:
    radius = 12
    mean, sigma = _background_stats(dusty, radius)
    deviation = dusty.astype(np.float64) - mean[:, None, None]
    white = deviation > 4.0 * sigma[:, None, None]
    black = deviation < -4.0 * sigma[:, None, None]
    assert white.sum() == 3
    assert black.sum() == 2
    seeds = np.array([1, 2, 3, 4], dtype=np.uint64)
    out = remove_dust_relion(dusty, radius, 4.0, 4.0, seeds)
    changed = out != dusty
    np.testing.assert_array_equal(changed, white | black)
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out[changed]) < 6.0)
    # The draws are N(μ, σ) from default_rng(seed): white first, raster order.
    draws = np.random.default_rng(1).normal(mean[0], sigma[0], size=2).astype(np.float32)
    np.testing.assert_array_equal(out[0][white[0]], draws)


def test_relion_dust_is_reproducible_with_the_same_seeds(dusty: np.ndarray) -> None:
    seeds = np.arange(4)
    first = remove_dust_relion(dusty, 12, 4.0, 4.0, seeds)
    again = remove_dust_relion(dusty, 12, 4.0, 4.0, seeds)
    other = remove_dust_relion(dusty, 12, 4.0, 4.0, seeds + 100)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(first != dusty, other != dusty)


def test_relion_dust_threshold_zero_disables_a_pass(dusty: np.ndarray) -> None:
    seeds = np.arange(4)
    white_only = remove_dust_relion(dusty, 12, 4.0, 0.0, seeds)
    assert np.all(white_only[dusty < -20] < -20)  # black pixels kept
    assert not np.any(white_only > 20)
    black_only = remove_dust_relion(dusty, 12, -1.0, 4.0, seeds)
    assert np.all(black_only[dusty > 20] > 20)
    assert not np.any(black_only < -20)
    untouched = remove_dust_relion(dusty, 12, -1.0, 0.0, seeds)
    np.testing.assert_array_equal(untouched, dusty)
    assert untouched is not dusty


def test_relion_dust_checks_background_and_seeds(dusty: np.ndarray) -> None:
    with pytest.raises(ValueError, match="background"):
        remove_dust_relion(dusty, 40, 4.0, 4.0, np.arange(4))
    with pytest.raises(ValueError, match="seeds"):
        remove_dust_relion(dusty, 12, 4.0, 4.0, np.arange(3))


# --- Step --------------------------------------------------------------------------------


def test_dust_step_records_the_number_of_replaced_pixels() -> None:
    image = np.random.default_rng(5).normal(size=(64, 64)).astype(np.float32)
    image[30, 30] = 100.0
    picks = pd.DataFrame({"rlnCoordinateX": [10.0], "rlnCoordinateY": [12.0]})
    micrograph = Micrograph(image, 1.0, "mic.mrc", picks, stats={"existing": 1.0})
    step = DustStep.from_mapping({"sigma": 5.0})
    result = step.apply(micrograph)
    assert result.stats == {"existing": 1.0, "dust_pixels": 1.0}
    assert "dust_pixels" not in micrograph.stats
    assert abs(result.image[30, 30]) < 5.0
    assert micrograph.image[30, 30] == 100.0
    assert result.picks is picks


@pytest.mark.parametrize("sigma", [0.0, -2.0])
def test_dust_step_needs_a_positive_threshold(sigma: float) -> None:
    with pytest.raises(ValidationError):
        DustStep.from_mapping({"sigma": sigma})
