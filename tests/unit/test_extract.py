"""Box extraction: centre convention, rounding, border policies, fill order, descriptors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flybox.processors.base import Micrograph, ParticleStack
from flybox.processors.edges import apply_edge_fill
from flybox.processors.extract import ExtractSettings, ExtractStep, box_windows, picks_frame


def micrograph(image: np.ndarray, x: list[float], y: list[float]) -> Micrograph:
    return Micrograph(image, 1.0, "mic.mrc", picks_frame(x, y))


def extract(
    image: np.ndarray, x: list[float], y: list[float], **settings: object
) -> tuple[ParticleStack, int]:
    step = ExtractStep(ExtractSettings.model_validate({"box": 8, **settings}))
    return step.apply(micrograph(image, x, y))


@settings(max_examples=60, deadline=None)
@given(
    box=st.integers(min_value=2, max_value=33),
    x=st.floats(min_value=0, max_value=79.99),
    y=st.floats(min_value=0, max_value=59.99),
)
def test_impulse_at_pick_lands_at_box_centre(box: int, x: float, y: float) -> None:
    image = np.zeros((60, 80), dtype=np.float32)
    image[int(y), int(x)] = 1.0
    step = ExtractStep(ExtractSettings(box=box, border="fill"))
    stack, excluded = step.apply(micrograph(image, [x], [y]))
    assert excluded == 0
    boxes = stack.real()
    assert boxes[0, box // 2, box // 2] == 1.0


def test_box_covers_centre_minus_half_box_for_even_and_odd_sizes() -> None:
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    for box in (6, 7):
        stack, _ = ExtractStep(ExtractSettings(box=box)).apply(micrograph(image, [20.0], [15.0]))
        r0, c0 = 15 - box // 2, 20 - box // 2
        np.testing.assert_array_equal(stack.real()[0], image[r0 : r0 + box, c0 : c0 + box])


@pytest.mark.parametrize(
    ("coordinate", "rounding", "centre"),
    [
        (100.5, "trunc", 100),
        (100.7, "trunc", 100),
        (100.5, "round", 101),
        (100.4, "round", 100),
        (100.7, "floor", 100),
    ],
)
def test_centre_rounding_modes(coordinate: float, rounding: str, centre: int) -> None:
    image = np.zeros((300, 300), dtype=np.float32)
    image[150, centre] = 1.0
    stack, _ = extract(image, [coordinate], [150.0], center_rounding=rounding)
    assert stack.real()[0, 4, 4] == 1.0
    assert stack.table["rlnCoordinateX"].iloc[0] == coordinate


def test_fill_replicates_nearest_edge_pixels_like_relion() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(30, 40)).astype(np.float32)
    # Corner box: 3 px outside on the left, 2 px outside at the top.
    stack, excluded = extract(image, [1.0], [2.0], border="fill")
    assert excluded == 0
    rows = np.clip(np.arange(8) + 2 - 4, 0, 29)
    cols = np.clip(np.arange(8) + 1 - 4, 0, 39)
    np.testing.assert_array_equal(stack.real()[0], image[np.ix_(rows, cols)])
    assert stack.table["flyboxBorderFraction"].iloc[0] == pytest.approx(1 - (6 * 5) / 64)


def test_fill_is_pending_so_a_fourier_step_sees_mean_padded_boxes() -> None:
    image = np.full((30, 40), 5.0, dtype=np.float32)
    image[:, :2] = 1.0
    stack, _ = extract(image, [1.0], [15.0], border="fill")
    assert stack.pending_fill is not None
    # A Fourier step asking for the unfilled boxes sees the micrograph mean outside.
    spectrum = stack.fourier(before_fill=True)
    assert spectrum[0, 0, 0].real / 64 == pytest.approx(
        (float(image.mean()) * 3 * 8 + 1.0 * 2 * 8 + 5.0 * 3 * 8) / 64
    )
    assert stack.pending_fill is not None
    assert stack.real()[0, 0, 0] == 1.0
    assert stack.pending_fill is None


def test_skip_excludes_boxes_crossing_the_edge_and_counts_them() -> None:
    image = np.ones((50, 50), dtype=np.float32)
    stack, excluded = extract(
        image, [25.0, 3.0, 47.0, 25.0], [25.0, 25.0, 25.0, 4.0], border="skip"
    )
    assert excluded == 2
    assert len(stack) == 2
    assert list(stack.table["rlnCoordinateY"]) == [25.0, 4.0]
    assert (stack.table["flyboxBorderFraction"] == 0).all()


def test_box_touching_the_edge_is_inside_and_one_pixel_out_is_not() -> None:
    image = np.ones((50, 50), dtype=np.float32)
    # Box 8 centred at 4 covers 0..7 and at 46 covers 42..49 (touching the edges);
    # centred at 3 it covers -1..6 and at 47 it covers 43..50 (one pixel out).
    _, excluded = extract(image, [4.0, 46.0], [25.0, 25.0], border="skip")
    assert excluded == 0
    _, excluded = extract(image, [3.0, 47.0], [25.0, 25.0], border="skip")
    assert excluded == 2


def test_box_entirely_outside_is_excluded_even_with_fill() -> None:
    image = np.ones((50, 50), dtype=np.float32)
    stack, excluded = extract(image, [-20.0, 25.0], [25.0, 25.0], border="fill")
    assert excluded == 1
    assert len(stack) == 1


def test_box_windows_reports_valid_region_and_inside_count() -> None:
    cx = np.array([1, 10], dtype=np.int64)
    cy = np.array([10, 19], dtype=np.int64)
    corners, windows, inside = box_windows(cx, cy, 6, (20, 20))
    assert corners.tolist() == [[7, -2], [16, 7]]
    assert windows.tolist() == [[0, 6, 2, 6], [0, 4, 0, 6]]
    assert inside.tolist() == [24, 24]


def test_integer_micrograph_modes_are_extracted_as_float32() -> None:
    image = (np.arange(30 * 30) % 65535).astype(np.uint16).reshape(30, 30)
    stack, _ = extract(image, [15.0], [15.0])
    assert stack.real().dtype == np.float32
    np.testing.assert_array_equal(stack.real()[0], image[11:19, 11:19].astype(np.float32))


def test_local_average_is_the_box_mean_after_fill() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(10.0, 1.0, size=(40, 40)).astype(np.float32)
    stack, _ = extract(image, [20.0, 1.0], [20.0, 20.0], local_average=True)
    means = stack.real().mean(axis=(1, 2), dtype=np.float64)
    np.testing.assert_allclose(stack.table["flyboxLocalAverage"], means, rtol=1e-6)


def test_picks_columns_are_carried_into_rows() -> None:
    image = np.ones((40, 40), dtype=np.float32)
    picks = pd.DataFrame(
        {"rlnCoordinateX": [20.0], "rlnCoordinateY": [20.0], "rlnAutopickFigureOfMerit": [0.8]}
    )
    stack, _ = ExtractStep(ExtractSettings(box=8)).apply(Micrograph(image, 1.3, "a.mrc", picks))
    assert stack.table["rlnAutopickFigureOfMerit"].iloc[0] == 0.8
    assert stack.table["rlnMicrographName"].iloc[0] == "a.mrc"
    assert stack.pixel_size_a == 1.3


def test_apply_edge_fill_equals_index_clamping() -> None:
    rng = np.random.default_rng(5)
    images = rng.normal(size=(2, 6, 6)).astype(np.float32)
    windows = np.array([[0, 6, 0, 6], [1, 4, 2, 6]])
    filled = apply_edge_fill(images, windows)
    np.testing.assert_array_equal(filled[0], images[0])
    rows = np.clip(np.arange(6), 1, 3)
    cols = np.clip(np.arange(6), 2, 5)
    np.testing.assert_array_equal(filled[1], images[1][np.ix_(rows, cols)])


def test_settings_refuse_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="extra"):
        ExtractSettings.model_validate({"box": 8, "boxx": 3})
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        ExtractSettings.model_validate({"box": 1})
    with pytest.raises(ValueError, match="'fill' or 'skip'"):
        ExtractSettings.model_validate({"box": 8, "border": "edge"})
