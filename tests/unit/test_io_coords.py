"""Coordinate readers: every real pick file, synthetic files for the rest, round trips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flybox.errors import CoordinateFormatError
from flybox.io.coords import CoordFormat, detect_format, read_coordinates, write_coordinates_star

REPIC = "REPIC/examples/10017"
MICROGRAPHS = [
    "Falcon_2012_06_12-14_33_35_0",
    "Falcon_2012_06_12-15_17_31_0",
    "Falcon_2012_06_12-15_30_21_0",
    "Falcon_2012_06_12-15_33_42_0",
    "Falcon_2012_06_12-15_36_26_0",
    "Falcon_2012_06_12-15_41_22_0",
    "Falcon_2012_06_12-15_43_48_0",
    "Falcon_2012_06_12-15_46_37_0",
    "Falcon_2012_06_12-15_53_09_0",
    "Falcon_2012_06_12-16_26_22_0",
    "Falcon_2012_06_12-16_44_07_0",
    "Falcon_2012_06_12-16_51_03_0",
]
CBOX = [
    "2d_particles.cbox",
    "3d_particle.cbox",
    "filament_cbox_2d/ActLifeact_02885.cbox",
    "filament_cbox_2d/ActLifeact_03047.cbox",
    "filament_cbox_2d/ActLifeact_03070.cbox",
    "filament_cbox_2d/ActLifeact_03211.cbox",
    "filament_cbox_2d/ActLifeact_04203.cbox",
    "filament_cbox_2d/empty.cbox",
    "particle_cbox_2d/TcdA1-0018_frames_sum.cbox",
    "particle_cbox_2d/TcdA1-0019_frames_sum.cbox",
]
AUTOPICK = (
    "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/inCoords/relion/"
    "Ucsf_stack_1142_DW_autopick.star"
)
TOPAZ_TXT = "peer-outputs/topaz-0.3.20_convert/topaz_10017_from_repic_box.txt"
PICKS_CS = "cryosparc-tools/tests/data/4k_dataset.cs"
X, Y, FOM = "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"


def box_rows(path: Path) -> np.ndarray:
    return np.array([line.split() for line in path.read_text().splitlines() if line.strip()], float)


@pytest.mark.parametrize("picker", ["crYOLO", "deepPicker", "topaz"])
@pytest.mark.parametrize("micrograph", MICROGRAPHS)
def test_repic_box_files_are_corner_plus_half_box(
    real_data: Path, picker: str, micrograph: str
) -> None:
    path = real_data / REPIC / picker / f"{micrograph}.box"
    assert detect_format(path) == "eman_box"
    picks = read_coordinates(path)
    raw = box_rows(path)
    assert list(picks.columns) == [X, Y, FOM]
    assert len(picks) == len(raw) > 0
    np.testing.assert_array_equal(picks[X], raw[:, 0] + raw[:, 2] / 2)
    np.testing.assert_array_equal(picks[Y], raw[:, 1] + raw[:, 3] / 2)
    np.testing.assert_array_equal(picks[FOM], raw[:, 4])
    assert picks.attrs["box_size"] == 180.0
    assert picks[X].dtype == np.float64


def test_topaz_txt_equals_repic_topaz_box_centres_without_y_flip(real_data: Path) -> None:
    """``topaz convert --from box --to coord`` without images cannot flip y: centres match."""
    topaz = read_coordinates(real_data / TOPAZ_TXT)
    assert detect_format(real_data / TOPAZ_TXT) == "topaz"
    assert FOM not in topaz.columns  # the converted file drops the scores
    assert sorted(topaz["rlnMicrographName"].unique()) == MICROGRAPHS
    for micrograph in MICROGRAPHS:
        box = read_coordinates(real_data / REPIC / "topaz" / f"{micrograph}.box")
        mine = topaz[topaz["rlnMicrographName"] == micrograph]
        np.testing.assert_array_equal(mine[X], box[X])
        np.testing.assert_array_equal(mine[Y], box[Y])
        flipped = 4096 - 1 - box[Y]  # what a Topaz y-inversion on a 4096² micrograph would give
        assert not np.allclose(mine[Y].to_numpy(), flipped.to_numpy())


@pytest.mark.parametrize("relpath", CBOX)
def test_cbox_centres_are_corner_plus_half_width(real_data: Path, relpath: str) -> None:
    path = real_data / "napari-boxmanager/test_data" / relpath
    picks = read_coordinates(path)
    assert detect_format(path) == "cryolo_cbox"
    if path.stat().st_size == 0:
        assert list(picks.columns) == [X, Y]
        assert picks.empty
        return
    raw = starfile.read(path, always_dict=True)["cryolo"]
    assert len(picks) == len(raw) > 0
    np.testing.assert_allclose(picks[X], raw["CoordinateX"] + raw["Width"] / 2)
    np.testing.assert_allclose(picks[Y], raw["CoordinateY"] + raw["Height"] / 2)
    assert picks.attrs["box_size"] == float(np.median(raw["Width"]))
    confidence = raw["Confidence"].astype(float)
    if confidence.notna().any():
        np.testing.assert_array_equal(picks[FOM], confidence)
    else:
        assert FOM not in picks.columns


def test_cbox_particle_file_details(real_data: Path) -> None:
    path = real_data / "napari-boxmanager/test_data/particle_cbox_2d/TcdA1-0018_frames_sum.cbox"
    picks = read_coordinates(path, min_fom=0.5)
    assert picks.attrs["box_size"] == 220.0
    assert (picks[FOM] > 0.5).all()
    assert len(picks) < len(read_coordinates(path))
    assert picks.loc[0, X] == pytest.approx(3700.3671875 + 110)
    assert {"cryoloEstWidth", "cryoloEstHeight"} <= set(picks.columns)


def test_cbox_filament_ids_and_3d_slices(real_data: Path) -> None:
    base = real_data / "napari-boxmanager/test_data"
    filament = read_coordinates(base / "filament_cbox_2d/ActLifeact_02885.cbox")
    assert filament["cryoloFilamentId"].min() == 0
    volume = read_coordinates(base / "3d_particle.cbox")
    assert volume["rlnCoordinateZ"].tolist() == [50.0, 50.0, 60.0]


def test_relion_autopick_star_with_min_fom(real_data: Path) -> None:
    path = real_data / AUTOPICK
    picks = read_coordinates(path)
    assert detect_format(path) == "relion_star"
    assert len(picks) == 45
    assert list(picks.columns) == [X, Y, FOM, "rlnClassNumber", "rlnAnglePsi"]
    assert picks.loc[0, X] == 839.125024
    kept = read_coordinates(path, min_fom=0.2)
    assert len(kept) == int((picks[FOM] > 0.2).sum()) == 16
    assert len(read_coordinates(path, min_fom=picks[FOM].max())) == 0  # strictly greater


def test_empty_cryosparc_picks_schema(real_data: Path) -> None:
    picks = read_coordinates(real_data / PICKS_CS)
    assert picks.empty
    assert list(picks.columns) == [X, Y, FOM, "rlnMicrographName"]


@pytest.mark.parametrize(
    "name",
    [
        "cryosparc_J2_particles_exported.cs",
        "cryosparc_P12_J24_001_particles.cs",
        "empiar_10076_7.cs",
    ],
)
def test_particle_cs_without_location_is_refused(real_data: Path, name: str) -> None:
    path = real_data / "cryodrgn/tests/data" / name
    with pytest.raises(CoordinateFormatError) as excinfo:
        read_coordinates(path)
    assert str(excinfo.value) == f"{path}: no location/center_x_frac field: not a picks .cs"


def make_cs(
    real_data: Path, path: Path, x: list[float], y: list[float], shape: tuple[int, int]
) -> Path:
    """A picks .cs with the real 4k_dataset.cs schema; centres in pixels, y in array frame."""
    dtype = np.load(real_data / PICKS_CS).dtype
    rows = np.zeros(len(x), dtype=dtype)
    ny, nx = shape
    rows["location/micrograph_shape"] = shape
    rows["location/center_x_frac"] = np.asarray(x) / nx
    rows["location/center_y_frac"] = 1 - np.asarray(y) / ny
    rows["location/micrograph_path"] = b"J1/motioncorrected/m.mrc"[:1]
    rows["pick_stats/ncc_score"] = np.linspace(0.1, 0.9, len(x))
    with open(path, "wb") as fh:
        np.save(fh, rows)
    return path


def test_cryosparc_picks_y_flip_on_and_off(real_data: Path, tmp_path: Path) -> None:
    path = make_cs(real_data, tmp_path / "picks.cs", [100.0, 2000.5], [50.0, 3000.25], (4000, 3000))
    flipped = read_coordinates(path)
    np.testing.assert_allclose(flipped[X], [100.0, 2000.5], atol=1e-3)
    np.testing.assert_allclose(flipped[Y], [50.0, 3000.25], atol=1e-3)
    assert flipped["rlnMicrographName"].tolist() == ["J", "J"]
    np.testing.assert_allclose(flipped[FOM], [0.1, 0.9], rtol=1e-6)
    straight = read_coordinates(path, cs_flip_y=False)
    np.testing.assert_allclose(straight[Y], [4000 - 50.0, 4000 - 3000.25], atol=1e-3)


def test_cryosparc_micrograph_path_is_decoded(tmp_path: Path) -> None:
    dtype = [
        ("location/micrograph_path", "S40"),
        ("location/micrograph_shape", "<u4", (2,)),
        ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
    ]
    rows = np.array([(b"J3/motioncorrected/a.mrc", (100, 200), 0.5, 0.25)], dtype=dtype)
    path = tmp_path / "p.cs"
    with open(path, "wb") as fh:
        np.save(fh, rows)
    picks = read_coordinates(path)
    assert picks.loc[0, "rlnMicrographName"] == "J3/motioncorrected/a.mrc"
    assert (picks.loc[0, X], picks.loc[0, Y]) == (100.0, 75.0)
    assert FOM not in picks.columns


XMIPP_POS = """# XMIPP_STAR_1 *
#
data_header
loop_
 _pickingMicrographState
