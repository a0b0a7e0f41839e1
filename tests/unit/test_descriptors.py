"""Local variance and Gini descriptors of Xmipp's noisy-zone filter (ALGORITHMS.md §12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flybox.errors import ConfigError
from flybox.processors.base import Micrograph
from flybox.processors.descriptors import (
    DescriptorsSettings,
    DescriptorsStep,
    gini_coefficient,
    local_variance_scores,
    relative_variance_map,
)


def gaussian_lowpass(values: np.ndarray, width: int) -> np.ndarray:
    """Periodic filter exp(−π²·w²·|f|²) with numpy's FFT (f per axis in cycles/pixel)."""
    fy = np.fft.fftfreq(values.shape[0])[:, None]
    fx = np.fft.rfftfreq(values.shape[1])[None, :]
    response = np.exp(-(np.pi**2) * width**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(values) * response, s=values.shape)


def reference_map(image: np.ndarray, patch: int) -> np.ndarray:
    """Steps 2.1–2.6 of §12.1 done literally, with dense arrays."""
    ny, nx = image.shape
    h = patch // 2
    v = np.zeros((ny, nx))
    for i in range(h, ny - h + 1, h):
        for j in range(h, nx - h + 1, h):
            v[i, j] = image[i - h : i + h, j - h : j + h].astype(np.float64).std()
    v = gaussian_lowpass(v, h)
    v /= v.mean()
    rows = np.clip(np.arange(ny), patch, ny - patch)
    cols = np.clip(np.arange(nx), patch, nx - patch)
    return v[np.ix_(rows, cols)]


def reference_gini(rel_map: np.ndarray) -> float:
    q = (rel_map - rel_map.min()) / (rel_map.max() - rel_map.min())
    counts, _ = np.histogram(q, 256, (0.0, 1.0))
    counts = np.sort(counts).astype(np.float64)
    area = np.sum(np.cumsum(counts) - counts / 2)
    fair = rel_map.size * 256 / 2
    return float((fair - area) / fair)


@pytest.fixture
def patchy() -> np.ndarray:
    rng = np.random.default_rng(21)
    image = rng.normal(0.0, 1.0, (300, 260)).astype(np.float32)
    image[60:140, 40:120] *= 4.0  # a noisy zone (e.g. thick ice or contamination)
    return image


def test_map_follows_the_literal_algorithm(patchy: np.ndarray) -> None:
    result = relative_variance_map(patchy, 64)
    assert result.shape == patchy.shape
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, reference_map(patchy, 64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "patch"), [((128, 200), 45), ((97, 97), 30), ((64, 64), 64)])
def test_map_handles_odd_patches_and_awkward_sizes(shape: tuple[int, int], patch: int) -> None:
    image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(
        relative_variance_map(image, patch), reference_map(image, patch), rtol=1e-11, atol=1e-12
    )


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    scale=st.floats(min_value=1e-3, max_value=1e3),
    sign=st.sampled_from([-1.0, 1.0]),
    offset=st.floats(min_value=-1e4, max_value=1e4),
)
def test_map_is_invariant_to_affine_changes_of_intensity(
    patchy: np.ndarray, scale: float, sign: float, offset: float
) -> None:
    # This is why Xmipp's random interval normalisation (step 1) can be skipped; the
    # extreme cases (σ = 1e−3 on an offset of 1e4) also check the variance accumulation.
    base = relative_variance_map(patchy.astype(np.float64), 64)
    changed = relative_variance_map(patchy.astype(np.float64) * (sign * scale) + offset, 64)
    np.testing.assert_allclose(changed, base, rtol=1e-6)


def test_particles_in_the_noisy_zone_score_higher(patchy: np.ndarray) -> None:
    rel_map = relative_variance_map(patchy, 64)
    inside = local_variance_scores(rel_map, np.array([70, 90, 110]), np.array([80, 100, 120]), 64)
    outside = local_variance_scores(
        rel_map, np.array([200, 220, 180]), np.array([220, 250, 260]), 64
    )
    assert inside.min() > 1.5 * outside.max()


