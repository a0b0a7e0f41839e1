"""``flybox extract`` end to end on files: pairing, options, summaries and one-line errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from flybox.cli import build_parser, main
from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.io.star import write_particles_star
from flybox.sim.microscope import synthetic_micrograph, write_dataset


def mics_with_picks(folder: Path, count: int = 3, *, n: int = 12, shape: int = 256) -> list[Path]:
    """Micrographs with their RELION coordinate STAR files beside them (``<stem>.star``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        mic = synthetic_micrograph(shape, n, pixel_size_a=1.2, rng=index, edge_fraction=0.3)
        path = folder / f"mic{index}.mrc"
        write_micrograph(path, mic.image, 1.2)
        write_coordinates_star(folder / f"mic{index}.star", mic.picks)
        paths.append(path)
    return paths


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["extract", "--no-progress", "--workers", "1", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_in(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *options: str,
    micrographs: str = "*.mrc",
    out: str = "out",
) -> tuple[int, str, str]:
    """``flybox extract`` on ``tmp_path/in/<micrographs>`` into ``tmp_path/<out>``."""
    folders = ["--micrographs", str(tmp_path / "in" / micrographs), "-o", str(tmp_path / out)]
    return run([*folders, *options], capsys)


def test_help_documents_every_option_with_units_and_defaults() -> None:
    parser = build_parser(["extract"])
    extract = next(
        action
        for action in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        if action.prog.endswith("extract")
    )
    text = extract.format_help()
    for action in extract._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    for option in ("--box", "--fcrop-small", "--bg-radius", "--target-pixel-size", "--workers"):
        assert option in text
    assert "pixels" in text
    assert "Å" in text
    assert "default: 2" in text  # --workers default shown


def test_micrographs_with_picks_beside_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in")
    code, out, _ = run_in(tmp_path, capsys, "--box", "48", "--fcrop-small", "24", "--invert")
    assert code == 0
    summary = re.search(
        r"extracted 3 micrographs: particles (\d+) \(48 px, 1.2 Å\), "
        r"particles_small (\d+) \(24 px, 2.4 Å\); (\d+) excluded at the border",
        out,
    )
    assert summary, out
    full = starfile.read(tmp_path / "out" / "particles.star")
    assert len(full["particles"]) == int(summary.group(1)) == int(summary.group(2))
    assert "flyboxBorderFraction" in full["particles"]
    assert (full["particles"]["flyboxBorderFraction"] > 0).any()
    for index in range(3):
        assert (tmp_path / "out" / "Particles" / f"mic{index}.mrcs").is_file()
        assert (tmp_path / "out" / "ParticlesSmall" / f"mic{index}.star").is_file()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_a_bad_coordinate_file_names_the_file_and_the_others_go_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in")
    bad = tmp_path / "in" / "mic1.star"
    bad.write_text("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n10 abc\n")
    (tmp_path / "in" / "mic2.star").unlink()
    code, out, err = run_in(tmp_path, capsys, "--box", "48")
    assert code == 1
    assert "extracted 1 micrograph:" in out
    assert "1 failed" in out
    assert "1 without coordinates" in out
    error_lines = [line for line in err.splitlines() if "mic1.star" in line]
    assert len(error_lines) == 1
    assert f"{tmp_path / 'in' / 'mic2.mrc'}: no coordinates found; skipped" in err


def test_corrupt_micrograph_is_reported_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=2)
    (tmp_path / "in" / "mic0.mrc").write_bytes(b"\0" * 2000)
    code, out, err = run_in(tmp_path, capsys, "--box", "48")
    assert code == 1
    assert "extracted 1 micrograph:" in out
    assert sum("mic0.mrc" in line for line in err.splitlines()) == 1


def test_border_skip_excludes_and_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1, n=20)
    picks = starfile.read(tmp_path / "in" / "mic0.star")
    code, out, _ = run_in(tmp_path, capsys, "--box", "64", "--border", "skip")
    assert code == 0
    rows = starfile.read(tmp_path / "out" / "particles.star")["particles"]
    excluded = int(re.search(r"(\d+) excluded at the border", out).group(1))  # type: ignore[union-attr]
    assert excluded > 0
    assert len(rows) + excluded == len(picks)
    assert (rows["flyboxBorderFraction"] == 0).all()


