"""Normalisation (RELION and Xmipp variants), background sets, radius scaling, inversion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flybox.errors import ConfigError
from flybox.processors.base import ParticleStack
from flybox.processors.mask import MaskSettings, mask_2d
from flybox.processors.normalize import (
    InvertSettings,
    InvertStep,
    NormalizeSettings,
    NormalizeStep,
    background_mask,
    normalize_images,
    particle_seeds,
)


def logical(box: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(box) - box // 2
    return np.meshgrid(index, index, indexing="ij")


def reference(
    image: np.ndarray, radius: int, *, method: str, ddof: int, inclusive: bool, ramp_mean: bool
) -> np.ndarray:
    """Straightforward float64 implementation of ALGORITHMS.md §6."""
    i, j = logical(image.shape[0])
    r2 = i**2 + j**2
    bg = r2 >= radius**2 if inclusive else r2 > radius**2
    x = image.astype(np.float64)
    if method == "whole":
        return (x - x.mean()) / x.std(ddof=ddof)
    if method == "ramp":
        design = np.stack([j[bg], i[bg], np.ones(bg.sum())], axis=1)
        coef, *_ = np.linalg.lstsq(design, x[bg], rcond=None)
        x = x - (coef[0] * j + coef[1] * i + coef[2])
        sigma = x[bg].std(ddof=ddof)
        if not ramp_mean:
            return x / sigma
    mu, sigma = x[bg].mean(), x[bg].std(ddof=ddof)
    return (x - mu) / sigma


@pytest.mark.parametrize("method", ["whole", "background", "ramp"])
@pytest.mark.parametrize(("ddof", "inclusive", "ramp_mean"), [(0, False, True), (1, True, False)])
@pytest.mark.parametrize("box", [32, 33])
def test_normalisation_matches_the_formulas(
    method: str, ddof: int, inclusive: bool, ramp_mean: bool, box: int
) -> None:
    rng = np.random.default_rng(box)
    i, j = logical(box)
    images = (rng.normal(size=(3, box, box)) * 2.0 + 6800.0 + 0.3 * j - 0.2 * i).astype(np.float32)
    radius = box // 3
    ours, _ = normalize_images(
        images, method=method, radius=radius, ddof=ddof, inclusive=inclusive, ramp_mean=ramp_mean
    )  # type: ignore[arg-type]
    for k in range(3):
        expected = reference(
            images[k], radius, method=method, ddof=ddof, inclusive=inclusive, ramp_mean=ramp_mean
        )
        np.testing.assert_allclose(ours[k], expected, atol=2e-4)


def test_background_sets_differ_by_the_ring_at_exactly_r() -> None:
    strict = background_mask(16, 5, False)
    inclusive = background_mask(16, 5, True)
    extra = inclusive & ~strict
    i, j = logical(16)
    assert np.all(i[extra] ** 2 + j[extra] ** 2 == 25)
    assert extra.sum() == 12  # (±5,0), (0,±5), (±3,±4), (±4,±3)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(0.01, 1000), shift=st.floats(-1e4, 1e4), seed=st.integers(0, 1000))
def test_normalised_particles_are_affine_invariant(scale: float, shift: float, seed: int) -> None:
    images = np.random.default_rng(seed).normal(size=(2, 24, 24)).astype(np.float32)
    base, _ = normalize_images(images, method="ramp", radius=9)
    moved, _ = normalize_images(
        (images * scale + shift).astype(np.float32), method="ramp", radius=9
    )
    # The float32 input itself is quantised to ~eps·|shift|, i.e. eps·|shift|/scale in σ units.
    quantum = float(np.finfo(np.float32).eps) * (abs(shift) / scale + 5.0)
    np.testing.assert_allclose(base, moved, atol=1e-4 + 20 * quantum)


def test_ramp_normalisation_gives_zero_mean_unit_sigma_background() -> None:
    rng = np.random.default_rng(4)
    _i, j = logical(40)
    images = (rng.normal(size=(5, 40, 40)) + 3 * j + 100).astype(np.float32)
    out, _ = normalize_images(images, method="ramp", radius=15)
    bg = background_mask(40, 15, False)
    np.testing.assert_allclose(out[:, bg].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, bg].std(axis=1), 1, atol=1e-5)


def test_flat_images_are_left_alone_instead_of_dividing_by_zero() -> None:
    images = np.full((2, 16, 16), 7.0, dtype=np.float32)
    out, _ = normalize_images(images, method="background", radius=5)
    np.testing.assert_array_equal(out, images)
    ramp, _ = normalize_images(images, method="ramp", radius=5)
    np.testing.assert_allclose(ramp, 0, atol=1e-5)


def test_empty_background_is_an_error() -> None:
    with pytest.raises(ValueError, match="no background"):
        normalize_images(np.zeros((1, 8, 8), dtype=np.float32), method="background", radius=8)


def stack(box: int, extraction_box: int, n: int = 2) -> ParticleStack:
    images = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    table = pd.DataFrame(
        {
            "rlnCoordinateX": np.arange(n, dtype=float),
            "rlnCoordinateY": 1.0,
            "rlnMicrographName": "m",
        }
    )
    return ParticleStack(
        table=table, pixel_size_a=1.0, extraction_box=extraction_box, box=box, images=images
    )


def test_radius_defaults_and_scaling_per_stream() -> None:
    relion = NormalizeStep(NormalizeSettings())
    xmipp = NormalizeStep(NormalizeSettings(convention="xmipp"))
    explicit = NormalizeStep(NormalizeSettings(bg_radius=96))
    assert relion.radius_for(stack(256, 256)) == 96
    assert relion.radius_for(stack(64, 256)) == 24
    assert xmipp.radius_for(stack(256, 256)) == 128
    assert explicit.radius_for(stack(64, 256)) == 24
    assert explicit.radius_for(stack(100, 256)) == 37  # int(96 * 100 / 256) = int(37.5)


def test_convention_presets_and_overrides() -> None:
    relion = NormalizeStep(NormalizeSettings())
    assert (relion.ddof, relion.inclusive, relion.ramp_mean) == (0, False, True)
    xmipp = NormalizeStep(NormalizeSettings(convention="xmipp"))
    assert (xmipp.ddof, xmipp.inclusive, xmipp.ramp_mean) == (1, True, False)
    mixed = NormalizeStep(
        NormalizeSettings(convention="xmipp", sigma="population", background="strict")
    )
    assert (mixed.ddof, mixed.inclusive) == (0, False)


def test_radius_larger_than_half_the_box_is_refused_at_bind() -> None:
    step = NormalizeStep(NormalizeSettings(bg_radius=130))
    with pytest.raises(ConfigError, match="larger than half"):
        step.bind(256)


def test_relion_dust_runs_before_normalisation_and_is_reproducible() -> None:
    data = stack(64, 64, n=3)
    assert data.images is not None
    data.images[:, 2, 3] = 30.0  # a 30σ white pixel in the background
    step = NormalizeStep(NormalizeSettings(white_dust=5, black_dust=5))
    plain = NormalizeStep(NormalizeSettings()).apply(stack_copy(data)).real()
    first = step.apply(stack_copy(data)).real()
    second = step.apply(stack_copy(data)).real()
    np.testing.assert_array_equal(first, second)
    assert np.all(plain[:, 2, 3] > 20)
    # Replaced by a draw from the background distribution (seeded per particle).
    assert np.all(np.abs(first[:, 2, 3]) < 6)


def stack_copy(original: ParticleStack) -> ParticleStack:
    assert original.images is not None
    return ParticleStack(
        table=original.table.copy(),
        pixel_size_a=original.pixel_size_a,
        extraction_box=original.extraction_box,
        box=original.box,
        images=original.images.copy(),
    )


def test_particle_seeds_depend_on_micrograph_and_position_only() -> None:
    table = pd.DataFrame(
        {
            "rlnMicrographName": ["a", "a", "b"],
            "rlnCoordinateX": [1.0, 2.0, 1.0],
            "rlnCoordinateY": [3.0, 3.0, 3.0],
        }
    )
    seeds = particle_seeds(table)
    assert len(set(seeds.tolist())) == 3
    np.testing.assert_array_equal(seeds, particle_seeds(table.copy()))


def test_invert_negates() -> None:
    data = stack(8, 8)
    assert data.images is not None
    before = data.images.copy()
    np.testing.assert_array_equal(InvertStep(InvertSettings()).apply(data).real(), -before)


@pytest.mark.parametrize("method", ["none", "whole", "background", "ramp"])
def test_statistics_computed_in_the_pass_match_the_output(method: str) -> None:
    images = np.random.default_rng(9).normal(50, 3, size=(4, 20, 20)).astype(np.float32)
    out, stats = normalize_images(images, method=method, radius=6, sign=-1.0)  # type: ignore[arg-type]
    flat = out.reshape(4, -1).astype(np.float64)
    assert stats.minimum == flat.min()
    assert stats.maximum == flat.max()
    np.testing.assert_allclose(stats.means, flat.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.variances, flat.var(axis=1), rtol=1e-6)


def test_invert_after_normalize_is_folded_into_the_same_pass() -> None:
    from flybox.pipeline.chain import Chain

    chain = Chain.from_config(
        [{"step": "extract", "box": 16}, {"step": "normalize"}, {"step": "invert"}]
    )
    assert [step.name for step in chain.before_split] == ["normalize"]
    assert [step["step"] for step in chain.describe()] == ["extract", "normalize", "invert"]
    data = stack(16, 16)
    separate = (
        InvertStep(InvertSettings())
        .apply(NormalizeStep(NormalizeSettings()).apply(stack_copy(data)))
        .real()
    )
    fused = chain.before_split[0].apply(stack_copy(data))
    np.testing.assert_array_equal(fused.real(), separate)
    assert fused.image_stats is not None
    assert fused.image_stats.maximum == float(separate.max())


@pytest.mark.parametrize(
    "mask_settings",
    [
        {"shape": "raised_cosine", "inner": 10, "outer": 14},
        {"shape": "circular", "radius": 12},
        {"shape": "circular", "radius": 12, "fill": "value", "fill_value": 0.5},
        {"shape": "circular", "radius": 12, "fill": "avg"},
        {"shape": "circular", "radius": 12, "fill": "min"},
        {"shape": "circular", "radius": 12, "fill": "max"},
        {"shape": "raised_crown", "outer": 12, "decay": 3, "fill": "soft_background"},
    ],
)
def test_mask_after_normalize_is_folded_into_the_same_pass(
    mask_settings: dict[str, object],
) -> None:
    from flybox.pipeline.chain import Chain
    from flybox.processors.mask import MaskStep, MaskStepSettings

    steps = [{"step": "extract", "box": 32}, {"step": "normalize"}, {"step": "invert"}]
    chain = Chain.from_config([*steps, {"step": "mask", **mask_settings}])
    assert [step.name for step in chain.before_split] == ["normalize"]
    data = stack(32, 32, n=3)
    separate = MaskStep(MaskStepSettings.model_validate(mask_settings)).apply(
        InvertStep(InvertSettings()).apply(
            NormalizeStep(NormalizeSettings()).apply(stack_copy(data))
        )
    )
    fused = chain.before_split[0].apply(stack_copy(data))
    np.testing.assert_allclose(fused.real(), separate.real(), rtol=0, atol=2e-6)
    assert fused.image_stats is not None
    means = separate.real().mean(axis=(1, 2))
    np.testing.assert_allclose(fused.image_stats.means, means, atol=1e-6)


@pytest.mark.parametrize("method", ["none", "whole", "background", "ramp"])
@pytest.mark.parametrize("fill", [None, "multiply", "avg", "soft_background", "min"])
def test_normalising_in_place_gives_the_same_images_and_statistics(
    method: str, fill: str | None
) -> None:
    rng = np.random.default_rng(5)
    images = (rng.standard_normal((23, 40, 40)) * 3 + 50).astype(np.float32)
    mask = None
    if fill is not None:
        binary = fill in ("avg", "min")
        settings = (
            MaskSettings(shape="circular", radius=15)
            if binary
            else MaskSettings(shape="raised_crown", outer=15, decay=3)
        )
        mask = mask_2d(40, settings)
    options = {"method": method, "radius": 16, "mask": mask, "fill": fill or "multiply"}
    expected, expected_stats = normalize_images(images, **options)  # type: ignore[arg-type]
    work = images.copy()
    result, stats = normalize_images(work, out=work, **options)  # type: ignore[arg-type]
    assert result is work
    np.testing.assert_array_equal(result, expected)
    assert (stats.minimum, stats.maximum) == (expected_stats.minimum, expected_stats.maximum)
    assert stats.minimum == float(expected.min())
    assert stats.maximum == float(expected.max())
    np.testing.assert_array_equal(stats.means, expected_stats.means)
    np.testing.assert_allclose(stats.means, expected.mean(axis=(1, 2)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        normalize_images(images, method="whole", radius=16, out=np.empty((23, 40, 40)))


@pytest.mark.parametrize("method", ["none", "whole", "background", "ramp"])
@pytest.mark.parametrize("fill", [None, "avg", "soft_background", "min"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(10, 10), (0, 1)])  # inside the disc, in the background
def test_a_non_finite_pixel_always_reaches_the_statistics(
    method: str, fill: str | None, bad: float, where: tuple[int, int]
) -> None:
    # The worker checks a stack's finiteness on these statistics, not on the pixels (issue 8):
    # the kernels' fast-math flags must not let a NaN or an Inf drop out of the sums.
    images = np.random.default_rng(4).normal(50, 3, size=(3, 20, 20)).astype(np.float32)
    images[1][where] = bad
    mask = None
    if fill is not None:
        soft = fill == "soft_background"
        shape = {"shape": "raised_crown", "outer": 7, "decay": 2} if soft else {"radius": 7}
        mask = mask_2d(20, MaskSettings.model_validate({"shape": "circular", **shape}))
    with np.errstate(invalid="ignore", over="ignore"):
        _, stats = normalize_images(
            images,
            method=method,  # type: ignore[arg-type]
            radius=6,
            mask=mask,
            fill=fill or "multiply",
        )
    assert not np.isfinite(stats.variances[1])
    assert np.isfinite(stats.variances[[0, 2]]).all()
    if np.isnan(bad) or fill is None:
        assert not (np.isfinite(stats.minimum) and np.isfinite(stats.maximum))
