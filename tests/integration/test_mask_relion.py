"""Parity with ``relion_mask_create --denovo`` (RELION 3.1, ``raisedCrownMask``), to 1e-5.

RELION is the numeric reference (STYLE.md practice 10): these tests skip with a reason when
``relion_mask_create`` is not installed, and fail instead under ``CI=true``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from flybox.io.mrc import read_volume
from flybox.processors.mask import MaskSettings, mask_2d, mask_3d
from tests.conftest import require_binary

pytestmark = pytest.mark.relion

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def relion_mask_create() -> str:
    """Path of ``relion_mask_create``; skip without it, fail without it in CI."""
    return require_binary("relion_mask_create")


def denovo(
    program: str,
    out: Path,
    box: int,
    *,
    outer: float,
    inner: float = 0.0,
    width: float = 0.0,
    center: tuple[float, float, float] = (0.0, 0.0, 0.0),
    invert: bool = False,
) -> np.ndarray:
    """Run ``relion_mask_create --denovo`` and read the mask it writes."""
    command = [
        program,
        "--denovo",
        "--box_size", str(box),
        "--outer_radius", repr(outer),
        "--inner_radius", repr(inner),
        "--width_soft_edge", repr(width),
        "--center_x", repr(center[0]),
        "--center_y", repr(center[1]),
        "--center_z", repr(center[2]),
        "--angpix", "1",
        "--o", str(out),
    ]  # fmt: skip
    if invert:
        command.append("--invert")
    subprocess.run(command, check=True, capture_output=True, cwd=out.parent, timeout=120)
    data, _ = read_volume(out)
    return np.asarray(data, dtype=np.float64)


CASES = [
    # id, box, outer, inner, width, centre (x, y, z)
    ("sphere-even", 32, 10.0, 0.0, 0.0, (0.0, 0.0, 0.0)),
    ("sphere-odd", 33, 10.0, 0.0, 0.0, (0.0, 0.0, 0.0)),
    ("sphere-even-shifted", 32, 9.0, 0.0, 0.0, (3.0, -2.0, 1.0)),
    ("sphere-odd-shifted", 33, 8.5, 0.0, 0.0, (-4.0, 2.0, -3.0)),
    ("soft-sphere-even-shifted", 32, 9.0, 0.0, 4.0, (2.0, 1.0, -1.0)),
    ("soft-sphere-odd-fractional", 31, 7.5, 0.0, 3.5, (1.5, -0.5, 2.25)),
    ("raised-crown-even", 32, 12.0, 5.0, 3.0, (0.0, 0.0, 0.0)),
    ("raised-crown-odd-shifted", 33, 11.0, 4.0, 3.0, (-2.0, 3.0, 1.0)),
    ("raised-crown-even-shifted", 40, 14.0, 6.0, 5.0, (4.0, -3.0, -2.0)),
    ("raised-crown-odd-fractional", 27, 9.5, 3.5, 2.5, (0.5, 1.5, -1.5)),
    ("raised-crown-narrow-inner", 30, 10.0, 2.0, 4.0, (1.0, 1.0, 1.0)),
    # z = 0: their central sections are also compared with 2D masks
    ("sphere-even-shifted-xy", 32, 9.0, 0.0, 0.0, (3.0, -2.0, 0.0)),
    ("soft-sphere-odd-shifted-xy", 33, 10.0, 0.0, 4.0, (-2.5, 1.0, 0.0)),
    ("raised-crown-odd-shifted-xy", 33, 11.0, 4.0, 3.0, (-2.0, 3.0, 0.0)),
    ("raised-crown-even-shifted-xy", 64, 20.0, 8.0, 6.0, (5.0, -7.0, 0.0)),
]


def _settings(outer: float, inner: float, width: float, center: tuple[float, ...]) -> MaskSettings:
    if inner == 0 and width == 0:
        return MaskSettings(shape="sphere", radius=outer, center=center, convention="relion")  # type: ignore[arg-type]
    return MaskSettings(
        shape="raised_crown",
        inner=inner,
        outer=outer,
        decay=width,
        center=center,
        convention="relion",
    )


@pytest.mark.parametrize(
    ("box", "outer", "inner", "width", "center"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_3d_masks_match_relion_mask_create_denovo(
    relion_mask_create: str,
    tmp_path: Path,
    box: int,
    outer: float,
    inner: float,
    width: float,
    center: tuple[float, float, float],
) -> None:
    expected = denovo(
        relion_mask_create,
        tmp_path / "mask.mrc",
        box,
        outer=outer,
        inner=inner,
        width=width,
        center=center,
    )
    ours = mask_3d((box, box, box), _settings(outer, inner, width, center))
    assert expected.shape == ours.shape
    assert expected.max() == 1.0  # the reference is a real mask, not an empty file
    difference = float(np.abs(ours - expected).max())
    assert difference <= TOLERANCE, f"max |flybox - RELION| = {difference:.3g}"


@pytest.mark.parametrize(
    ("box", "outer", "inner", "width", "center"),
    [case[1:] for case in CASES if case[5][2] == 0.0],
    ids=[case[0] for case in CASES if case[5][2] == 0.0],
)
def test_2d_masks_match_the_central_section_of_relion_masks(
    relion_mask_create: str,
    tmp_path: Path,
    box: int,
    outer: float,
    inner: float,
    width: float,
    center: tuple[float, float, float],
) -> None:
    volume = denovo(
        relion_mask_create,
        tmp_path / "mask.mrc",
        box,
        outer=outer,
        inner=inner,
        width=width,
        center=center,
    )
    ours = mask_2d(box, _settings(outer, inner, width, center[:2]))
    assert float(np.abs(ours - volume[box // 2]).max()) <= TOLERANCE


def test_inverted_raised_crown_matches_relion_invert(
    relion_mask_create: str, tmp_path: Path
) -> None:
    center = (2.0, -1.0, 3.0)
    expected = denovo(
        relion_mask_create,
        tmp_path / "inverted.mrc",
        34,
        outer=11.0,
        inner=4.0,
        width=3.0,
        center=center,
        invert=True,
    )
    settings = _settings(11.0, 4.0, 3.0, center).model_copy(update={"invert": True})
    ours = mask_3d((34, 34, 34), settings)
    assert expected.min() == 0.0
    assert float(np.abs(ours - expected).max()) <= TOLERANCE
