"""CTF readers: CTFFIND4 text, cryoSPARC .cs, RELION micrograph STAR files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flybox.errors import CtfFormatError
from flybox.io.ctf import read_cs_ctf_per_row, read_ctf, read_micrographs_star
from flybox.io.star import read_star, write_star
from flybox.pipeline.matching import match_name
from flybox.types import CtfParams

CTFFIND = "ASPIRE-Python/gallery/tutorials/data/ctffind4/diagnostic_output.txt"
CS_DIR = "cryodrgn/tests/data"
PYEM = "peer-outputs/pyem-0.67_csparc2star"


def test_real_ctffind4_output(real_data: Path) -> None:
    ctfs = read_ctf(real_data / CTFFIND)
    assert list(ctfs) == ["test_img.mrc"]
    ctf = ctfs["test_img.mrc"]
    assert (ctf.defocus_u_a, ctf.defocus_v_a, ctf.defocus_angle_deg) == (
        9982.502930,
        9982.502930,
        0.0,
    )
    assert (ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast) == (200.0, 2.26, 0.07)
    assert ctf.phase_shift_deg == pytest.approx(math.degrees(0.035256))
    assert ctf.extra == {"rlnCtfFigureOfMerit": 0.565683, "rlnCtfMaxResolution": 1.980663}
    assert ctf.complete


def test_ctffind4_multi_image_input_is_keyed_by_index(tmp_path: Path) -> None:
    path = tmp_path / "stack_ctf.txt"
    path.write_text(
        "# Input file: frames.mrcs ; Number of micrographs: 2\n"
        "# Pixel size: 1.000 Angstroms ; acceleration voltage: 300.0 keV ; "
        "spherical aberration: 2.70 mm ; amplitude contrast: 0.10\n"
        "1.000000 10000.0 9000.0 45.0 0.0 0.1 4.0\n"
        "2.000000 20000.0 19000.0 -30.0 1.5707963 0.2 3.5\n"
    )
    ctfs = read_ctf(path)
    assert list(ctfs) == ["000001@frames.mrcs", "000002@frames.mrcs"]
    assert ctfs["000002@frames.mrcs"].phase_shift_deg == pytest.approx(90.0)
    assert ctfs["000002@frames.mrcs"].defocus_angle_deg == -30.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 2 3 4 5 6 7\n", "no '# Input file"),
        ("# Input file: a.mrc ; Number of micrographs: 1\n", "no defocus rows"),
        ("# Input file: a.mrc ; Number of micrographs: 1\n1 2 3\n", "line 2: expected 7 columns"),
        (
            "# Input file: a.mrc ; Number of micrographs: 1\n1 2 x 4 5 6 7\n",
            "line 2: expected a number, got 'x'",
        ),
    ],
)
def test_malformed_ctffind_output(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(CtfFormatError) as excinfo:
        read_ctf(path)
    assert str(excinfo.value).startswith(f"{path}: ")
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("empiar_10076_7.cs", 1),
        ("cryosparc_J2_particles_exported.cs", 1),
        ("cryosparc_P12_J24_001_particles.cs", 50),
    ],
)
def test_real_cs_files_with_ctf_give_one_entry_per_micrograph(
    real_data: Path, name: str, count: int
) -> None:
    path = real_data / CS_DIR / name
    ctfs = read_ctf(path)
    raw = np.load(path)
    assert len(ctfs) == count == len(np.unique(raw["blob/path"]))
    first_key = raw["blob/path"][0].decode()
    first = ctfs[first_key]
    assert first.defocus_u_a == pytest.approx(float(raw["ctf/df1_A"][0]), rel=1e-6)
    assert first.defocus_angle_deg == pytest.approx(
        math.degrees(float(raw["ctf/df_angle_rad"][0])), rel=1e-6
    )
    assert first.voltage_kv == pytest.approx(float(raw["ctf/accel_kv"][0]))
    assert first.complete


def test_cs_float32_values_read_as_their_decimal(real_data: Path) -> None:
    ctf = read_ctf(real_data / CS_DIR / "empiar_10076_7.cs")["empiar_10076_7.mrc"]
    assert (ctf.cs_mm, ctf.amplitude_contrast, ctf.defocus_u_a) == (2.7, 0.07, 15301.1)


@pytest.mark.parametrize(
    ("cs_name", "star_name"),
    [
        ("empiar_10076_7.cs", "empiar_10076_7_pyem.star"),
        ("cryosparc_P12_J24_001_particles.cs", "P12_J24_particles.star"),
    ],
)
def test_per_row_cs_ctf_agrees_with_pyem(real_data: Path, cs_name: str, star_name: str) -> None:
    mine = read_cs_ctf_per_row(real_data / CS_DIR / cs_name)
    pyem = read_star(real_data / PYEM / star_name)["particles"]
    assert isinstance(pyem, pd.DataFrame)
    assert len(mine) == len(pyem)
    assert mine["rlnImageName"].tolist() == pyem["rlnImageName"].tolist()
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift"):
        np.testing.assert_allclose(mine[column], pyem[column], atol=2e-3, err_msg=column)


def test_cs_without_ctf_fields_is_refused(real_data: Path, tmp_path: Path) -> None:
    with pytest.raises(CtfFormatError, match="no ctf/df1_A field"):
        read_ctf(real_data / "cryosparc-tools/tests/data/4k_dataset.cs")
    garbage = tmp_path / "x.cs"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CtfFormatError, match=r"not a cryoSPARC \.cs array"):
        read_ctf(garbage)


def test_cs_keyed_by_micrograph_path_when_present(tmp_path: Path) -> None:
    dtype = [
        ("location/micrograph_path", "S20"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("ctf/bfactor", "<f4"),
    ]
    rows = np.array(
        [(b"J2/a.mrc", 10000, 9000, np.pi / 2, np.pi, 50), (b"J2/a.mrc", 1, 1, 0, 0, 0)],
        dtype=dtype,
    )
    path = tmp_path / "exposures.cs"
    with open(path, "wb") as fh:
        np.save(fh, rows)
    ctfs = read_ctf(path)
    assert list(ctfs) == ["J2/a.mrc"]
    ctf = ctfs["J2/a.mrc"]
    assert ctf.defocus_angle_deg == pytest.approx(90.0)
    assert ctf.phase_shift_deg == pytest.approx(180.0)
    assert ctf.bfactor_a2 == 50.0
    assert not ctf.complete  # no voltage, Cs or Q0 in this file


def test_relion_micrographs_star_without_ctf(real_data: Path) -> None:
    path = real_data / "peer-outputs/relion-3.1.3_extract/micrographs.star"
    rows, groups, ctfs = read_micrographs_star(path)
    assert rows["rlnMicrographName"].tolist() == ["Micrographs/Ucsf_stack_1142_DW.mrc"]
    assert groups[1].micrograph_pixel_size_a == 1.0
    assert ctfs == {}
    assert read_ctf(path) == {}


def test_relion31_micrographs_ctf_star(tmp_path: Path) -> None:
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnMicrographOriginalPixelSize": [0.5, 0.5],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 1.4],
            "rlnAmplitudeContrast": [0.1, 0.07],
            "rlnMicrographPixelSize": [1.0, 1.0],
        }
    )
    micrographs = pd.DataFrame(
        {
            "rlnMicrographName": ["MotionCorr/job002/a.mrc", "MotionCorr/job002/b.mrc"],
            "rlnOpticsGroup": [1, 2],
            "rlnCtfImage": ["CtfFind/job003/a.ctf:mrc", "CtfFind/job003/b.ctf:mrc"],
            "rlnDefocusU": [12000.5, 20000.0],
            "rlnDefocusV": [11000.25, 19000.0],
            "rlnCtfAstigmatism": [1000.25, 1000.0],
            "rlnDefocusAngle": [-35.5, 80.0],
            "rlnCtfFigureOfMerit": [0.12, 0.2],
            "rlnCtfMaxResolution": [3.4, 4.1],
            "rlnPhaseShift": [0.0, 45.0],
        }
    )
    path = tmp_path / "micrographs_ctf.star"
    write_star(path, {"optics": optics, "micrographs": micrographs})
    rows, groups, ctfs = read_micrographs_star(path)
    assert len(rows) == 2
    assert groups[2].voltage_kv == 200.0
    assert read_ctf(path) == ctfs
    assert ctfs["MotionCorr/job002/b.mrc"] == CtfParams(
        defocus_u_a=20000.0,
        defocus_v_a=19000.0,
        defocus_angle_deg=80.0,
        voltage_kv=200.0,
        cs_mm=1.4,
        amplitude_contrast=0.07,
        phase_shift_deg=45.0,
        extra={"rlnCtfMaxResolution": 4.1, "rlnCtfFigureOfMerit": 0.2},
    )
    assert ctfs["MotionCorr/job002/a.mrc"].defocus_angle_deg == -35.5


def test_relion30_star_with_per_row_optics(real_data: Path) -> None:
    path = real_data / "ASPIRE-Python/tests/saved_test_data/sample_particles_relion30.star"
    ctfs = read_ctf(path)
    assert len(ctfs) >= 1
    assert all(ctf.voltage_kv in (200.0, 300.0) for ctf in ctfs.values())
    assert all(ctf.cs_mm == 2.7 for ctf in ctfs.values())


def test_malformed_star_is_ctf_error(tmp_path: Path) -> None:
    path = tmp_path / "x.star"
    path.write_text("data_micrographs\n\nloop_\n_rlnDefocusU #1\n1000\n")
    with pytest.raises(CtfFormatError, match="rlnMicrographName"):
        read_ctf(path)
    with pytest.raises(CtfFormatError, match="cannot read"):
        read_ctf(tmp_path / "missing.star")
    bad = tmp_path / "bad_defocus.star"
    bad.write_text(
        "data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\n"
        "_rlnDefocusV #3\n_rlnDefocusAngle #4\na.mrc 1000 1000 0\nb.mrc abc 1000 0\n"
    )
    with pytest.raises(CtfFormatError, match="row 2: non-numeric CTF value"):
        read_ctf(bad)


def _ctf(defocus: float) -> CtfParams:
    return CtfParams(defocus, defocus, 0.0)


def test_ctf_matching_exact_then_name_then_stem() -> None:
    ctfs = {
        "MotionCorr/job002/Movies/a.mrc": _ctf(1),
        "b.mrc": _ctf(2),
        "Other/c.tiff": _ctf(3),
        "x/d.mrc": _ctf(4),
        "y/d.mrc": _ctf(5),
        "e.mrc": _ctf(6),
        "e.tif": _ctf(7),
    }
    assert match_name(ctfs, "MotionCorr/job002/Movies/a.mrc") == _ctf(1)
    assert match_name(ctfs, "/data/krios/a.mrc") == _ctf(1)
    assert match_name(ctfs, "Micrographs/b.mrc") == _ctf(2)
    assert match_name(ctfs, "Micrographs/c.mrc") == _ctf(3)
    assert match_name(ctfs, "z/d.mrc") is None  # ambiguous file name
    assert match_name(ctfs, "x/d.mrc") == _ctf(4)  # exact wins over ambiguity
    assert match_name(ctfs, "e.mrcs") is None  # ambiguous stem
    assert match_name(ctfs, "nothing.mrc") is None
