"""Geometric masks against their analytic definitions (ALGORITHMS.md §11), fills and the step."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from flybox.errors import ConfigError, config_errors
from flybox.processors.base import ParticleStack
from flybox.processors.mask import (
    MaskCache,
    MaskSettings,
    MaskStep,
    MaskStepSettings,
    apply_mask,
    build_mask,
    is_binary_mask,
    mask_2d,
    mask_3d,
)

# ---------------------------------------------------------------------------------------------
# An independent, pixel-by-pixel reading of the definitions in ALGORITHMS.md §11.


def _rc(d: float, r1: float, r2: float) -> float:
    """Xmipp's raised cosine (1 inside r1, cosine fall to 0 at r2)."""
    if d <= r1:
        return 1.0
    if d < r2:
        return 0.5 * (1 + math.cos(math.pi * (d - r1) / (r2 - r1)))
    return 0.0


def _relion_crown(d: float, inner: float, outer: float, w: float) -> float:
    """RELION's raisedCrownMask, verbatim from §11.2."""
    if d < inner - w:
        return 0.0
    if d < inner:
        return 0.5 - 0.5 * math.cos(math.pi * (d - (inner - w)) / w)
    if d < outer:
        return 1.0
    if d < outer + w:
        return 0.5 - 0.5 * math.cos(math.pi * (outer + w - d) / w)
    return 0.0


