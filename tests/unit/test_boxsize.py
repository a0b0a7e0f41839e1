"""FFT-efficient box sizes and box checks (ALGORITHMS.md §13, §1.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flybox.errors import ConfigError
from flybox.processors.boxsize import (
    EFFICIENT_SIZES,
    check_box,
    get_even,
    is_efficient,
    next_efficient_size,
    suggest_box,
)


def test_table_is_the_cryosparc_list() -> None:
    assert len(EFFICIENT_SIZES) == 67
    assert EFFICIENT_SIZES[:8] == (32, 36, 40, 42, 48, 56, 60, 64)
    assert EFFICIENT_SIZES[-5:] == (2160, 2592, 2744, 3456, 4096)
    assert list(EFFICIENT_SIZES) == sorted(set(EFFICIENT_SIZES))
    assert all(size % 2 == 0 for size in EFFICIENT_SIZES)
    # Curated, not "every even 7-smooth number".
    for absent in (50, 98, 126, 150):
        assert absent not in EFFICIENT_SIZES
        assert not is_efficient(absent)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(1, 32), (32, 32), (33, 36), (250, 256), (256, 256), (257, 270), (4000, 4096), (4096, 4096)],
)
def test_next_efficient_size_within_the_table(requested: int, expected: int) -> None:
    assert next_efficient_size(requested) == expected


def test_next_efficient_size_beyond_the_table_is_even_and_7_smooth() -> None:
    # 4098 = 2·3·683, 4100 = 2²·5²·41, …, 4116 = 2²·3·7³ is the first even 7-smooth one.
    assert next_efficient_size(4097) == 4116
    assert next_efficient_size(4116) == 4116
    assert next_efficient_size(4117) == 4200  # 2³·3·5²·7
    assert is_efficient(4116)
    assert not is_efficient(4117)
    assert not is_efficient(4110)  # 2·3·5·137


@given(st.integers(min_value=1, max_value=9000))
def test_next_efficient_size_is_the_smallest_efficient_size_not_below_the_request(n: int) -> None:
    result = next_efficient_size(n)
    assert result >= n
    assert is_efficient(result)
    assert not any(is_efficient(m) for m in range(n, result))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(135.9, 136), (270.0, 270), (271, 272), (0, 0), (1, 2), (2.99, 2), (-3, 0)],
)
def test_get_even_truncates_then_rounds_odd_values_up(value: float, expected: int) -> None:
    assert get_even(value) == expected


@pytest.mark.parametrize(
    ("picking_box", "expected"),
    [(180, 270), (100, 160), (64, 96), (170, 256), (256, 384)],
)
def test_suggest_box_is_one_and_a_half_picking_boxes_made_efficient(
    picking_box: int, expected: int
) -> None:
    assert suggest_box(picking_box) == expected


def test_check_box_accepts_an_efficient_even_box_silently() -> None:
    assert check_box(256, convention="relion") == []
    assert check_box(270, convention="xmipp") == []


def test_check_box_warns_about_an_off_table_size() -> None:
    assert check_box(250, convention="relion") == [
        "box 250 is not an FFT-efficient size; next efficient size is 256"
    ]
    assert check_box(150, convention="xmipp", what="small_box") == [
        "small_box 150 is not an FFT-efficient size; next efficient size is 160"
    ]


def test_odd_box_is_an_error_for_relion_and_a_warning_for_xmipp() -> None:
    with pytest.raises(ConfigError) as info:
        check_box(251, convention="relion", what="extract.box")
    assert info.value.key == "extract.box"
    assert "odd" in info.value.problem
    assert "256" in info.value.problem
    assert check_box(251, convention="xmipp") == [
        "box 251 is not an FFT-efficient size; next efficient size is 256"
    ]


@pytest.mark.parametrize("box", [1, 0, -4])
def test_box_below_two_pixels_is_an_error(box: int) -> None:
    with pytest.raises(ConfigError) as info:
        check_box(box, convention="xmipp")
    assert info.value.key == "box"
