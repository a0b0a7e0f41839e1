"""Integer centres, coordinate rescaling and RELION re-centring (ALGORITHMS.md §2, §9, §10)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import given
from hypothesis import strategies as st

from flybox.processors.coordinates import (
    euler_matrix_relion,
    integer_centres,
    recenter_picks,
    rescale_coordinates,
    round_half_away,
)
from tests.conftest import require_binary

FRACTIONAL = np.array([100.5, 100.7, -0.5, -1.5])


def test_round_half_away_differs_from_numpy_round_on_ties() -> None:
    np.testing.assert_array_equal(round_half_away(FRACTIONAL), [101.0, 101.0, -1.0, -2.0])
    np.testing.assert_array_equal(np.round(FRACTIONAL), [100.0, 101.0, -0.0, -2.0])
    np.testing.assert_array_equal(round_half_away([2.5, -2.5, 0.5, 3.0]), [3.0, -3.0, 1.0, 3.0])


def test_round_half_away_is_exact_just_below_a_half() -> None:
    below_half = np.nextafter(0.5, 0.0)  # 0.49999999999999994; floor(x + 0.5) would give 1
    assert round_half_away(below_half) == 0.0
    assert round_half_away(-below_half) == 0.0
    assert round_half_away(np.nextafter(2.5, 0.0)) == 2.0


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [
        ("trunc", [100, 100, 0, -1]),
        ("round", [101, 101, -1, -2]),
        ("floor", [100, 100, -1, -2]),
    ],
)
def test_integer_centres_follow_the_rounding_rule(rounding: str, expected: list[int]) -> None:
    cx, cy = integer_centres(FRACTIONAL, FRACTIONAL[::-1], rounding)  # type: ignore[arg-type]
    assert cx.dtype == np.int64
    assert cy.dtype == np.int64
    np.testing.assert_array_equal(cx, expected)
    np.testing.assert_array_equal(cy, expected[::-1])


def test_integer_centres_refuse_an_unknown_rounding() -> None:
    with pytest.raises(ValueError, match="rounding"):
        integer_centres([1.0], [1.0], "nearest")  # type: ignore[arg-type]


def test_rescale_multiplies_as_floats_without_rounding_and_keeps_other_columns() -> None:
    picks = pd.DataFrame(
        {
            "rlnCoordinateX": [10, 25],
            "rlnCoordinateY": [7, 3],
            "rlnAutopickFigureOfMerit": [1.5, 2.5],
        }
    )
    out = rescale_coordinates(picks, 2.5)
    np.testing.assert_array_equal(out["rlnCoordinateX"], [25.0, 62.5])
    np.testing.assert_array_equal(out["rlnCoordinateY"], [17.5, 7.5])
    assert out["rlnCoordinateX"].dtype == np.float64
    np.testing.assert_array_equal(out["rlnAutopickFigureOfMerit"], [1.5, 2.5])
    np.testing.assert_array_equal(picks["rlnCoordinateX"], [10, 25])  # input untouched


def _particles(**columns: list[float]) -> pd.DataFrame:
    base: dict[str, list[float] | list[str]] = {
        "rlnCoordinateX": [100.0],
        "rlnCoordinateY": [200.0],
        "rlnMicrographName": ["mic.mrc"],
    }
    base.update(columns)
    return pd.DataFrame(base)


def test_recenter_moves_by_the_rounded_origin_and_keeps_the_residual() -> None:
    particles = _particles(rlnOriginXAngst=[2.6], rlnOriginYAngst=[-1.4])
    out = recenter_picks(particles, particle_pixel_size_a=1.0, micrograph_pixel_size_a=1.0)
    # o = (2.6, −1.4) → ROUND = (3, −1) → X' = 97, Y' = 201, residual (−0.4, −0.4) Å.
    assert out["rlnCoordinateX"].iloc[0] == 97.0
    assert out["rlnCoordinateY"].iloc[0] == 201.0
    assert out["rlnOriginXAngst"].iloc[0] == pytest.approx(-0.4)
    assert out["rlnOriginYAngst"].iloc[0] == pytest.approx(-0.4)
    assert out["rlnMicrographName"].iloc[0] == "mic.mrc"
    assert particles["rlnCoordinateX"].iloc[0] == 100.0  # input untouched


def test_recenter_rounds_half_pixel_ties_away_from_zero() -> None:
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": [50.0, 50.0],
            "rlnCoordinateY": [60.0, 60.0],
            "rlnOriginXAngst": [2.5, -2.5],
            "rlnOriginYAngst": [-0.5, 0.5],
        }
    )
    out = recenter_picks(particles, particle_pixel_size_a=1.0, micrograph_pixel_size_a=1.0)
    np.testing.assert_array_equal(out["rlnCoordinateX"], [47.0, 53.0])
    np.testing.assert_array_equal(out["rlnCoordinateY"], [61.0, 59.0])
    np.testing.assert_array_equal(out["rlnOriginXAngst"], [-0.5, 0.5])
    np.testing.assert_array_equal(out["rlnOriginYAngst"], [0.5, -0.5])


def test_recenter_converts_between_particle_and_micrograph_pixel_sizes() -> None:
    particles = _particles(rlnOriginXAngst=[5.0], rlnOriginYAngst=[3.0])
    out = recenter_picks(particles, particle_pixel_size_a=2.0, micrograph_pixel_size_a=1.25)
    # x: o = 2.5 px → o_mic = 2.5·2/1.25 = 4.0 → X' = 96, residual 0
    # y: o = 1.5 px → o_mic = 2.4 → ROUND 2 → Y' = 198, residual 0.4 px = 0.5 Å
    assert out["rlnCoordinateX"].iloc[0] == 96.0
    assert out["rlnOriginXAngst"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert out["rlnCoordinateY"].iloc[0] == 198.0
    assert out["rlnOriginYAngst"].iloc[0] == pytest.approx(0.5)


def test_recenter_reads_relion_30_pixel_origins() -> None:
    angstrom = _particles(rlnOriginXAngst=[5.0], rlnOriginYAngst=[3.0])
    pixels = _particles(rlnOriginX=[2.5], rlnOriginY=[1.5])
    expected = recenter_picks(angstrom, particle_pixel_size_a=2.0, micrograph_pixel_size_a=1.25)
    out = recenter_picks(pixels, particle_pixel_size_a=2.0, micrograph_pixel_size_a=1.25)
    assert "rlnOriginX" not in out
    assert "rlnOriginY" not in out
    pd.testing.assert_frame_equal(out[expected.columns], expected)


def test_recenter_accepts_one_pixel_size_per_row() -> None:
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": [10.0, 10.0],
            "rlnCoordinateY": [10.0, 10.0],
            "rlnOriginXAngst": [4.0, 4.0],
            "rlnOriginYAngst": [0.0, 0.0],
        }
    )
    out = recenter_picks(
        particles, particle_pixel_size_a=np.array([1.0, 2.0]), micrograph_pixel_size_a=1.0
    )
    np.testing.assert_array_equal(out["rlnCoordinateX"], [6.0, 6.0])  # origins are in Å


def test_euler_matrix_is_relions_zyz_product() -> None:
    def rz(angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])

    def ry(angle: float) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])

    rot, tilt, psi = 30.0, 50.0, -70.0
    expected = rz(math.radians(psi)) @ ry(math.radians(tilt)) @ rz(math.radians(rot))
    matrix = euler_matrix_relion(rot, tilt, psi)
    np.testing.assert_allclose(matrix, expected, atol=1e-15)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-15)


def test_recenter_on_a_point_projects_it_with_the_euler_matrix() -> None:
    # psi = 90°: A = [[0, 1, 0], [−1, 0, 0], [0, 0, 1]], so P = A·(10, 0, 0) = (0, −10).
    # o = origin − P = (0, 10): the particle moves down by 10 px.
    particles = _particles(
        rlnOriginXAngst=[0.0], rlnOriginYAngst=[0.0], rlnAngleRot=[0.0], rlnAngleTilt=[0.0],
        rlnAnglePsi=[90.0],
    )  # fmt: skip
    out = recenter_picks(
        particles,
        particle_pixel_size_a=1.0,
        micrograph_pixel_size_a=1.0,
        recenter_xyz=(10.0, 0.0, 0.0),
    )
    assert out["rlnCoordinateX"].iloc[0] == 100.0
    assert out["rlnCoordinateY"].iloc[0] == 190.0
    assert out["rlnOriginYAngst"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_recenter_point_is_scaled_by_the_reference_pixel_size() -> None:
    # tilt = 90°: the third column of A is (−1, 0, 0); c = (0, 0, 5)·(2 Å / 1 Å) = (0, 0, 10),
    # so P = (−10, 0), o = 0 − P = (10, 0) and X' = X − 10.
    particles = _particles(rlnOriginXAngst=[0.0], rlnOriginYAngst=[0.0], rlnAngleTilt=[90.0])
    out = recenter_picks(
        particles,
        particle_pixel_size_a=1.0,
        micrograph_pixel_size_a=1.0,
        recenter_xyz=(0.0, 0.0, 5.0),
        ref_pixel_size_a=2.0,
    )
    assert out["rlnCoordinateX"].iloc[0] == 90.0
    assert out["rlnCoordinateY"].iloc[0] == 200.0


def test_recenter_needs_origins() -> None:
    with pytest.raises(ValueError, match="rlnOriginXAngst"):
        recenter_picks(_particles(), particle_pixel_size_a=1.0, micrograph_pixel_size_a=1.0)
    with pytest.raises(ValueError, match="positive"):
        recenter_picks(
            _particles(rlnOriginXAngst=[0.0], rlnOriginYAngst=[0.0]),
            particle_pixel_size_a=0.0,
            micrograph_pixel_size_a=1.0,
        )


coordinate = st.floats(min_value=-500, max_value=5000, allow_nan=False)
origin = st.floats(min_value=-200, max_value=200, allow_nan=False)
pixel = st.floats(min_value=0.3, max_value=5.0)


@given(x=coordinate, y=coordinate, ox=origin, oy=origin, p_part=pixel, p_mic=pixel)
def test_recentring_preserves_the_true_centre(
    x: float, y: float, ox: float, oy: float, p_part: float, p_mic: float
) -> None:
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": [x],
            "rlnCoordinateY": [y],
            "rlnOriginXAngst": [ox],
            "rlnOriginYAngst": [oy],
        }
    )
    out = recenter_picks(particles, particle_pixel_size_a=p_part, micrograph_pixel_size_a=p_mic)
    new_x, new_y = out["rlnCoordinateX"].iloc[0], out["rlnCoordinateY"].iloc[0]
    new_ox, new_oy = out["rlnOriginXAngst"].iloc[0], out["rlnOriginYAngst"].iloc[0]
    # True centre X − Origin/p_mic (RELION's sign convention) is unchanged.
    assert new_x - new_ox / p_mic == pytest.approx(x - ox / p_mic, abs=1e-8)
    assert new_y - new_oy / p_mic == pytest.approx(y - oy / p_mic, abs=1e-8)
    # Integer moves, residual at most half a micrograph pixel.
    assert x - new_x == pytest.approx(round(x - new_x), abs=1e-9)
    assert abs(new_ox / p_mic) <= 0.5 + 1e-9
    assert abs(new_oy / p_mic) <= 0.5 + 1e-9


# --- RELION parity (needs relion_preprocess) ---------------------------------------------


@pytest.mark.relion
def test_recentring_matches_relion_reextraction(tmp_path: Path) -> None:
    binary = require_binary("relion_preprocess")
    with mrcfile.new(tmp_path / "mic.mrc") as handle:
        handle.set_data(np.random.default_rng(0).normal(size=(300, 340)).astype(np.float32))
        handle.voxel_size = 1.2
    optics = (
        "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
        "_rlnMicrographOriginalPixelSize #3\n_rlnVoltage #4\n_rlnSphericalAberration #5\n"
        "_rlnAmplitudeContrast #6\n"
    )
    (tmp_path / "mics.star").write_text(
        optics + "_rlnMicrographPixelSize #7\nopticsGroup1 1 1.2 300.0 2.7 0.1 1.2\n\n"
        "\n# version 30001\n\ndata_micrographs\n\nloop_\n_rlnMicrographName #1\n"
        "_rlnOpticsGroup #2\nmic.mrc 1\n"
    )
    rng = np.random.default_rng(1)
    n = 12
    particles = pd.DataFrame(
        {
            "rlnCoordinateX": rng.uniform(60, 280, n).round(3),
            "rlnCoordinateY": rng.uniform(60, 240, n).round(3),
            "rlnImageName": [f"{i + 1:06d}@old.mrcs" for i in range(n)],
            "rlnMicrographName": "mic.mrc",
            "rlnOpticsGroup": 1,
            "rlnOriginXAngst": rng.uniform(-9, 9, n).round(4),
            "rlnOriginYAngst": rng.uniform(-9, 9, n).round(4),
            "rlnAngleRot": rng.uniform(-180, 180, n).round(3),
            "rlnAngleTilt": rng.uniform(0, 180, n).round(3),
            "rlnAnglePsi": rng.uniform(-180, 180, n).round(3),
        }
    )
    rows = "\n".join(" ".join(str(v) for v in row) for row in particles.itertuples(index=False))
    labels = "".join(f"_{name} #{i + 1}\n" for i, name in enumerate(particles.columns))
    (tmp_path / "parts_in.star").write_text(
        optics + "_rlnImagePixelSize #7\n_rlnImageSize #8\n_rlnImageDimensionality #9\n"
        "opticsGroup1 1 1.2 300.0 2.7 0.1 2.4 32 2\n\n\n# version 30001\n\ndata_particles\n\n"
        f"loop_\n{labels}{rows}\n"
    )
    subprocess.run(
        [binary, "--i", "mics.star", "--reextract_data_star", "parts_in.star", "--recenter",
         "--recenter_x", "5", "--recenter_y", "-3", "--recenter_z", "7", "--part_star",
         "out.star", "--part_dir", "Particles/", "--extract", "--extract_size", "64"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    relion = starfile.read(tmp_path / "out.star")["particles"]
    ours = recenter_picks(
        particles,
        particle_pixel_size_a=2.4,
        micrograph_pixel_size_a=1.2,
        recenter_xyz=(5.0, -3.0, 7.0),
    )
    for column in ("rlnCoordinateX", "rlnCoordinateY"):
        np.testing.assert_allclose(ours[column], relion[column], atol=1e-9)
    for column in ("rlnOriginXAngst", "rlnOriginYAngst"):  # STAR keeps 6 decimals
        np.testing.assert_allclose(ours[column], relion[column], atol=1e-5)