def reference(dims: tuple[int, ...], p: dict[str, float], convention: str) -> np.ndarray:
    """The mask of ``p`` (explicit parameters, centre cx, cy, cz) evaluated pixel by pixel."""
    out = np.zeros(dims)
    relion = convention == "relion"
    for index in itertools.product(*(range(n) for n in dims)):
        logical = [i - n // 2 for i, n in zip(index, dims, strict=True)]
        x, y = logical[-1] - p["cx"], logical[-2] - p["cy"]
        z = logical[0] - p.get("cz", 0.0) if len(dims) == 3 else 0.0
        r2 = x * x + y * y + z * z
        d = math.sqrt(r2)
        kind = p["shape"]
        if kind == "circular":
            v = float(d < p["radius"]) if relion else float(r2 <= p["radius"] ** 2)
        elif kind == "box":
            v = 1.0
            for offset, side in zip((x, y, z), p["size"], strict=False):
                low = -(side // 2)
                v *= float(low <= offset <= low + side - 1)
        elif kind == "crown":
            if relion:
                v = float(p["inner"] <= d < p["outer"])
            else:
                v = float(p["inner"] ** 2 <= r2 <= p["outer"] ** 2)
        elif kind == "cylinder":
            rxy2 = x * x + y * y
            radial = math.sqrt(rxy2) < p["radius"] if relion else rxy2 <= p["radius"] ** 2
            v = float(radial and abs(z) <= p["height"] / 2)
        elif kind == "gaussian":
            v = math.exp(-r2 / (2 * p["sigma"] ** 2))
            if not relion:
                v *= (math.sqrt(2 * math.pi) * p["sigma"]) ** -len(dims)
        elif kind == "raised_cosine":
            v = _rc(d, p["inner"], p["outer"])
        else:
            i, o, w = p["inner"], p["outer"], p["decay"]
            if relion:
                v = _relion_crown(d, i, o, w) if w > 0 else float(i <= d < o)
            else:
                v = (1 - _rc(d, i - w, i + w)) * _rc(d, o - w, o + w)
        out[index] = v
    return out


SHAPES_2D = [
    {"shape": "circular", "radius": 5.0},
    {"shape": "circular", "radius": 4.5},
    {"shape": "box", "size": (7, 4)},
    {"shape": "crown", "inner": 2.0, "outer": 6.0},
    {"shape": "gaussian", "sigma": 2.5},
    {"shape": "raised_cosine", "inner": 2.0, "outer": 6.5},
    {"shape": "raised_crown", "inner": 3.0, "outer": 6.0, "decay": 1.5},
    {"shape": "raised_crown", "inner": 3.0, "outer": 6.0, "decay": 0.0},
    {"shape": "raised_crown", "inner": 1.0, "outer": 5.0, "decay": 2.0},
]
SHAPES_3D = [
    *(p for p in SHAPES_2D if p["shape"] != "box"),
    {"shape": "box", "size": (5, 6, 3)},
    {"shape": "cylinder", "radius": 3.0, "height": 5.0},
    {"shape": "cylinder", "radius": 2.5, "height": 4.0},
]


def _settings(p: dict[str, object], convention: str, center: tuple[float, ...]) -> MaskSettings:
    values = {k: v for k, v in p.items() if k not in ("cx", "cy", "cz")}
    return MaskSettings.model_validate({**values, "convention": convention, "center": center})


@pytest.mark.parametrize("convention", ["relion", "xmipp"])
@pytest.mark.parametrize("box", [16, 17])
@pytest.mark.parametrize("center", [(0.0, 0.0), (2.0, -3.0), (-1.5, 0.5)])
@pytest.mark.parametrize("params", SHAPES_2D, ids=lambda p: f"{p['shape']}-{len(p)}")
def test_2d_mask_matches_its_analytic_definition(
    params: dict[str, object], box: int, center: tuple[float, float], convention: str
) -> None:
    mask = mask_2d(box, _settings(params, convention, center))
    expected = reference((box, box), {**params, "cx": center[0], "cy": center[1]}, convention)  # type: ignore[dict-item]
    assert mask.dtype == np.float32
    assert mask.shape == (box, box)
    np.testing.assert_allclose(mask, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("convention", ["relion", "xmipp"])
@pytest.mark.parametrize("dims", [(10, 10, 10), (11, 11, 11), (9, 12, 11)])
@pytest.mark.parametrize("center", [(0.0, 0.0, 0.0), (1.0, -2.0, 1.5)])
@pytest.mark.parametrize("params", SHAPES_3D, ids=lambda p: f"{p['shape']}-{len(p)}")
def test_3d_mask_matches_its_analytic_definition(
    params: dict[str, object],
    dims: tuple[int, int, int],
    center: tuple[float, float, float],
    convention: str,
) -> None:
    mask = mask_3d(dims, _settings(params, convention, center))
    p = {**params, "cx": center[0], "cy": center[1], "cz": center[2]}
    expected = reference(dims, p, convention)  # type: ignore[arg-type]
    assert mask.shape == dims
    np.testing.assert_allclose(mask, expected, rtol=0, atol=1e-7)


def test_centre_is_pixel_n_over_2_for_odd_and_even_boxes() -> None:
    for box in (64, 65):
        single = mask_2d(box, MaskSettings(shape="circular", radius=0, convention="xmipp"))
        assert np.argwhere(single == 1).tolist() == [[32, 32]]
        shifted = mask_2d(
            box, MaskSettings(shape="circular", radius=0, center=(3, -2), convention="xmipp")
        )
        assert np.argwhere(shifted == 1).tolist() == [[30, 35]]  # row y = 32-2, column x = 32+3


def test_xmipp_circle_keeps_the_boundary_ring_and_relion_does_not() -> None:
    xmipp = mask_2d(32, MaskSettings(shape="circular", radius=5, convention="xmipp"))
    relion = mask_2d(32, MaskSettings(shape="circular", radius=5, convention="relion"))
    # (x, y) = (5, 0), (3, 4) are at distance exactly 5
    for row, col in [(16, 21), (20, 19), (11, 16)]:
        assert xmipp[row, col] == 1
        assert relion[row, col] == 0
    assert (xmipp - relion).min() == 0


def test_raised_crown_edges_centred_on_radii_in_xmipp_and_outside_in_relion() -> None:
    def profile(convention: str) -> np.ndarray:
        s = MaskSettings(shape="raised_crown", inner=10, outer=20, decay=4, convention=convention)
        return mask_2d(64, s)[32, 32:]

    xmipp, relion = profile("xmipp"), profile("relion")
    assert xmipp[10] == pytest.approx(0.5)
    assert xmipp[20] == pytest.approx(0.5)
    assert xmipp[6] == 0
    assert xmipp[14] == 1
    assert xmipp[16] == 1
    assert xmipp[24] == 0
    assert relion[10] == 1
    assert relion[19] == 1
    assert relion[6] == 0
    assert relion[24] == 0
    assert relion[8] == pytest.approx(0.5)
    assert relion[22] == pytest.approx(0.5)


def test_gaussian_is_a_density_in_xmipp_and_peak_one_in_relion() -> None:
    sigma = 3.0
    density = mask_2d(64, MaskSettings(shape="gaussian", sigma=sigma, convention="xmipp"))
    peak = mask_2d(64, MaskSettings(shape="gaussian", sigma=sigma, convention="relion"))
    assert density[32, 32] == pytest.approx(1 / (2 * math.pi * sigma**2), rel=1e-6)
    assert float(density.sum(dtype=np.float64)) == pytest.approx(1.0, rel=1e-5)
    assert peak[32, 32] == 1.0
    as_option = mask_2d(64, MaskSettings(shape="gaussian", sigma=sigma, gaussian_norm="density"))
    np.testing.assert_array_equal(as_option, density)
    volume = mask_3d((32, 32, 32), MaskSettings(shape="gaussian", sigma=2, convention="xmipp"))
    assert volume[16, 16, 16] == pytest.approx((2 * math.pi * 4) ** -1.5, rel=1e-6)


def test_defaults_follow_xmipp_for_even_odd_and_non_cubic_images() -> None:
    for box in (64, 65):
        half = box // 2
        explicit = mask_2d(box, MaskSettings(shape="circular", radius=half))
        np.testing.assert_array_equal(mask_2d(box, MaskSettings(shape="circular")), explicit)
        np.testing.assert_array_equal(
            mask_2d(box, MaskSettings(shape="circular", radius=-1)), explicit
        )
        side = mask_2d(box, MaskSettings(shape="box"))
        assert side.sum() == half * half
        gauss = mask_2d(box, MaskSettings(shape="gaussian", sigma=-1))
        np.testing.assert_array_equal(
            gauss, mask_2d(box, MaskSettings(shape="gaussian", sigma=box / 6))
        )
        crown = mask_2d(box, MaskSettings(shape="raised_crown"))
        np.testing.assert_array_equal(
            crown, mask_2d(box, MaskSettings(shape="raised_crown", inner=0, outer=half, decay=0))
        )
    dims = (25, 43, 73)
    geometry = MaskSettings(shape="cylinder").resolved(dims)
    assert (geometry.radius, geometry.height) == (21.0, 25.0)
    assert MaskSettings(shape="circular").resolved(dims).radius == 12.0
    assert MaskSettings(shape="box").resolved(dims).size == (36, 21, 12)
    assert mask_3d(dims, MaskSettings(shape="box")).sum() == 36 * 21 * 12
    full = mask_3d((10, 10, 10), MaskSettings(shape="cylinder", radius=20))
    assert full.min() == 1  # the default height is the whole box


def test_size_takes_one_value_for_every_axis() -> None:
    one = mask_3d((12, 12, 12), MaskSettings(shape="box", size=4))
    three = mask_3d((12, 12, 12), MaskSettings(shape="box", size=(4, 4, 4)))
    np.testing.assert_array_equal(one, three)
    assert one.sum() == 64
    with pytest.raises(ConfigError, match="size"):
        mask_2d(12, MaskSettings(shape="box", size=(4, 4, 4)))


def test_invert_is_xmipp_outside_mode_and_relion_invert() -> None:
    inside = mask_2d(32, MaskSettings(shape="circular", radius=5, convention="xmipp"))
    outside = mask_2d(32, MaskSettings(shape="circular", radius=5, convention="xmipp", invert=True))
    assert np.all(inside + outside >= 1)
    assert (inside * outside).sum() > 0  # the ring r = R belongs to both
    for shape in ("raised_crown", "gaussian", "crown", "box"):
        for convention in ("relion", "xmipp"):
            plain = mask_2d(33, MaskSettings(shape=shape, convention=convention))
            inverted = mask_2d(33, MaskSettings(shape=shape, convention=convention, invert=True))
            np.testing.assert_allclose(inverted, 1 - plain, atol=1e-7)


def test_shape_aliases_and_spellings_are_canonical() -> None:
    assert MaskSettings(shape="sphere").shape == "circular"  # type: ignore[arg-type]
    assert MaskSettings(shape="Rectangular").shape == "box"  # type: ignore[arg-type]
    assert MaskSettings(shape="raised-cosine").shape == "raised_cosine"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"shape": "star"}, "--shape: Input should be"),
        ({"shape": "circular", "radius": -2}, "--radius: must be a length >= 0"),
        ({"shape": "circular", "inner": 3}, "--inner: does not apply to shape circular"),
        (
            {"shape": "crown", "inner": 9, "outer": 4},
            r"--outer: must not be smaller than inner \(9 > 4\)",
        ),
        ({"shape": "gaussian", "sigma": 0}, "--sigma: must be > 0"),
        ({"shape": "gaussian", "fill": "min"}, "--fill: fill min applies to binary masks only"),
        ({"shape": "raised_cosine", "fill_value": 2}, "--fill-value: applies to binary masks only"),
        ({"shape": "box", "size": (3, 0)}, "--size: must be 1 to 3 whole numbers"),
        ({"shape": "box", "size": 2.5}, "--size: must be 1 to 3 whole numbers"),
        ({"shape": "circular", "center": (1,)}, "--center: must be 2 or 3"),
        (
            {"shape": "circular", "gaussian_norm": "peak"},
            "--gaussian-norm: applies to shape gaussian",
        ),
        ({"shape": "circular", "radiuss": 3}, "--radiuss: Extra inputs are not permitted"),
        ({"shape": "circular", "fill": "median"}, "--fill: Input should be"),
    ],
)
def test_bad_settings_are_refused_with_a_one_line_message(
    values: dict[str, object], match: str
) -> None:
    with pytest.raises(ValidationError) as info:
        MaskSettings.model_validate(values)
    error = config_errors(info.value, option_style=True)[0]
    assert isinstance(error, ConfigError)
    assert "\n" not in str(error)
    assert error.key.startswith("--")
    assert re.search(match, str(error)), str(error)


