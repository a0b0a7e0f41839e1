"""The ``flybox`` command itself: subcommands, version, and ``flybox mask`` through ``main``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flybox import __version__
from flybox.cli import main
from flybox.config.example import EXAMPLE_CONFIG
from flybox.io.mrc import read_stack, write_stack


def test_version_and_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"flybox {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("extract", "mask", "config"):
        assert command in text


def test_mask_command_masks_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = np.ones((3, 32, 32), dtype=np.float32)
    write_stack(tmp_path / "in.mrcs", images, 1.5)
    code = main(
        ["mask", str(tmp_path / "in.mrcs"), "-o", str(tmp_path / "out.mrcs"),
         "--shape", "circular", "--radius", "10"]
    )  # fmt: skip
    assert code == 0
    masked, info = read_stack(tmp_path / "out.mrcs")
    assert info.pixel_size_a == pytest.approx(1.5)
    assert masked[0, 16, 16] == 1.0
    assert masked[0, 0, 0] == 0.0
    assert "3 particles masked" in capsys.readouterr().out


def test_mask_command_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_stack(tmp_path / "in.mrcs", np.ones((1, 16, 16), dtype=np.float32), 1.0)
    code = main(["mask", str(tmp_path / "in.mrcs"), "-o", str(tmp_path / "o.mrcs")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--shape" in err[0]
    assert not (tmp_path / "o.mrcs").exists()


def _run_entry(*arguments: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flybox", *arguments],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_console_script_exits_quickly_with_its_output_flushed_and_its_code(
    tmp_path: Path,
) -> None:
    # entry() ends the process with os._exit after a clean command: everything printed must
    # still arrive (stdout to a pipe and to a file are block-buffered), and the exit code
    # must be the command's.
    example = _run_entry("config", "example")
    assert example.returncode == 0
    assert example.stdout == EXAMPLE_CONFIG
    written = tmp_path / "example.toml"
    with open(written, "w") as handle:
        assert _run_entry("config", "example", stdout=handle.fileno()).returncode == 0
    assert written.read_text() == EXAMPLE_CONFIG
    bad = tmp_path / "bad.toml"
    bad.write_text("[micrograph]\npixel_size = -1\n")
    checked = _run_entry("config", "check", str(bad))
    assert checked.returncode == 2
    assert "micrograph.pixel_size" in checked.stderr
