"""STAR reading (every real STAR file) and RELION-style writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flybox.errors import StarFormatError
from flybox.io.star import (
    _relion_float,
    format_star_block,
    optics_groups,
    read_relion_star,
    read_star,
    write_particles_star,
    write_star,
)

PARTICLES_31 = "peer-outputs/relion-3.1.3_extract/particles.star"
AUTOPICK = (
    "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/inCoords/relion/"
    "Ucsf_stack_1142_DW_autopick.star"
)
REAL_STAR = [
    "ASPIRE-Python/tests/saved_test_data/rln_proj_64.star",
    "ASPIRE-Python/tests/saved_test_data/rln_proj_65.star",
    "ASPIRE-Python/tests/saved_test_data/sample_data_model.star",
    "ASPIRE-Python/tests/saved_test_data/sample_incomplete_ctf_params.star",
    "ASPIRE-Python/tests/saved_test_data/sample_particles_relion30.star",
    "ASPIRE-Python/tests/saved_test_data/sample_particles_relion31.star",
    "ASPIRE-Python/tests/saved_test_data/sample_relion_symmetry_group_D4.star",
    "cryodrgn/tests/data/FinalRefinement-OriginalParticles-PfCRT.star",
    "cryodrgn/tests/data/empiar_10076_7.star",
    "cryodrgn/tests/data/relion31.6opticsgroups.star",
    "cryodrgn/tests/data/relion31.star",
    "cryodrgn/tests/data/relion31.v2.star",
    "cryodrgn/tests/data/relion5.star",
    "cryodrgn/tests/data/sta_testing_bin8.star",
    "himena-relion/tests/default_pipelines/full.star",
    "himena-relion/tests/jobs_spa/AutoPick/job001/job.star",
    "himena-relion/tests/jobs_spa/AutoPick/job002/job.star",
    "himena-relion/tests/jobs_spa/Extract/job001/job.star",
    "himena-relion/tests/jobs_spa/Extract/job002/job.star",
    "himena-relion/tests/jobs_spa/MaskCreate/job001/job.star",
    AUTOPICK,
    "peer-outputs/aspire-0.14.3_extract/out.star",
    "peer-outputs/pyem-0.67_csparc2star/P12_J24_particles.star",
    "peer-outputs/pyem-0.67_csparc2star/empiar_10076_7_pyem.star",
    "peer-outputs/relion-3.1.3_extract/Extract/Micrographs/Ucsf_stack_1142_DW_extract.star",
    "peer-outputs/relion-3.1.3_extract/ExtractRaw/Micrographs/Ucsf_stack_1142_DW_extract.star",
    "peer-outputs/relion-3.1.3_extract/ExtractScale/Micrographs/Ucsf_stack_1142_DW_extract.star",
    "peer-outputs/relion-3.1.3_extract/micrographs.star",
    "peer-outputs/relion-3.1.3_extract/particles.star",
    "peer-outputs/relion-3.1.3_extract/particles_raw.star",
    "peer-outputs/relion-3.1.3_extract/particles_scale32.star",
    "relion/scripts/Schemes/proc/autopick/job.star",
    "relion/scripts/Schemes/proc/extract/job.star",
    "starfile/tests/data/basic_double_quote.star",
    "starfile/tests/data/basic_single_quote.star",
    "starfile/tests/data/default_pipeline.star",
    "starfile/tests/data/empty_loop.star",
    "starfile/tests/data/loop_double_quote.star",
    "starfile/tests/data/loop_single_quote.star",
    "starfile/tests/data/one_loop.star",
    "starfile/tests/data/postprocess.star",
    "starfile/tests/data/relion_tutorial/run_it025_optimiser_2D.star",
    "starfile/tests/data/relion_tutorial/run_it025_optimiser_3D.star",
    "starfile/tests/data/relion_tutorial/run_it025_sampling_2D.star",
    "starfile/tests/data/relion_tutorial/run_it025_sampling_3D.star",
    "starfile/tests/data/rln3.1_data_style.star",
    "starfile/tests/data/single_line_end_of_multiblock.star",
    "starfile/tests/data/single_line_middle_of_multiblock.star",
    "starfile/tests/data/two_basic_blocks.star",
    "starfile/tests/data/two_single_line_loop_blocks.star",
]


def data_lines(text: str) -> list[list[str]]:
    """Tokens of the loop rows of a STAR text (lines that are not syntax or comments)."""
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "_", "data_", "loop_")):
            rows.append(stripped.split())
    return rows


@pytest.mark.parametrize("relpath", REAL_STAR)
def test_every_real_star_file_reads_like_starfile(real_data: Path, relpath: str) -> None:
    path = real_data / relpath
    blocks = read_star(path)
    reference = starfile.read(path, always_dict=True)
    assert list(blocks) == list(reference)
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            pd.testing.assert_frame_equal(block, reference[name])
        else:
            assert block == reference[name]


@pytest.mark.parametrize("relpath", REAL_STAR)
def test_every_real_star_file_survives_write_and_read(
    real_data: Path, tmp_path: Path, relpath: str
) -> None:
    blocks = read_star(real_data / relpath)
    out = tmp_path / "copy.star"
    write_star(out, blocks)
    again = read_star(out)
    assert list(again) == list(blocks)
    for name, block in blocks.items():
        copy = again[name]
        if isinstance(block, pd.DataFrame):
            assert isinstance(copy, pd.DataFrame)
            assert list(copy.columns) == list(block.columns)
            assert len(copy) == len(block)
            numeric = block.select_dtypes("number").columns
            np.testing.assert_allclose(
                copy[numeric].to_numpy(float),
                block[numeric].to_numpy(float),
                rtol=1e-5,
                atol=5e-6,
            )
        else:
            assert set(copy) == set(block)


def test_empty_loop_gives_empty_frame(real_data: Path) -> None:
    blocks = read_star(real_data / "starfile/tests/data/empty_loop.star")
    table = blocks[""]
    assert isinstance(table, pd.DataFrame)
    assert table.empty
    assert list(table.columns) == ["rlnCoordinateX"]


def test_quoted_values_are_unquoted(real_data: Path) -> None:
    block = read_star(real_data / "starfile/tests/data/basic_double_quote.star")[""]
    assert block == {
        "no_quote_string": "noquote",
        "quote_string": "quote string",
        "whitespace_string": " ",
        "empty_string": "",
    }


def test_relion31_optics_and_particles(real_data: Path) -> None:
    table = read_relion_star(real_data / PARTICLES_31, "particles")
    assert (table.version, table.block) == (30001, "particles")
    assert table.optics is not None
    assert len(table.rows) == 45
    groups = optics_groups(table.optics)
    assert list(groups) == [1]
    group = groups[1]
    assert (group.voltage_kv, group.cs_mm, group.amplitude_contrast) == (300.0, 2.7, 0.1)
    assert group.micrograph_pixel_size_a == 1.0  # falls back to rlnImagePixelSize
    assert "rlnImageSize" not in group.extra


def test_six_optics_groups(real_data: Path) -> None:
    table = read_relion_star(
        real_data / "cryodrgn/tests/data/relion31.6opticsgroups.star", "particles"
    )
    assert table.optics is not None
    groups = optics_groups(table.optics)
    assert sorted(groups) == [1, 2, 3, 4, 5, 6]
    assert groups[6].micrograph_pixel_size_a == 1.035
    assert groups[1].name == "opticsGroup5"
    assert groups[4].cs_mm == 2.6
    assert {"rlnBeamTiltX", "rlnOddZernike", "rlnMagMat00"} <= set(groups[1].extra)
    assert set(table.rows["rlnOpticsGroup"]) <= set(groups)


def test_relion5_array_valued_zernike_columns(real_data: Path) -> None:
    table = read_relion_star(real_data / "cryodrgn/tests/data/relion5.star", "particles")
    assert table.version == 50001
    assert table.optics is not None
    group = optics_groups(table.optics)[1]
    assert group.voltage_kv == 100.0
    assert str(group.extra["rlnOddZernike"]).startswith("[0.0680480107376,")


def test_relion30_particles_get_synthesised_optics(real_data: Path) -> None:
    path = real_data / "ASPIRE-Python/tests/saved_test_data/sample_particles_relion30.star"
    table = read_relion_star(path, "particles")
    assert table.version == 30000
    assert table.block == "model_class_1"
    assert table.optics is not None
    optics = table.optics.set_index("rlnOpticsGroup")
    assert list(optics["rlnVoltage"]) == [300.0, 200.0]
    raw = read_star(path)["model_class_1"]
    assert isinstance(raw, pd.DataFrame)
    expected_pixel = (
        float(raw["rlnDetectorPixelSize"].iloc[0]) * 1e4 / float(raw["rlnMagnification"].iloc[0])
    )
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(expected_pixel)
    for column in ("rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX"):
        assert column not in table.rows.columns
    voltages = optics.loc[table.rows["rlnOpticsGroup"], "rlnVoltage"].to_numpy()
    np.testing.assert_array_equal(voltages, raw["rlnVoltage"].to_numpy(float))
    np.testing.assert_allclose(
        table.rows["rlnOriginXAngst"], raw["rlnOriginX"] * expected_pixel, rtol=1e-12
    )


def test_relion30_data_images_block(real_data: Path) -> None:
    path = real_data / "cryodrgn/tests/data/FinalRefinement-OriginalParticles-PfCRT.star"
    table = read_relion_star(path, "particles")
    assert table.block == "images"
    assert table.optics is not None
    assert table.optics["rlnImagePixelSize"].tolist() == pytest.approx([1.035])


def test_micrographs_star(real_data: Path) -> None:
    table = read_relion_star(
        real_data / "peer-outputs/relion-3.1.3_extract/micrographs.star", "micrographs"
    )
    assert table.rows["rlnMicrographName"].tolist() == ["Micrographs/Ucsf_stack_1142_DW.mrc"]
    assert table.optics is not None
    assert optics_groups(table.optics)[1].micrograph_pixel_size_a == 1.0


def test_coordinates_star_without_optics(real_data: Path) -> None:
    table = read_relion_star(real_data / AUTOPICK, "coordinates")
    assert (table.block, table.version, table.optics) == ("", 30000, None)
    assert len(table.rows) == 45


@pytest.mark.parametrize(
    ("relpath", "kind", "column"),
    [
        ("cryodrgn/tests/data/empiar_10076_7.star", "particles", "rlnCoordinateX"),
        (
            "peer-outputs/pyem-0.67_csparc2star/P12_J24_particles.star",
            "particles",
            "rlnCoordinateX",
        ),
        ("starfile/tests/data/postprocess.star", "micrographs", "rlnMicrographName"),
    ],
)
def test_missing_required_column_is_named(
    real_data: Path, relpath: str, kind: str, column: str
) -> None:
    with pytest.raises(StarFormatError, match=column) as excinfo:
        read_relion_star(real_data / relpath, kind)  # type: ignore[arg-type]
    assert str(excinfo.value).startswith(str(real_data / relpath))


def test_unparsable_star_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.star"
    path.write_text("data_x\n\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4 5 6\n")
    with pytest.raises(StarFormatError) as excinfo:
        read_star(path)
    assert "\n" not in str(excinfo.value)
    assert str(excinfo.value).startswith(f"{path}: cannot parse STAR file")


def test_non_numeric_relion30_optics_is_star_error(tmp_path: Path) -> None:
    path = tmp_path / "old.star"
    path.write_text(
        "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n_rlnVoltage #3\n1 2 abc\n"
    )
    with pytest.raises(StarFormatError, match=r"non-numeric RELION 3\.0 optics values"):
        read_relion_star(path, "particles")


def test_missing_star_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_star(tmp_path / "none.star")


def test_format_matches_relion_preprocess_output_token_for_token(real_data: Path) -> None:
    path = real_data / PARTICLES_31
    blocks = read_star(path)
    text = "".join(
        format_star_block(name, block)
        for name, block in blocks.items()
        if isinstance(block, pd.DataFrame)
    )
    assert data_lines(text) == data_lines(path.read_text())


def test_format_layout_and_number_rules() -> None:
    table = pd.DataFrame(
        {
            "rlnA": [1.5, -2.25, 1e-5, -1e6, 0.0, 123456.0],
            "rlnB": [1, -22, 3, 4, 5, 6],
            "rlnC": ["a b", "", "x", "_y", "data_z", "Micrographs/m.mrc"],
        }
    )
    text = format_star_block("particles", table)
    lines = text.splitlines()
    assert lines[:8] == [
        "# version 30001",
        "",
        "data_particles",
        "",
        "loop_",
        "_rlnA #1",
        "_rlnB #2",
        "_rlnC #3",
    ]
    assert [row.rstrip().split(maxsplit=2) for row in lines[8:14]] == [
        ["1.500000", "1", '"a b"'],
        ["-2.25000", "-22", '""'],
        ["1.000000e-05", "3", "x"],
        ["-1.00000e+06", "4", '"_y"'],
        ["0.000000", "5", '"data_z"'],
        ["1.234560e+05", "6", "Micrographs/m.mrc"],
    ]
    assert lines[8].startswith("    1.500000            1 ")
    assert format_star_block("x", table, version=None).startswith("data_x\n")


def test_format_empty_table_has_header_only() -> None:
    text = format_star_block(
        "particles", pd.DataFrame({"rlnCoordinateX": pd.Series([], dtype=float)})
    )
    assert text.rstrip().splitlines()[-1] == "_rlnCoordinateX #1"
    assert data_lines(text) == []


def relion_printf(value: float) -> str:
    """RELION's MetaDataTable number format, via Python's (correctly rounded) printf."""
    scientific = 0 < abs(value) < 0.001 or abs(value) > 100000
    if value < 0:
        return ("%.5e" if scientific else "%.5f") % value
    return ("%.6e" if scientific else "%.6f") % value


@given(
    st.lists(
        st.one_of(
            st.floats(-1e12, 1e12, allow_nan=False),
            st.floats(-1e5, 1e5).map(lambda v: round(v, 7)),  # near rounding ties
            st.integers(-(10**7), 10**7).map(lambda v: v / 128),  # exact binary ties
        ),
        min_size=1,
        max_size=50,
    )
)
def test_float_text_equals_printf(values: list[float]) -> None:
    text = format_star_block("t", pd.DataFrame({"rlnA": values}))
    assert [row[0] for row in data_lines(text)] == [relion_printf(v) for v in values]


def test_non_finite_and_negative_zero_follow_printf() -> None:
    text = format_star_block("t", pd.DataFrame({"rlnA": [np.nan, np.inf, -0.0, 99999.9999999]}))
    assert [r[0] for r in data_lines(text)] == ["nan", "inf", "-0.000000", "100000.000000"]


def test_write_particles_star_round_trip(real_data: Path, tmp_path: Path) -> None:
    source = read_relion_star(real_data / PARTICLES_31, "particles")
    assert source.optics is not None
    out = tmp_path / "particles.star"
    write_particles_star(out, source.optics, source.rows)
    back = read_relion_star(out, "particles")
    assert back.version == 30001
    assert back.optics is not None
    pd.testing.assert_frame_equal(back.optics, source.optics)
    pd.testing.assert_frame_equal(back.rows, source.rows)
    assert list(starfile.read(out, always_dict=True)) == ["optics", "particles"]
    assert [p.name for p in tmp_path.iterdir()] == ["particles.star"]


def test_write_star_key_value_block(tmp_path: Path) -> None:
    out = tmp_path / "general.star"
    write_star(out, {"general": {"rlnFinalResolution": 3.5, "rlnMaskName": "my mask.mrc"}})
    assert read_star(out) == {"general": {"rlnFinalResolution": 3.5, "rlnMaskName": "my mask.mrc"}}


_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/@._- ", min_size=0, max_size=12)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    floats=st.lists(
        st.floats(-1e9, 1e9, allow_nan=False, allow_subnormal=False), min_size=1, max_size=30
    ),
    data=st.data(),
)
def test_write_read_round_trip_property(
    tmp_path: Path, floats: list[float], data: st.DataObject
) -> None:
    n = len(floats)
    ints = data.draw(st.lists(st.integers(-(10**12), 10**12), min_size=n, max_size=n))
    names = data.draw(st.lists(_NAMES.map(lambda s: "m" + s), min_size=n, max_size=n))
    table = pd.DataFrame({"rlnF": floats, "rlnI": ints, "rlnS": names})
    out = tmp_path / "prop.star"
    write_star(out, {"t": table}, version=None)
    back = read_star(out)["t"]
    assert isinstance(back, pd.DataFrame)
    original = np.asarray(floats)
    error = np.abs(back["rlnF"].to_numpy(float) - original)
    assert np.all(error <= 5.1e-6 * np.maximum(np.abs(original), 1.0))
    assert back["rlnI"].tolist() == ints
    assert back["rlnS"].tolist() == names


@pytest.mark.slow
def test_format_300k_rows_by_25_columns_matches_per_cell_printf() -> None:
    # Speed is measured by benchmarks/star_write.py; here: the vectorised formatter over
    # several chunks gives, cell for cell, what printf gives.
    rng = np.random.default_rng(0)
    n = 300_000
    columns: dict[str, object] = {f"rlnF{i}": rng.normal(0, 10.0 ** (i % 4), n) for i in range(21)}
    columns["rlnF0"][:5] = [0.0, -0.0004, 123456.7, -1e-9, 99999.9999996]  # type: ignore[index]
    columns.update({f"rlnI{i}": rng.integers(-1000, 1000, n) for i in range(2)})
    columns["rlnImageName"] = [f"{i % 1000 + 1:06d}@Particles/m{i // 1000}.mrcs" for i in range(n)]
    columns["rlnMicrographName"] = [f"Micrographs/m{i // 1000}.mrc" for i in range(n)]
    table = pd.DataFrame(columns)
    text = format_star_block("particles", table)
    lines = text.splitlines()
    header = max(i for i, line in enumerate(lines[:40]) if line.startswith("_rln")) + 1
    rows = [line for line in lines[header:] if line.strip()]
    assert len(rows) == n
    sample = sorted({0, 1, 2, 3, 4, n - 1, *rng.integers(0, n, 2000).tolist()})
    for index in sample:
        cells = rows[index].split()
        assert len(cells) == 25
        expected = [_relion_float(table[f"rlnF{i}"].iat[index]).strip() for i in range(21)]
        expected += [str(table[f"rlnI{i}"].iat[index]) for i in range(2)]
        expected += [table["rlnImageName"].iat[index], table["rlnMicrographName"].iat[index]]
        assert cells == expected, index