def test_settings_that_do_not_fit_2d_images_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="cylinder is a 3D shape"):
        mask_2d(32, MaskSettings(shape="cylinder"))
    with pytest.raises(ConfigError, match="center"):
        mask_2d(32, MaskSettings(shape="circular", center=(1, 2, 3)))
    mask = mask_3d((8, 8, 8), MaskSettings(shape="circular", radius=2, center=(1, 1)))
    assert mask[4, 5, 5] == 1  # a 2-value centre means z = 0 for volumes


# ---------------------------------------------------------------------------------------------
# Applying masks


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.normal(3.0, 2.0, size=(5, 24, 24))).astype(np.float32)


def test_value_fill_substitutes_outside_pixels(images: np.ndarray) -> None:
    mask = mask_2d(24, MaskSettings(shape="circular", radius=8))
    before = images.copy()
    out = apply_mask(images, mask, "value", 7.5)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, mask == 1], images[:, mask == 1])
    assert np.all(out[:, mask == 0] == 7.5)
    np.testing.assert_array_equal(apply_mask(images, mask), images * mask)


@pytest.mark.parametrize("fill", ["min", "max", "avg"])
def test_statistic_fills_use_each_whole_image_before_masking(images: np.ndarray, fill: str) -> None:
    mask = mask_2d(24, MaskSettings(shape="box", size=10))
    out = apply_mask(images, mask, fill)  # type: ignore[arg-type]
    for k in range(len(images)):
        expected = {"min": images[k].min(), "max": images[k].max()}.get(
            fill, np.float32(images[k].astype(np.float64).mean())
        )
        assert np.all(out[k][mask == 0] == expected)
        np.testing.assert_array_equal(out[k][mask == 1], images[k][mask == 1])


