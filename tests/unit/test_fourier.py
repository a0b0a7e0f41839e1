"""Fourier crop / rescale with RELION's conventions, the fan-out step and the window step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flybox.processors.base import ParticleStack
from flybox.processors.fourier import (
    FourierCropSettings,
    FourierCropStep,
    WindowSettings,
    WindowStep,
    fourier_resize,
    rescaled_box,
    resize_spectrum,
    window_images,
)


def relion_resize_reference(image: np.ndarray, m: int) -> np.ndarray:
    """ALGORITHMS.md §8.1 written out with numpy, index by index (RELION's resizeMap)."""
    n = image.shape[0]
    f = np.fft.rfft2(image.astype(np.float64)) / (n * n)
    g = np.zeros((m, m // 2 + 1), dtype=complex)
    for row in range(m):
        k = row if row <= m // 2 else row - m
        for col in range(m // 2 + 1):
            g[row, col] = f[k % n, col]
    return np.fft.irfft2(g, s=(m, m)) * (m * m)


def stack_of(images: np.ndarray, pixel: float = 1.0) -> ParticleStack:
    n, box, _ = images.shape
    table = pd.DataFrame({"rlnCoordinateX": np.arange(n, dtype=float), "rlnCoordinateY": 0.0})
    return ParticleStack(
        table=table, pixel_size_a=pixel, extraction_box=box, box=box, images=images
    )


@pytest.mark.parametrize(("n", "m"), [(64, 32), (64, 48), (65, 32), (96, 48), (64, 64)])
def test_crop_matches_relion_coefficient_map(n: int, m: int) -> None:
    image = np.random.default_rng(n + m).normal(size=(n, n)).astype(np.float32)
    ours = fourier_resize(image[None], m)[0]
    np.testing.assert_allclose(ours, relion_resize_reference(image, m), atol=2e-5)


def test_nyquist_row_comes_from_positive_frequency() -> None:
    n, m = 16, 8
    spectrum = np.zeros((1, n, n // 2 + 1), dtype=np.complex64)
    spectrum[0, m // 2, 1] = 1.0  # +m/2 row: kept as the output Nyquist row
    spectrum[0, n - m // 2, 2] = 5.0  # -m/2 row: dropped
    out = resize_spectrum(spectrum, n, m)
    assert out[0, m // 2, 1] == 1.0
    assert not np.any(out[0, :, 2])


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([32, 48, 64, 65]),
    m=st.sampled_from([16, 24, 32]),
    seed=st.integers(0, 10_000),
    offset=st.floats(-100, 100),
)
def test_fourier_crop_keeps_the_mean(n: int, m: int, seed: int, offset: float) -> None:
    images = np.random.default_rng(seed).normal(offset, 1.0, size=(3, n, n)).astype(np.float32)
    out = fourier_resize(images, m)
    np.testing.assert_allclose(
        out.mean(axis=(1, 2)),
        images.mean(axis=(1, 2), dtype=np.float64),
        atol=1e-4 + 1e-6 * abs(offset),
    )


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([32, 64, 96]), m=st.sampled_from([16, 32, 48]))
def test_fourier_crop_keeps_the_centre(n: int, m: int) -> None:
    # A smooth blob centred at n//2 stays centred at m//2.
    grid = np.arange(n) - n // 2
    blob = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * (n / 10) ** 2)).astype(
        np.float32
    )
    out = fourier_resize(blob[None], m)[0]
    assert np.unravel_index(np.argmax(out), out.shape) == (m // 2, m // 2)


def test_upscaling_copies_a_sphere_of_coefficients() -> None:
    image = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    up = fourier_resize(image[None], 64)[0]
    assert up.shape == (64, 64)
    assert up.mean() == pytest.approx(float(image.mean()), abs=1e-5)
    down = fourier_resize(up[None], 32)[0]
    # Down-sampling the up-sampled image keeps the frequencies inside the sphere.
    f_image = np.fft.rfft2(image)
    f_down = np.fft.rfft2(down)
    k = np.fft.fftfreq(32) * 32
    inside = (k[:, None] ** 2 + np.arange(17)[None, :] ** 2) < 15**2
    np.testing.assert_allclose(f_down[inside], f_image[inside], atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"factor": 0.25}, 64),
        ({"factor": 0.3}, 76),
        ({"target_pixel_size_a": 4.0, "pixel_size_a": 1.0}, 64),
        ({"target_pixel_size_a": 3.3, "pixel_size_a": 1.1}, 86),
    ],
)
def test_rescaled_box_is_even_and_close_to_the_request(
    kwargs: dict[str, float], expected: int
) -> None:
    assert rescaled_box(256, **kwargs) == expected


def test_rescaled_box_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        rescaled_box(256)
    with pytest.raises(ValueError, match="pixel size"):
        rescaled_box(256, target_pixel_size_a=2.0)


def test_fan_out_makes_named_streams_with_pixel_sizes() -> None:
    images = np.random.default_rng(2).normal(size=(4, 64, 64)).astype(np.float32)
    step = FourierCropStep(FourierCropSettings(outputs={"particles": 64, "particles_small": 16}))
    stacks = step.apply(stack_of(images.copy(), pixel=1.25))
    assert list(stacks) == ["particles", "particles_small"]
    np.testing.assert_array_equal(stacks["particles"].real(), images)
    small = stacks["particles_small"]
    assert small.box == 16
    assert small.pixel_size_a == pytest.approx(5.0)
    np.testing.assert_allclose(small.real(), fourier_resize(images, 16), atol=1e-5)
    assert small.scale_radius(24) == 6


@pytest.mark.parametrize(
    "outputs",
    [
        {"particles": 24, "particles_small": 16, "particles_tiny": 8},
        {"particles": 32, "particles_small": 16},
        {"particles": 48, "particles_small": 16},
    ],
)
def test_fan_out_transforms_each_particle_once(
    monkeypatch: pytest.MonkeyPatch, outputs: dict[str, int]
) -> None:
    import flybox.processors.base as base
    import flybox.processors.fourier as fourier

    calls: list[int] = []
    full, pruned = base.rfftn_last, fourier.cropped_rfft2

    def counting_full(x: np.ndarray, ndim: int = 2) -> np.ndarray:
        calls.append(len(x))
        return full(x, ndim)

    def counting_pruned(x: np.ndarray, m: int) -> np.ndarray:
        calls.append(len(x))
        return pruned(x, m)

    monkeypatch.setattr(base, "rfftn_last", counting_full)
    monkeypatch.setattr(fourier, "cropped_rfft2", counting_pruned)
    images = np.random.default_rng(3).normal(size=(5, 32, 32)).astype(np.float32)
    stacks = FourierCropStep(FourierCropSettings(outputs=outputs)).apply(stack_of(images.copy()))
    assert calls == [5]
    for stream, size in outputs.items():
        np.testing.assert_allclose(stacks[stream].real(), fourier_resize(images, size), atol=2e-5)


def test_stream_names_must_be_snake_case() -> None:
    with pytest.raises(ValueError, match="lower_snake_case"):
        FourierCropSettings(outputs={"Particles": 64})
    with pytest.raises(ValueError, match="at least 2"):
        FourierCropSettings(outputs={"particles": 1})


def test_window_crops_and_pads_around_the_centre() -> None:
    images = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    cropped = window_images(images, 4)
    np.testing.assert_array_equal(cropped, images[:, 2:6, 2:6])
    padded = window_images(images, 12)
    np.testing.assert_array_equal(padded[:, 2:10, 2:10], images)
    assert padded[:, :2].sum() == 0
    assert window_images(images, 4)[0, 2, 2] == images[0, 4, 4]


def test_window_step_applies_to_listed_streams_only_and_keeps_sampling() -> None:
    images = np.ones((2, 16, 16), dtype=np.float32)
    step = WindowStep(WindowSettings(size=12, streams=["particles"]))
    main = step.apply(stack_of(images))
    assert main.box == 12
    assert main.sampled_box == 16
    assert main.scale_radius(6) == 6
    other = stack_of(images)
    other.stream = "particles_small"
    assert step.apply(other).box == 16


@pytest.mark.parametrize("aligned", [True, False])
def test_pruned_crop_equals_the_full_transform_cropped_and_leaves_its_input(
    aligned: bool,
) -> None:
    # Whole aligned blocks are transformed in place (no copy), the rest through the plan's
    # own buffer: several blocks and a partial last one, aligned or not, give the same
    # spectra as the full transform cropped, and the images stay as they were.
    from flybox.processors.fft import BLOCK, cropped_rfft2, empty_aligned, rfftn_last

    count = 2 * BLOCK + 3
    rng = np.random.default_rng(7)
    if aligned:
        images = empty_aligned((count, 32, 32), np.float32)
    else:
        images = np.empty(count * 32 * 32 + 1, dtype=np.float32)[1:].reshape(count, 32, 32)
    images[...] = rng.normal(size=images.shape)
    before = images.copy()
    for m in (16, 10):
        pruned = cropped_rfft2(images, m)
        expected = resize_spectrum(rfftn_last(before), 32, m)
        np.testing.assert_allclose(pruned, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(images, before)
    # The plans are left on their own buffers: a later unaligned call is still correct.
    odd = np.empty(3 * 32 * 32 + 1, dtype=np.float32)[1:].reshape(3, 32, 32)
    odd[...] = rng.normal(size=odd.shape)
    np.testing.assert_allclose(
        cropped_rfft2(odd, 16), resize_spectrum(rfftn_last(odd.copy()), 32, 16), atol=1e-3
    )