def test_float16_and_descriptors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mics_with_picks(tmp_path / "in", count=1, shape=320)
    code, _, _ = run_in(tmp_path, capsys, "--box", "48", "--float16", "--descriptors")
    assert code == 0
    with mrcfile.open(tmp_path / "out" / "Particles" / "mic0.mrcs") as stack:
        assert stack.header.mode == 12
    rows = starfile.read(tmp_path / "out" / "particles.star")["particles"]
    for column in ("flyboxLocalVariance", "flyboxGini", "flyboxLocalAverage"):
        assert column in rows
        assert np.isfinite(rows[column]).all()
    assert rows["flyboxGini"].nunique() == 1


def test_picking_pixel_size_rescales_coordinates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1)
    picks = starfile.read(tmp_path / "in" / "mic0.star")
    halved = picks.assign(
        rlnCoordinateX=picks["rlnCoordinateX"] / 2, rlnCoordinateY=picks["rlnCoordinateY"] / 2
    )
    write_coordinates_star(tmp_path / "in" / "mic0.star", halved)
    code, _, _ = run_in(tmp_path, capsys, "--box", "48", "--picking-pixel-size", "2.4")
    assert code == 0
    rows = starfile.read(tmp_path / "out" / "particles.star")["particles"]
    np.testing.assert_allclose(rows["rlnCoordinateX"], picks["rlnCoordinateX"], atol=1e-4)


def test_recenter_from_refined_origins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mics_with_picks(tmp_path / "in", count=1)
    optics = pd.DataFrame(
        {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [2.4],
         "rlnImageSize": [24], "rlnImageDimensionality": [2]}
    )  # fmt: skip
    particles = pd.DataFrame(
        {"rlnCoordinateX": [100.0, 120.0], "rlnCoordinateY": [90.0, 140.0],
         "rlnOriginXAngst": [3.7, -6.1], "rlnOriginYAngst": [0.5, 2.5],
         "rlnImageName": ["000001@old.mrcs", "000002@old.mrcs"],
         "rlnMicrographName": [str(tmp_path / "in" / "mic0.mrc")] * 2, "rlnOpticsGroup": [1, 1]}
    )  # fmt: skip
    write_particles_star(tmp_path / "refined.star", optics, particles)
    code, _, _ = run_in(
        tmp_path, capsys, "--box", "48", "--recenter", str(tmp_path / "refined.star")
    )
    assert code == 0
    rows = starfile.read(tmp_path / "out" / "particles.star")["particles"]
    # Origin 3.7 Å at 1.2 Å/px = 3.083 px: the centre moves by round(3.083) = 3 px and the
    # residual 0.083 px = 0.1 Å stays as the origin (ALGORITHMS.md §9.1).
    assert rows["rlnCoordinateX"].iloc[0] == pytest.approx(97.0)
    assert rows["rlnOriginXAngst"].iloc[0] == pytest.approx(0.1, abs=1e-6)
    true_x = particles["rlnCoordinateX"] - particles["rlnOriginXAngst"] / 1.2
    np.testing.assert_allclose(rows["rlnCoordinateX"] - rows["rlnOriginXAngst"] / 1.2, true_x)
    # outside the project folder (the working directory): absolute
    assert rows["rlnImageName"].iloc[0] == f"000001@{tmp_path}/out/Particles/mic0.mrcs"


def test_config_chain_and_refusal_to_mix_it_with_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1)
    config = tmp_path / "chain.toml"
    config.write_text(
        '[[chain]]\nstep = "extract"\nbox = 40\n'
        '[[chain]]\nstep = "fourier_crop"\noutputs = { particles = 40, particles_tiny = 20 }\n'
        '[[chain]]\nstep = "normalize"\nmethod = "background"\n'
        "[output]\nfloat16 = true\n"
    )
    code, out, _ = run_in(tmp_path, capsys, "-c", str(config))
    assert code == 0
    assert "particles_tiny" in out
    assert (tmp_path / "out" / "ParticlesTiny" / "mic0.mrcs").is_file()
    code, _, err = run_in(tmp_path, capsys, "-c", str(config), "--box", "40", out="out2")
    assert code == 2
    assert "--box: processing options cannot be combined with -c CONFIG" in err


def test_xmipp_convention_skips_borders_and_rounds_centres(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1, n=20)
    code, out, _ = run_in(tmp_path, capsys, "--box", "49", "--convention", "xmipp")
    assert code == 0
    assert int(re.search(r"(\d+) excluded", out).group(1)) > 0  # type: ignore[union-attr]
    with mrcfile.open(tmp_path / "out" / "Particles" / "mic0.mrcs") as stack:
        assert stack.data.shape[1:] == (49, 49)