def test_soft_masks_multiply_and_ignore_substitution(images: np.ndarray) -> None:
    mask = mask_2d(24, MaskSettings(shape="raised_cosine", inner=4, outer=10))
    assert not is_binary_mask(mask)
    expected = images * mask
    np.testing.assert_array_equal(apply_mask(images, mask), expected)
    np.testing.assert_array_equal(apply_mask(images, mask, "max", 3.0), expected)


def test_soft_background_is_relion_soft_mask_outside_map(images: np.ndarray) -> None:
    radius, width = 7.0, 3.0
    mask = mask_2d(24, MaskSettings(shape="raised_crown", outer=radius, decay=width))
    out = apply_mask(images, mask, "soft_background")
    for k, img in enumerate(images.astype(np.float64)):
        # softMaskOutsideMap(img, R, w), written out from §11.2
        expected = np.empty_like(img)
        total = weights = 0.0
        c = np.zeros_like(img)
        for i, j in itertools.product(range(24), range(24)):
            d = math.hypot(i - 12, j - 12)
            if d < radius:
                c[i, j] = 0.0
            elif d <= radius + width:
                c[i, j] = 0.5 + 0.5 * math.cos(math.pi * (radius + width - d) / width)
            else:
                c[i, j] = 1.0
            if d >= radius:
                total += c[i, j] * img[i, j]
                weights += c[i, j]
        background = total / weights
        expected = (1 - c) * img + c * background
        np.testing.assert_allclose(out[k], expected, rtol=0, atol=2e-5)


