"""``flybox mask`` on real and synthetic files: stacks, particle STARs, volumes, refusals."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import flybox.batch.mask
from flybox.batch.mask import Masker, mask_stack_file, mask_volumes
from flybox.cli.mask import add_arguments, run
from flybox.io.mrc import read_header, read_stack, read_volume, relion_float16, write_stack
from flybox.io.mrc import write_volume as write_map
from flybox.io.star import read_star, write_star
from flybox.processors.mask import MaskSettings, apply_mask, mask_2d, mask_3d

EMD_3001 = "mrcfile/tests/test_data/EMD-3001.map"
EMD_3197 = "mrcfile/tests/test_data/EMD-3197.map"
RIBOSOME = "ASPIRE-Python/gallery/tutorials/data/clean70SRibosome_vol_65p.mrc"
RELION_EXTRACT = "peer-outputs/relion-3.1.3_extract/particles.star"
ASPIRE_STAR = "ASPIRE-Python/tests/saved_test_data/sample_particles_relion31.star"


def flybox_mask(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run ``flybox mask ARGV`` through the command's own parser; (status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="flybox mask")
    add_arguments(parser)
    status = run(parser.parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def stack_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(11)
    path = tmp_path / "in" / "particles.mrcs"
    path.parent.mkdir()
    write_stack(path, rng.normal(2.0, 1.0, size=(23, 48, 48)).astype(np.float32), 1.5)
    return path


def test_help_documents_units_and_defaults() -> None:
    parser = argparse.ArgumentParser(prog="flybox mask")
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for option in ("--shape", "--radius", "--inner", "--outer", "--sigma", "--decay", "--size"):
        assert option in text
    for option in ("--height", "--center", "--fill", "--fill-value", "--mask", "--convention"):
        assert option in text
    assert "[px; default: half the smallest box side]" in text
    assert "[px; default: smallest box side / 6]" in text
    assert "default 0 0 0" in text
    assert "relion (default)" in text


def test_stack_is_masked_in_chunks_with_pixel_size_kept(
    stack_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flybox.batch.mask, "CHUNK_BYTES", 5 * 48 * 48 * 4)  # 5 images per chunk
    out = tmp_path / "out" / "masked.mrcs"
    status, stdout, _ = flybox_mask(
        capsys, stack_file, "-o", out, "--shape", "circular", "--radius", "17",
        "--center", "2", "-3", "--fill", "avg",
    )  # fmt: skip
    assert status == 0
    assert "23 particles" in stdout
    original, _ = read_stack(stack_file)
    masked, info = read_stack(out)
    mask = mask_2d(48, MaskSettings(shape="circular", radius=17, center=(2, -3)))
    np.testing.assert_array_equal(masked, apply_mask(np.asarray(original), mask, "avg"))
    assert info.pixel_size_a == pytest.approx(1.5)
    assert info.mode == 2
    assert not list(out.parent.glob(".*.tmp"))


def test_float16_stacks_stay_float16(tmp_path: Path) -> None:
    source = tmp_path / "half.mrcs"
    images = np.random.default_rng(3).normal(size=(4, 32, 32)).astype(np.float32)
    write_stack(source, images, 2.0, float16=True)
    masker = Masker(MaskSettings(shape="raised_cosine", inner=8, outer=12))
    assert mask_stack_file(source, tmp_path / "out.mrcs", masker) == 4
    masked, info = read_stack(tmp_path / "out.mrcs")
    assert info.mode == 12
    stored, _ = read_stack(source)
    mask = mask_2d(32, MaskSettings(shape="raised_cosine", inner=8, outer=12))
    expected = relion_float16(np.asarray(stored, dtype=np.float32) * mask)
    np.testing.assert_array_equal(masked, expected)


def _assert_star_preserved(source: Path, output: Path, block: str) -> pd.DataFrame:
    before, after = read_star(source), read_star(output)
    assert list(after) == list(before)
    for name, table in before.items():
        if not isinstance(table, pd.DataFrame):
            assert after[name] == table
            continue
        new = after[name]
        assert isinstance(new, pd.DataFrame)
        assert list(new.columns) == list(table.columns)
        assert len(new) == len(table)
        unchanged = [c for c in table.columns if c != "rlnImageName"]
        pd.testing.assert_frame_equal(
            new[unchanged], table[unchanged], check_exact=False, rtol=0, atol=1e-5
        )
    rows = after[block]
    assert isinstance(rows, pd.DataFrame)
    return rows


def test_relion_particles_star_keeps_every_column_and_points_at_new_stacks(
    real_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Input paths are relative to the input STAR's folder (not the project folder); outputs
    # are written relative to the project folder (the working directory), as RELION reads them.
    monkeypatch.chdir(tmp_path)
    source = real_data / RELION_EXTRACT
    out = tmp_path / "masked"
    status, _, err = flybox_mask(
        capsys, source, "-o", out, "--shape", "raised_crown", "--outer", "25", "--decay", "4"
    )
    assert status == 0, err
    rows = _assert_star_preserved(source, out / "particles.star", "particles")
    stack = "masked/Extract/Micrographs/Ucsf_stack_1142_DW.mrcs"
    assert rows["rlnImageName"].iloc[0] == f"000001@{stack}"
    assert rows["rlnImageName"].iloc[-1] == f"000045@{stack}"
    new, info = read_stack(out / "Extract/Micrographs/Ucsf_stack_1142_DW.mrcs")
    old, old_info = read_stack(source.parent / "Extract/Micrographs/Ucsf_stack_1142_DW.mrcs")
    mask = mask_2d(64, MaskSettings(shape="raised_crown", outer=25, decay=4))
    np.testing.assert_allclose(new, np.asarray(old, dtype=np.float32) * mask, rtol=1e-6)
    assert info.pixel_size_a == old_info.pixel_size_a


def test_star_with_two_optics_groups_and_unset_header_pixel_size(
    real_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    source = real_data / ASPIRE_STAR
    status, _, err = flybox_mask(
        capsys, source, "-o", tmp_path, "--shape", "box", "--size", "120", "--fill", "max"
    )
    assert status == 0, err
    rows = _assert_star_preserved(source, tmp_path / source.name, "particles")
    assert rows["rlnImageName"].tolist() == [f"{k:06d}@sample.mrcs" for k in range(1, 18)]
    masked, info = read_stack(tmp_path / "sample.mrcs")
    original, _ = read_stack(source.parent / "sample.mrcs")
    assert info.pixel_size_a == pytest.approx(1.4)  # the header has none: the optics table's
    keep = mask_2d(200, MaskSettings(shape="box", size=120)) == 1
    for k in range(17):
        np.testing.assert_array_equal(masked[k][keep], original[k][keep])
        assert np.all(masked[k][~keep] == original[k].max())


def test_relion30_star_subset_from_two_stacks_in_any_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(5)
    project = tmp_path / "project"
    (project / "Extract").mkdir(parents=True)
    stacks = {name: rng.normal(size=(6, 32, 32)).astype(np.float32) for name in ("a", "b")}
    for name, images in stacks.items():
        write_stack(project / "Extract" / f"{name}.mrcs", images, 1.2)
    refs = [("b", 4), ("a", 2), ("b", 1), ("a", 6), ("a", 2)]
    table = pd.DataFrame(
        {
            "rlnImageName": [f"{k:06d}@Extract/{name}.mrcs" for name, k in refs],
            "rlnDefocusU": [10000.0 + i for i in range(len(refs))],
            "rlnMagnification": [10000.0] * len(refs),
            "rlnDetectorPixelSize": [1.2] * len(refs),
            "rlnGroupNumber": [1, 2, 1, 2, 2],
        }
    )
    source = project / "subset.star"
    write_star(source, {"": table}, version=None)
    out = tmp_path / "out"
    status, _, err = flybox_mask(capsys, source, "-o", out, "--shape", "circular", "--radius", "9")
    assert status == 0, err
    assert not (out / "subset.star").read_text().startswith("# version")
    rows = _assert_star_preserved(source, out / "subset.star", "")
    assert rows["rlnImageName"].tolist() == [
        "000001@out/Extract/b.mrcs",
        "000001@out/Extract/a.mrcs",
        "000002@out/Extract/b.mrcs",
        "000002@out/Extract/a.mrcs",
        "000003@out/Extract/a.mrcs",
    ]
    mask = mask_2d(32, MaskSettings(shape="circular", radius=9))
    for name, k in refs:
        new_name = rows["rlnImageName"].tolist()[refs.index((name, k))]
        index, path = new_name.split("@")
        new, _ = read_stack(tmp_path / path)
        np.testing.assert_array_equal(new[int(index) - 1], stacks[name][k - 1] * mask)


def test_real_volumes_keep_voxel_size_origin_and_extended_header(
    real_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = str(real_data / "mrcfile/tests/test_data/EMD-*.map")
    status, _, err = flybox_mask(
        capsys, pattern, real_data / RIBOSOME, "-o", tmp_path / "vols", "--shape", "sphere",
        "--fill", "min",
    )  # fmt: skip
    assert status == 0, err
    for name in (EMD_3001, EMD_3197, RIBOSOME):
        source = real_data / name
        output = tmp_path / "vols" / source.name
        before, after = read_header(source), read_header(output)
        for field in ("voxel_size_a", "origin_a", "nstart", "grid", "cell_a", "cell_angles_deg"):
            assert getattr(after, field) == getattr(before, field), field
        for field in ("axis_order", "ispg", "nsymbt", "exttyp", "labels", "shape"):
            assert getattr(after, field) == getattr(before, field), field
        raw_before, raw_after = source.read_bytes(), output.read_bytes()
        extended = slice(1024, 1024 + before.nsymbt)
        assert raw_after[extended] == raw_before[extended]
        data, _ = read_volume(source)
        masked, _ = read_volume(output)
        mask = mask_3d(before.shape, MaskSettings(shape="circular"))
        np.testing.assert_array_equal(masked, apply_mask(data, mask, "min"))
    assert read_header(real_data / EMD_3001).nsymbt == 160


def test_non_cubic_anisotropic_volume_gets_defaults_from_its_smallest_side(
    real_data: Path, tmp_path: Path
) -> None:
    source = real_data / EMD_3001
    (output,) = mask_volumes(
        [source], [tmp_path / "cyl.map"], Masker(MaskSettings(shape="cylinder"))
    )
    data, info = read_volume(source)
    masked, _ = read_volume(output)
    assert info.shape == (25, 43, 73)
    mask = mask_3d(info.shape, MaskSettings(shape="cylinder", radius=21, height=25))
    np.testing.assert_array_equal(masked, data * mask)
    assert np.count_nonzero(mask[12]) == np.count_nonzero(mask[0])  # full height, along Z


def test_odd_ribosome_masked_by_relion_mask_file_is_a_multiplication(
    real_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask_file = real_data / "peer-outputs/relion-3.1.3_mask_create/mask_relion.mrc"
    out = tmp_path / "ribosome_masked.mrc"
    status, _, err = flybox_mask(capsys, real_data / RIBOSOME, "-o", out, "--mask", mask_file)
    assert status == 0, err
    data, _ = read_volume(real_data / RIBOSOME)
    mask, _ = read_volume(mask_file)
    masked, _ = read_volume(out)
    np.testing.assert_array_equal(masked, data * mask)
    status, _, err = flybox_mask(
        capsys, real_data / RIBOSOME, "-o", tmp_path / "soft.mrc", "--mask", mask_file,
        "--fill", "soft_background",
    )  # fmt: skip
    assert status == 0, err
    soft, _ = read_volume(tmp_path / "soft.mrc")
    np.testing.assert_allclose(soft, apply_mask(data, mask, "soft_background"), rtol=1e-6)


def test_created_mask_of_another_size_is_refused_and_nothing_is_written(
    real_data: Path, stack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask_file = tmp_path / "mask64.mrc"
    write_map(mask_file, np.ones((1, 64, 64), np.float32), voxel_size_a=1.5)
    out = tmp_path / "refused"
    status, stdout, err = flybox_mask(
        capsys, stack_file, real_data / EMD_3197, "-o", out, "--mask", mask_file
    )
    assert status == 1
    assert err.count("\n") == 1
    assert "64 x 64 x 1" in err
    assert "48 x 48" in err
    assert str(mask_file) in err
    assert not out.exists()
    assert stdout == ""


def test_created_mask_with_another_pixel_size_warns_once_per_input(
    stack_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mask_file = tmp_path / "mask.mrc"
    binary = mask_2d(48, MaskSettings(shape="circular", radius=12))
    write_map(mask_file, binary[np.newaxis], voxel_size_a=2.0)
    with caplog.at_level(logging.WARNING, logger="flybox"):
        status, _, err = flybox_mask(
            capsys, stack_file, "-o", tmp_path / "o.mrcs", "--mask", mask_file,
            "--fill", "value", "--fill-value", "-1",
        )  # fmt: skip
    assert status == 0, err
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert str(mask_file) in message
    assert str(stack_file) in message
    assert "2 Å" in message
    assert "1.5 Å" in message
    masked, _ = read_stack(tmp_path / "o.mrcs")
    original, _ = read_stack(stack_file)
    np.testing.assert_array_equal(masked, np.where(binary == 1, original, -1))


def test_shape_and_mask_file_multiply(stack_file: Path, tmp_path: Path) -> None:
    mask_file = tmp_path / "half.mrc"
    half = np.zeros((48, 48), np.float32)
    half[:, :24] = 1
    write_map(mask_file, half[np.newaxis], voxel_size_a=1.5)
    masker = Masker(MaskSettings(shape="circular", radius=15), mask_file)
    mask_stack_file(stack_file, tmp_path / "both.mrcs", masker)
    masked, _ = read_stack(tmp_path / "both.mrcs")
    original, _ = read_stack(stack_file)
    circle = mask_2d(48, MaskSettings(shape="circular", radius=15))
    np.testing.assert_array_equal(masked, original * (circle * half))


def test_single_section_mrc_is_masked_in_2d(tmp_path: Path) -> None:
    image = np.arange(30 * 30, dtype=np.float32).reshape(1, 30, 30)
    write_map(tmp_path / "image.mrc", image, voxel_size_a=3.0)
    masker = Masker(MaskSettings(shape="crown", inner=4, outer=10, convention="xmipp"))
    mask_volumes([tmp_path / "image.mrc"], [tmp_path / "masked.mrc"], masker)
    masked, info = read_volume(tmp_path / "masked.mrc")
    mask = mask_2d(30, MaskSettings(shape="crown", inner=4, outer=10, convention="xmipp"))
    np.testing.assert_array_equal(masked[0], image[0] * mask)
    assert info.voxel_size_a == pytest.approx((3.0, 3.0, 3.0))


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        (["--shape", "star"], 2, "--shape: Input should be"),
        (["--shape", "circular", "--radius", "-3"], 2, "--radius: must be a length >= 0"),
        (["--shape", "circular", "--inner", "3"], 2, "--inner: does not apply to shape circular"),
        (["--shape", "crown", "--inner", "9", "--outer", "4"], 2, "--outer: must not be smaller"),
        (["--shape", "cylinder"], 2, "--shape: cylinder is a 3D shape"),
        (["--shape", "circular", "--center", "1"], 2, "--center: must be 2 or 3"),
        (["--shape", "gaussian", "--fill", "avg"], 2, "--fill: fill avg applies to binary masks"),
        (["--radius", "3"], 2, "--shape: required unless a mask file is given"),
        (["--shape", "box", "--size", "4", "4", "4"], 2, "--size: takes 1 or 2 values"),
    ],
)
def test_bad_parameters_give_one_line_errors_and_write_nothing(
    stack_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    status: int,
    message: str,
) -> None:
    out = tmp_path / "never"
    got, stdout, err = flybox_mask(capsys, stack_file, "-o", out, *options)
    assert got == status
    assert err.startswith("flybox mask: error: ")
    assert err.count("\n") == 1
    assert message in err
    assert stdout == ""
    assert not out.exists()


def test_bad_inputs_and_outputs_are_refused(
    stack_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = stack_file.parent / "particles.star"
    cases = [
        ([tmp_path / "missing.mrcs"], tmp_path / "o", 1, "no such file"),
        ([str(tmp_path / "nothing-*.mrcs")], tmp_path / "o", 1, "no file matches"),
        ([stack_file.with_suffix(".txt")], tmp_path / "o", 1, "unknown input type"),
        ([stack_file], stack_file, 2, "would overwrite the input"),
        ([stack_file], stack_file.parent, 2, "would overwrite the input"),
        ([star], tmp_path / "masked.star", 2, "needs an output folder"),
        ([star], star.parent, 2, "would overwrite the input"),
    ]
    write_star(star, {"particles": pd.DataFrame({"rlnImageName": ["000001@particles.mrcs"]})})
    stack_file.with_suffix(".txt").write_text("not an image")
    for inputs, out, status, message in cases:
        got, _, err = flybox_mask(capsys, *inputs, "-o", out, "--shape", "circular")
        assert got == status, err
        assert message in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in stack_file.parent.iterdir()) == [
        "particles.mrcs",
        "particles.star",
        "particles.txt",
    ]