def test_odd_box_is_refused_under_the_relion_convention(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1)
    code, _, err = run_in(tmp_path, capsys, "--box", "49")
    assert code == 2
    assert "--box 49 is odd" in err
    assert "56" in err  # the next even FFT-efficient size
    code, _, err = run_in(tmp_path, capsys, "--box", "50")
    assert code == 0
    assert "not an FFT-efficient size" in err


def test_box_suggested_from_the_picking_box(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    mic = synthetic_micrograph(512, 5, rng=1, edge_fraction=0)
    write_micrograph(tmp_path / "in" / "m.mrc", mic.image, 1.0)
    lines = [
        f"{x - 40:.0f}\t{y - 40:.0f}\t80\t80"
        for x, y in zip(mic.picks["rlnCoordinateX"], mic.picks["rlnCoordinateY"], strict=True)
    ]
    (tmp_path / "in" / "m.box").write_text("\n".join(lines) + "\n")
    code, out, err = run_in(tmp_path, capsys, micrographs="m.mrc")
    assert code == 0
    assert "box size 120 px (1.5 x picking box 80 px" in err
    assert "(120 px" in out


def test_target_pixel_size_and_phase_flip_needs_a_ctf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mics_with_picks(tmp_path / "in", count=1)
    code, out, _ = run_in(tmp_path, capsys, "--box", "64", "--target-pixel-size", "2.4")
    assert code == 0
    assert "particles" in out
    assert "(32 px, 2.4 Å)" in out
    code, _, err = run_in(tmp_path, capsys, "--box", "64", "--phase-flip", out="out2")
    assert code == 2
    assert "no CTF found" in err


def test_worker_pool_gives_the_same_particles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = write_dataset(tmp_path / "p", 4, shape=256, n_particles=8, seed=3)
    common = [
        "--micrographs", str(star), "--coords", str(tmp_path / "p" / "AutoPick"),
        "--coord-suffix", "_autopick.star", "--box", "48", "--fcrop-small", "24", "--no-progress",
    ]  # fmt: skip
    assert main(["extract", *common, "-o", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main(["extract", *common, "-o", str(tmp_path / "two"), "--workers", "2"]) == 0
    capsys.readouterr()
    for stream in ("Particles", "ParticlesSmall"):
        for index in range(4):
            a = mrcfile.read(tmp_path / "one" / stream / f"mic{index:03d}.mrcs")
            b = mrcfile.read(tmp_path / "two" / stream / f"mic{index:03d}.mrcs")
            np.testing.assert_array_equal(a, b)
    one = (tmp_path / "one" / "particles.star").read_text()
    two = (tmp_path / "two" / "particles.star").read_text()
    assert one.replace(f"{tmp_path}/one/", "") == two.replace(f"{tmp_path}/two/", "")


def test_micrographs_star_without_ctf_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = write_dataset(tmp_path / "p", 2, shape=256, n_particles=6, seed=4)
    shutil.rmtree(tmp_path / "p" / "Micrographs")
    code, _, err = run(
        ["--micrographs", str(star), "--coords", str(tmp_path / "p" / "AutoPick"),
         "--coord-suffix", "_autopick.star", "-o", str(tmp_path / "out"), "--box", "48"],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert sum("mic000.mrc" in line for line in err.splitlines()) == 1


def test_sigma_estimator_and_background_set_are_selectable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flybox.cli.extract import extract_chain

    args = build_parser(["extract"]).parse_args(
        ["extract", "--micrographs", "m.mrc", "-o", "out", "--sigma", "sample",
         "--background", "inclusive"]
    )  # fmt: skip
    spec = extract_chain(args, 64, None)
    normalize = next(step.settings for step in spec.steps if step.step == "normalize")
    assert (normalize["sigma"], normalize["background"]) == ("sample", "inclusive")
    mics_with_picks(tmp_path / "in", count=1)
    outputs = {}
    for sigma in ("population", "sample"):
        code, _, _ = run(
            ["--micrographs", str(tmp_path / "in" / "*.mrc"), "-o", str(tmp_path / sigma),
             "--box", "48", "--sigma", sigma],
            capsys,
        )  # fmt: skip
        assert code == 0
        outputs[sigma] = mrcfile.read(tmp_path / sigma / "Particles" / "mic0.mrcs")
    # Same images, σ scaled by sqrt(n/(n-1)) for the ~1000 background pixels of a 48-px box.
    ratio = outputs["population"] / outputs["sample"]
    assert np.nanmedian(ratio) == pytest.approx(1.0005, abs=3e-4)