def test_soft_background_with_a_binary_mask_fills_with_the_outside_mean(
    images: np.ndarray,
) -> None:
    mask = mask_2d(24, MaskSettings(shape="circular", radius=6))
    out = apply_mask(images, mask, "soft_background")
    for k in range(len(images)):
        outside = images[k][mask == 0].astype(np.float64).mean()
        np.testing.assert_allclose(out[k][mask == 0], outside, rtol=1e-6)
        np.testing.assert_array_equal(out[k][mask == 1], images[k][mask == 1])
    everything = np.ones((24, 24), np.float32)
    np.testing.assert_array_equal(apply_mask(images, everything, "soft_background"), images)


def test_masks_apply_to_single_images_volumes_and_integer_data() -> None:
    volume = np.arange(6**3, dtype=np.int16).reshape(6, 6, 6)
    mask = mask_3d((6, 6, 6), MaskSettings(shape="circular", radius=2))
    out = apply_mask(volume, mask, "avg")
    assert out.dtype == np.float32
    assert out.shape == (6, 6, 6)
    assert np.all(out[mask == 0] == np.float32(volume.mean()))
    single = apply_mask(volume[0].astype(np.float32), mask[3], "min")
    assert single.shape == (6, 6)
    assert single[0, 0] == 0
    with pytest.raises(ValueError, match="do not fit"):
        apply_mask(volume, mask[:, :5])


def test_mask_cache_builds_each_mask_once_and_shares_it_read_only() -> None:
    cache = MaskCache(max_entries=2)
    settings = MaskSettings(shape="circular", radius=5)
    first = cache.get((32, 32), settings)
    assert cache.get((32, 32), MaskSettings(shape="circular", radius=5)) is first
    assert not first.flags.writeable
    other = cache.get((33, 33), settings)
    assert other is not first
    assert len(cache) == 2
    cache.get((34, 34), settings)
    assert len(cache) == 2  # oldest dropped
    np.testing.assert_array_equal(first, build_mask((32, 32), settings))


# ---------------------------------------------------------------------------------------------
# The chain step


def _stack(box: int, extraction_box: int, n: int = 4, stream: str = "particles") -> ParticleStack:
    rng = np.random.default_rng(box)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    table = pd.DataFrame({"rlnCoordinateX": np.arange(n, dtype=float)})
    return ParticleStack(
        table=table,
        pixel_size_a=1.0 * extraction_box / box,
        extraction_box=extraction_box,
        box=box,
        stream=stream,
        images=images,
    )


def test_mask_step_scales_radii_to_each_stream_and_reuses_its_masks() -> None:
    step = MaskStep.from_mapping(
        {"shape": "raised_cosine", "inner": 100, "outer": 120, "fill": "soft_background"}
    )
    assert isinstance(step, MaskStep)
    assert step.name == "mask"
    assert step.kind == "particles"
    big, small = _stack(256, 256), _stack(64, 256, stream="particles_small")
    expected_small = mask_2d(
        64, MaskSettings(shape="raised_cosine", inner=25, outer=30)
    )  # int(100·64/256), int(120·64/256)
    original = small.real().copy()
    out = step.apply(small)
    assert out.stream == "particles_small"
    np.testing.assert_array_equal(step.mask_for(64, 256), expected_small)
    np.testing.assert_allclose(
        out.real(), apply_mask(original, expected_small, "soft_background"), rtol=1e-6
    )
    step.apply(big)
    np.testing.assert_array_equal(
        step.mask_for(256, 256),
        mask_2d(256, MaskSettings(shape="raised_cosine", inner=100, outer=120)),
    )
    first = step.mask_for(64, 256)
    step.apply(_stack(64, 256, n=9, stream="particles_small"))
    assert step.mask_for(64, 256) is first
    assert step.settings_dict()["shape"] == "raised_cosine"


