"""A new user's mistakes, walked through the CLI (issue 10): each one gives one line naming the
file, option or cause, a non-zero exit where nothing useful was done, and never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import starfile

from flybox.cli import build_parser, main
from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.io.star import write_star
from flybox.sim.microscope import _ctf_row, synthetic_micrograph
from tests.conftest import missing_component
from tests.helpers.service import FOREIGN_UID, unprivileged_root_prefix

REPO = Path(__file__).resolve().parents[2]


def flybox(
    args: list[str], capsys: pytest.CaptureFixture[str], *, progress: bool = False
) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def micrographs(folder: Path, pixel_sizes: list[float], *, n: int = 20) -> Path:
    """Micrographs (one per pixel size, one optics group each) with picks beside them, and a
    micrographs STAR file with their CTF; returns the STAR file."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, optics = [], []
    for index, pixel in enumerate(pixel_sizes):
        mic = synthetic_micrograph(256, n, pixel_size_a=pixel, rng=index, edge_fraction=0.0)
        path = folder / f"mic{index}.mrc"
        write_micrograph(path, mic.image, pixel)
        write_coordinates_star(folder / f"mic{index}_autopick.star", mic.picks)
        group = pixel_sizes.index(pixel) + 1
        rows.append({**_ctf_row(str(path), mic.ctf), "rlnOpticsGroup": group})
        if len(optics) < group:
            optics.append(
                {"rlnOpticsGroupName": f"opticsGroup{group}", "rlnOpticsGroup": group,
                 "rlnMicrographPixelSize": pixel, "rlnVoltage": 300.0,
                 "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
            )  # fmt: skip
    star = folder / "micrographs_ctf.star"
    write_star(star, {"optics": pd.DataFrame(optics), "micrographs": pd.DataFrame(rows)})
    return star


def extract(star: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--no-progress", "--workers", "1", "--micrographs", str(star),
            "--coord-suffix", "_autopick.star", "--box", "48", "-o", str(out), *extra]  # fmt: skip


def test_output_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = micrographs(tmp_path / "in", [1.0])
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, _, err = flybox(extract(star, target), capsys)
    assert code == 2
    assert err.strip() == f"error: -o: {target} is a file, not a folder"


def test_output_folder_without_write_permission_is_one_line(tmp_path: Path) -> None:
    star = micrographs(tmp_path / "in", [1.0])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root writes anywhere: run as a user that does not own the folder
        found = unprivileged_root_prefix()
        if found is None:
            missing_component("running as root without user namespaces (unshare --user)")
        prefix = found
        os.chown(locked, FOREIGN_UID, FOREIGN_UID)
    command = [*prefix, sys.executable, "-m", "flybox", *extract(star, locked / "Extract")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: -o: {locked / 'Extract'}: cannot write there (Permission denied)"
    )


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/", "http://"])
def test_status_with_a_bad_url_is_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = flybox(["status", "--url", url], capsys)
    assert code == 2
    assert err.startswith(f"error: --url {url}: not an http:// or https:// address")
    assert err.count("\n") == 1


def test_nothing_extracted_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = micrographs(tmp_path / "in", [1.0])
    code, out, err = flybox(extract(star, tmp_path / "out", "--coord-suffix", ".box"), capsys)
    assert code == 1
    assert "extracted 0 micrographs" in out
    assert "no coordinates found; skipped" in err
    assert "error: no particle was extracted" in err


def test_summary_states_each_optics_group_pixel_size_and_the_normalisation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = micrographs(tmp_path / "in", [0.6666, 0.8538, 0.8538])
    code, out, _ = flybox(extract(star, tmp_path / "out"), capsys)
    assert code == 0
    assert "extracted 3 micrographs: particles 60 (48 px; optics group 1 0.6666 Å, " in out
    assert "optics group 2 0.8538 Å)" in out
    assert "; normalisation ramp" in out
    optics = starfile.read(tmp_path / "out" / "particles.star")["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [0.6666, 0.8538]
    star = micrographs(tmp_path / "one", [1.0])
    code, out, _ = flybox(extract(star, tmp_path / "out1", "--norm", "none"), capsys)
    assert "extracted 1 micrograph: particles 20 (48 px, 1 Å)" in out
    assert "normalisation none" in out


def test_pixel_size_override_and_picks_outside_are_warned_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = micrographs(tmp_path / "in", [1.0, 1.0])
    # The trap: overrides 0.83 / 3.32 Å on 1.0 Å data scale the coordinates by 4.
    code, _, err = flybox(
        extract(star, tmp_path / "out", "--pixel-size", "0.83", "--picking-pixel-size", "3.32"),
        capsys,
    )
    assert code == 0
    header = "the pixel size = 0.83 Å disagrees with the MRC header (1 Å) by 17%"
    assert err.count(header) == 1  # once, not per micrograph
    assert err.count("disagrees with the micrographs STAR / CTF table (1 Å)") == 1
    assert "mic0.mrc: " in err
    assert (
        "picks fall outside the micrograph; the picking pixel size (3.32 Å) is probably wrong"
        in (err)
    )


def test_help_states_defaults_once_and_points_to_the_conventions() -> None:
    parser = build_parser(["extract"])
    extract_parser = next(
        action
        for action in parser._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
        if action.prog.endswith("extract")
    )
    text = " ".join(extract_parser.format_help().split())
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert text.count("default: ramp") == 1
    assert "relion_preprocess's own default is no normalisation" in text
    assert "docs/conventions.md" in text
    assert "ALGORITHMS.md" not in text
    assert "(default: 2)" in text  # real defaults are still shown


def test_without_a_writable_home_numba_falls_back_with_one_warning(tmp_path: Path) -> None:
    star = micrographs(tmp_path / "in", [1.0])
    home = tmp_path / "home"
    home.mkdir(mode=0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        found = unprivileged_root_prefix()
        if found is None:
            missing_component("running as root without user namespaces (unshare --user)")
        prefix = found
        os.chown(home, FOREIGN_UID, FOREIGN_UID)
    cache = tmp_path / "fallback-tmp"
    cache.mkdir()
    environment = {
        **os.environ,
        "HOME": str(home),
        "NUMBA_CACHE_DIR": str(home / "numba"),
        # An installed flybox: numba cannot write beside the sources either.
        "NUMBA_CACHE_LOCATOR_CLASSES": "UserProvidedCacheLocator,UserWideCacheLocator",
        "TMPDIR": str(cache),
    }
    command = [*prefix, sys.executable, "-m", "flybox", *extract(star, tmp_path / "out")]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=environment
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("warning: numba cannot write its cache") == 1
    assert "extracted 1 micrograph" in done.stdout


def test_glob_without_optics_warns_that_relion_cannot_read_the_particles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = micrographs(tmp_path / "in", [1.0])
    glob = str(star.parent / "*.mrc")
    code, _, err = flybox(extract(Path(glob), tmp_path / "out"), capsys)
    assert code == 0
    assert "the optics table has no rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast" in err
    code, _, err = flybox(extract(star, tmp_path / "out2"), capsys)  # the STAR has optics
    assert "optics table has no" not in err