def test_scores_are_the_twice_smoothed_map_at_the_pick(patchy: np.ndarray) -> None:
    rel_map = relative_variance_map(patchy, 64)
    smoothed = gaussian_lowpass(rel_map, 64 // 8)
    xs = np.array([0, 17, 130, 259])
    ys = np.array([0, 299, 42, 150])
    np.testing.assert_allclose(
        local_variance_scores(rel_map, xs, ys, 64), smoothed[ys, xs], rtol=1e-12
    )


def test_scores_outside_the_image_are_clipped(patchy: np.ndarray) -> None:
    rel_map = relative_variance_map(patchy, 64)
    clipped = local_variance_scores(rel_map, np.array([-5, 400, 10]), np.array([-1, 20, 999]), 64)
    inside = local_variance_scores(rel_map, np.array([0, 259, 10]), np.array([0, 20, 299]), 64)
    np.testing.assert_array_equal(clipped, inside)


def test_gini_of_hand_computed_maps() -> None:
    # A flat map puts every pixel in one bin: G = (fair − n/2)/fair = 1 − 1/256.
    assert gini_coefficient(np.full((4, 4), 3.0)) == pytest.approx(255 / 256)
    # Two pixels at the extremes: counts sorted 0×254, 1, 1 → area = 0.5 + 1.5 = 2,
    # fair = 2·128 = 256 → G = 254/256.
    assert gini_coefficient(np.array([[0.0, 1.0]])) == pytest.approx(254 / 256)
    # One pixel in each of the 256 bins: perfectly even occupancy → G = 0.
    assert gini_coefficient(np.arange(256.0).reshape(16, 16)) == pytest.approx(0.0, abs=1e-15)
    # Skewed: 3 pixels low, 1 high → counts 0×254, 1, 3 → area = 0.5 + 2.5 = 3,
    # fair = 4·128 = 512 → G = 509/512.
    assert gini_coefficient(np.array([[1.0, 1.0], [1.0, 9.0]])) == pytest.approx(509 / 512)


def test_gini_bins_like_numpy_histogram() -> None:
    rng = np.random.default_rng(8)
    for values in (rng.normal(size=(50, 70)), rng.exponential(size=(33, 40)) ** 3):
        assert gini_coefficient(values) == pytest.approx(reference_gini(values), abs=1e-15)


def test_uniform_noise_is_more_even_than_a_micrograph_with_a_noisy_zone(patchy: np.ndarray) -> None:
    uniform = np.random.default_rng(21).normal(0.0, 1.0, patchy.shape).astype(np.float32)
    g_uniform = gini_coefficient(relative_variance_map(uniform, 64))
    g_patchy = gini_coefficient(relative_variance_map(patchy, 64))
    assert g_patchy > g_uniform
    assert g_patchy == pytest.approx(reference_gini(reference_map(patchy, 64)), abs=1e-12)


def test_a_flat_micrograph_gives_a_map_of_ones() -> None:
    rel_map = relative_variance_map(np.full((100, 100), 7, dtype=np.int16), 32)
    np.testing.assert_array_equal(rel_map, 1.0)


@pytest.mark.parametrize("patch", [1, 101])
def test_patch_must_fit_the_image(patch: int) -> None:
    with pytest.raises(ValueError, match="patch"):
        relative_variance_map(np.zeros((100, 120), np.float32), patch)


# --- Step --------------------------------------------------------------------------------


def picks_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnCoordinateX": [70.9, 90.2, 210.5, 5.0],
            "rlnCoordinateY": [80.7, 100.0, 240.9, 299.99],
            "rlnAutopickFigureOfMerit": [1.0, 2.0, 3.0, 4.0],
        }
    )


def test_step_adds_descriptor_columns_and_stats(patchy: np.ndarray) -> None:
    picks = picks_table()
    micrograph = Micrograph(patchy, 1.0, "mic.mrc", picks, stats={"dust_pixels": 3.0})
    step = DescriptorsStep(DescriptorsSettings())
    step.bind(42)  # patch = int(1.5 · 42) = 63
    assert step.patch_size == 63
    result = step.apply(micrograph)

    rel_map = relative_variance_map(patchy, 63)
    expected_gini = gini_coefficient(rel_map)
    expected_scores = local_variance_scores(
        rel_map, np.array([70, 90, 210, 5]), np.array([80, 100, 240, 299]), 63
    )
    assert result.stats["gini"] == expected_gini
    np.testing.assert_allclose(result.picks["flyboxLocalVariance"], expected_scores, rtol=1e-10)
    np.testing.assert_array_equal(result.picks["flyboxGini"], expected_gini)
    assert result.stats["local_variance_median"] == pytest.approx(np.median(expected_scores))
    assert result.stats["dust_pixels"] == 3.0
    # The input micrograph and its picks are left alone.
    assert "flyboxGini" not in picks
    assert micrograph.stats == {"dust_pixels": 3.0}
    np.testing.assert_array_equal(result.picks["rlnAutopickFigureOfMerit"], [1.0, 2.0, 3.0, 4.0])
    assert result.image is patchy


def test_step_with_an_explicit_patch_and_no_picks(patchy: np.ndarray) -> None:
    empty = pd.DataFrame(
        {"rlnCoordinateX": pd.Series(dtype=float), "rlnCoordinateY": pd.Series(dtype=float)}
    )
    step = DescriptorsStep(DescriptorsSettings(patch_size=64))
    result = step.apply(Micrograph(patchy, 1.0, "mic.mrc", empty))
    assert list(result.picks.columns) == [
        "rlnCoordinateX",
        "rlnCoordinateY",
        "flyboxLocalVariance",
        "flyboxGini",
    ]
    assert len(result.picks) == 0
    assert result.stats["gini"] == gini_coefficient(relative_variance_map(patchy, 64))
    assert "local_variance_median" not in result.stats


def test_step_reads_an_int16_memory_map(tmp_path: Path, patchy: np.ndarray) -> None:
    counts = np.round(patchy * 10 + 100).astype(np.int16)
    path = tmp_path / "mic.raw"
    counts.tofile(path)
    mapped = np.memmap(path, dtype=np.int16, mode="r", shape=counts.shape)
    step = DescriptorsStep(DescriptorsSettings(patch_size=64))
    from_map = step.apply(Micrograph(mapped, 1.0, "m", picks_table()))
    from_float = step.apply(Micrograph(counts.astype(np.float32), 1.0, "m", picks_table()))
    assert from_map.stats["gini"] == from_float.stats["gini"]
    np.testing.assert_array_equal(
        from_map.picks["flyboxLocalVariance"], from_float.picks["flyboxLocalVariance"]
    )


def test_step_needs_a_patch_size_or_an_extraction_box(patchy: np.ndarray) -> None:
    step = DescriptorsStep(DescriptorsSettings())
    with pytest.raises(ConfigError) as info:
        step.apply(Micrograph(patchy, 1.0, "m", picks_table()))
    assert info.value.key == "descriptors.patch_size"
    with pytest.raises(ConfigError):
        DescriptorsStep(DescriptorsSettings()).bind(1)
    with pytest.raises(ValidationError):
        DescriptorsStep.from_mapping({"patch_size": 1})