def test_mask_step_scales_centre_sizes_and_widths() -> None:
    settings = MaskStepSettings(shape="raised_crown", outer=90, decay=6, center=(10, -7))
    scaled = settings.for_stream(64, 256)
    assert scaled.outer == 22
    assert scaled.center == (2.0, -1.0)
    assert scaled.decay == 1.5
    box = MaskStepSettings(shape="box", size=(100, 50)).for_stream(64, 256)
    assert box.size == (25, 12)
    defaults = MaskStep(MaskStepSettings(shape="circular"))
    np.testing.assert_array_equal(
        defaults.mask_for(64, 256), mask_2d(64, MaskSettings(shape="circular", radius=32))
    )


def test_mask_step_refuses_3d_settings_when_the_chain_is_built() -> None:
    for values in ({"shape": "cylinder"}, {"shape": "circular", "center": (1, 2, 3)}):
        with pytest.raises(ValidationError):
            MaskStep.from_mapping(values)
    with pytest.raises(ValidationError, match="mask_file"):
        MaskStep.from_mapping({"shape": "circular", "mask_file": "m.mrc"})


def test_mask_step_scales_to_the_sampling_of_windowed_streams() -> None:
    step = MaskStep(MaskStepSettings(shape="circular", radius=100))
    stack = _stack(48, 256, stream="particles_small")
    stack.sampled_box = 64  # a 64-px Fourier crop windowed to 48 px
    out = step.apply(stack)
    expected = mask_2d(48, MaskSettings(shape="circular", radius=25))  # int(100·64/256)
    np.testing.assert_array_equal(step.mask_for(48, 256, 64), expected)
    assert out.real().shape == (4, 48, 48)
    defaults = MaskStep(MaskStepSettings(shape="raised_cosine"))
    np.testing.assert_array_equal(
        defaults.mask_for(48, 256, 64), mask_2d(48, MaskSettings(shape="raised_cosine", outer=24))
    )


def test_mask_step_refuses_a_centre_outside_the_extraction_box() -> None:
    MaskStep(MaskStepSettings(shape="circular", center=(128, -128))).bind(256)
    with pytest.raises(ConfigError, match="outside the 256-px box") as info:
        MaskStep(MaskStepSettings(shape="circular", center=(129, 0))).bind(256)
    assert info.value.key == "mask.center"


RADIAL_CASES = [
    {"shape": "circular", "radius": 9.0},
    {"shape": "circular", "radius": 7.5},
    {"shape": "crown", "inner": 3.0, "outer": 9.0},
    {"shape": "gaussian", "sigma": 4.0},
    {"shape": "gaussian", "sigma": 4.0, "gaussian_norm": "density"},
    {"shape": "raised_cosine", "inner": 5.0, "outer": 10.0},
    {"shape": "raised_crown", "inner": 4.0, "outer": 9.0, "decay": 2.5},
]


@pytest.mark.parametrize("case", RADIAL_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("convention", ["relion", "xmipp"])
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize(
    ("dims", "center"),
    [((24, 24), (0.0, 0.0)), ((25, 23), (2.0, -3.0)), ((20, 21, 22), (1.0, 0.0, -2.0))],
)
def test_radial_masks_centred_on_whole_pixels_equal_the_direct_evaluation(
    case: dict[str, object],
    convention: str,
    invert: bool,
    dims: tuple[int, ...],
    center: tuple[float, ...],
) -> None:
    # build_mask takes a lookup path (profile per integer squared distance) for these masks;
    # it must give exactly what evaluating every pixel gives.
    from flybox.processors.mask.shapes import _logical_axes, _radial_profile

    settings = MaskSettings(
        **case,
        convention=convention,
        invert=invert,
        center=center,  # type: ignore[arg-type]
    )
    fast = build_mask(dims, settings)
    geometry = settings.resolved(dims)
    axes = _logical_axes(geometry.dims, geometry.center)
    r2 = sum(a * a for a in axes)
    direct = _radial_profile(geometry, np.broadcast_to(r2, dims)).astype(np.float32)
    assert fast.shape == dims
    assert fast.dtype == np.float32
    np.testing.assert_array_equal(fast, direct)
    assert fast.min() < fast.max()  # a real mask, not a constant