Manual
data_particles
loop_
 _itemId
 _enabled
 _xcoor
 _ycoor
 _cost
 _micrographId
 1 1 100 200 0.5 1
 2 -1 150 250 0.7 1
data_particles_auto
loop_
 _itemId
 _enabled
 _xcoor
 _ycoor
 _cost
 _micrographId
 _scoreByVariance
 3 1 300 400 0.9 1 1.5
"""


def test_xmipp_pos_keeps_both_blocks_and_drops_disabled(tmp_path: Path) -> None:
    path = tmp_path / "mic.pos"
    path.write_text(XMIPP_POS)
    picks = read_coordinates(path)
    assert detect_format(path) == "xmipp_pos"
    assert picks[X].tolist() == [100.0, 300.0]
    assert picks[Y].tolist() == [200.0, 400.0]
    assert picks[FOM].tolist() == [0.5, 0.9]
    variance = picks["xmippScoreByVariance"].to_numpy()
    assert np.isnan(variance[0])
    assert variance[1] == 1.5


def test_plain_text_with_header_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "mic.coords"
    path.write_text("# picks\nx y fom\n10 20 0.5\n\n30.5 40.25 0.7  # good one\n")
    picks = read_coordinates(path)
    assert detect_format(path) == "text"
    assert picks[X].tolist() == [10.0, 30.5]
    assert picks[Y].tolist() == [20.0, 40.25]
    assert picks[FOM].tolist() == [0.5, 0.7]
    assert "box_size" not in picks.attrs
    two = tmp_path / "two.txt"
    two.write_text("1 2\n3 4\n")
    assert list(read_coordinates(two).columns) == [X, Y]


@pytest.mark.parametrize("fmt", ["eman_box", "text", "relion_star", "cryolo_cbox", "xmipp_pos"])
def test_zero_byte_file_is_zero_picks(tmp_path: Path, fmt: CoordFormat) -> None:
    path = tmp_path / "empty.any"
    path.touch()
    picks = read_coordinates(path, fmt=fmt)
    assert picks.empty
    assert list(picks.columns)[:2] == [X, Y]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "a.box",
            "1 2 180 180\n3 4 180 abc\n",
            "line 2: expected 4 or 5 numeric columns, got 'abc'",
        ),
        ("b.box", "1 2 180\n", "line 1: expected 4 or 5 columns, got 3"),
        ("c.txt", "10 20\n30 x\n", "line 2: expected 2 or 3 numeric columns, got 'x'"),
        ("d.txt", "10 20 30 40\n", "line 1: expected 2 or 3 columns, got 4"),
        (
            "e.txt",
            "image_name\tx_coord\ty_coord\nm1\t1\t2\nm1\tq\t3\n",
            "line 3: expected numeric x_coord/y_coord/score, got 'q'",
        ),
        ("f.txt", "image_name\tx_coord\ty_coord\nm1\t1\n", "line 2: expected 3 columns, got 2"),
        (
            "g.cbox",
            "data_cryolo\n\nloop_\n_CoordinateX #1\n_CoordinateY #2\n_Width #3\n_Height #4\n"
            "1 2 10 10\nabc 2 10 10\n",
            "row 2: non-numeric _CoordinateX value 'abc'",
        ),
        ("h.cbox", "data_other\n\n_key 1\n", "no data_cryolo block"),
        ("i.star", "data_\n\nloop_\n_rlnCoordinateX #1\n1\n", "no column rlnCoordinateY"),
        ("j.cs", "not numpy at all", "not a cryoSPARC .cs array"),
        ("k.pos", "data_header\n\n_x 1\n", "no data_particles block"),
        ("l.box", "1 2 64 64\nnan 2 64 64\n", "pick 2: non-finite coordinate (nan, 34.0)"),
    ],
)
def test_malformed_files_give_one_line_naming_the_file(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CoordinateFormatError) as excinfo:
        read_coordinates(path)
    text = str(excinfo.value)
    assert text.startswith(f"{path}: ")
    assert message in text
    assert "\n" not in text


def test_binary_and_missing_files(tmp_path: Path) -> None:
    binary = tmp_path / "mic.box"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CoordinateFormatError, match="not a text file"):
        read_coordinates(binary)
    with pytest.raises(CoordinateFormatError, match="cannot read"):
        read_coordinates(tmp_path / "missing.box")


# --- round trips ------------------------------------------------------------------------------

Writer = Callable[[Path, np.ndarray, np.ndarray, np.ndarray], Path]


def write_box(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    lines = [f"{a - 32}\t{b - 32}\t64\t64\t{f}" for a, b, f in zip(x, y, fom, strict=True)]
    path.with_suffix(".box").write_text("\n".join(lines) + "\n")
    return path.with_suffix(".box")


def write_text(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    lines = ["x y fom", *(f"{a} {b} {f}" for a, b, f in zip(x, y, fom, strict=True))]
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return path.with_suffix(".txt")


def write_topaz(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    lines = ["image_name\tx_coord\ty_coord\tscore"]
    lines += [f"mic\t{a}\t{b}\t{f}" for a, b, f in zip(x, y, fom, strict=True)]
    path.with_suffix(".tsv").write_text("\n".join(lines) + "\n")
    return path.with_suffix(".tsv")


def write_cbox(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    head = "data_global\n\n_cbox_format_version 1.0\n\ndata_cryolo\n\nloop_\n"
    head += "".join(
        f"_{c} #{i}\n"
        for i, c in enumerate(["CoordinateX", "CoordinateY", "Width", "Height", "Confidence"], 1)
    )
    rows = "".join(f"{a - 50} {b - 50} 100 100 {f}\n" for a, b, f in zip(x, y, fom, strict=True))
    path.with_suffix(".cbox").write_text(head + rows)
    return path.with_suffix(".cbox")


def write_pos(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    head = "# XMIPP_STAR_1 *\n#\ndata_particles\nloop_\n"
    head += "".join(f" _{c}\n" for c in ("itemId", "enabled", "xcoor", "ycoor", "cost"))
    rows = "".join(
        f" {i} 1 {a} {b} {f}\n" for i, (a, b, f) in enumerate(zip(x, y, fom, strict=True))
    )
    path.with_suffix(".pos").write_text(head + rows)
    return path.with_suffix(".pos")


def write_star_picks(path: Path, x: np.ndarray, y: np.ndarray, fom: np.ndarray) -> Path:
    out = path.with_suffix(".star")
    write_coordinates_star(out, pd.DataFrame({X: x, Y: y, FOM: fom}))
    return out


WRITERS: dict[str, Writer] = {
    "eman_box": write_box,
    "text": write_text,
    "topaz": write_topaz,
    "cryolo_cbox": write_cbox,
    "xmipp_pos": write_pos,
    "relion_star": write_star_picks,
}


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(sorted(WRITERS)),
    picks=st.lists(
        st.tuples(st.integers(64, 8000), st.integers(64, 8000), st.integers(0, 10000)),
        min_size=1,
        max_size=40,
    ),
)
def test_round_trip_every_writable_format(
    tmp_path: Path, fmt: str, picks: list[tuple[int, int, int]]
) -> None:
    # Xmipp stores integer centres; the others take halves and quarters exactly.
    x = np.array([float(p[0]) if fmt == "xmipp_pos" else p[0] / 2 for p in picks])
    y = np.array([float(p[1]) if fmt == "xmipp_pos" else p[1] / 4 + 16 for p in picks])
    fom = np.array([p[2] / 10000 for p in picks])
    path = WRITERS[fmt](tmp_path / "mic", x, y, fom)
    assert detect_format(path) == fmt
    back = read_coordinates(path)
    np.testing.assert_array_equal(back[X], x)
    np.testing.assert_array_equal(back[Y], y)
    np.testing.assert_allclose(back[FOM], fom, atol=5e-7)


def test_write_coordinates_star_is_relion_layout(tmp_path: Path) -> None:
    path = tmp_path / "mic_autopick.star"
    write_coordinates_star(path, pd.DataFrame({X: [1, 2], Y: [3.5, 4.25], "other": [0, 0]}))
    text = path.read_text()
    assert "data_\n" in text
    assert "_rlnCoordinateX #1" in text
    assert "other" not in text
    back = read_coordinates(path)
    assert back[X].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="rlnCoordinateY"):
        write_coordinates_star(path, pd.DataFrame({X: [1.0]}))
