"""``flybox pick`` as a user runs it: subprocesses on synthetic micrographs."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from flybox.io.coords import read_coordinates
from tests.integration.pick.conftest import (
    PARTICLE_SIZE,
    Served,
    make_micrographs,
    read_url,
    start_server,
)

pytestmark = pytest.mark.slow


def _flybox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flybox", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_prints_a_loopback_url_and_stops_cleanly_on_sigterm(served: Served) -> None:
    assert served.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(served.url + "api/pick/summary", timeout=10) as response:
        summary = json.load(response)
    assert summary["particle_size"] == PARTICLE_SIZE
    assert served.stop() == 0


def test_serve_refuses_a_non_loopback_listener_without_a_token(tmp_path: Path) -> None:
    micrographs, _ = make_micrographs(tmp_path / "Micrographs", count=1)
    result = _flybox(
        "pick",
        "serve",
        str(micrographs[0]),
        "-o",
        str(tmp_path / "Picks"),
        "--particle-size",
        "64",
        "--listen",
        "0.0.0.0:0",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --listen: 0.0.0.0 is not loopback: give --token to serve on it"
    )


def test_bad_options_exit_2_with_one_line(tmp_path: Path) -> None:
    result = _flybox("pick", "serve", "nothing*.mrc", "-o", str(tmp_path), "--particle-size", "9")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nothing*.mrc: no micrograph matches"
    result = _flybox("pick", "export", str(tmp_path), "--format", "jpg", "-o", str(tmp_path))
    assert result.returncode == 2


def test_train_auto_summary_and_export(tmp_path: Path) -> None:
    micrographs, truth = make_micrographs(tmp_path / "Micrographs", count=2)
    picks = tmp_path / "Picks"
    picks.mkdir()
    np.savetxt(picks / "mic0.txt", truth["mic0"], header="x y", comments="")
    model = tmp_path / "model.flypick"
    glob = str(tmp_path / "Micrographs" / "*.mrc")
    result = _flybox(
        "pick",
        "train",
        "--micrographs",
        glob,
        "--picks",
        str(picks),
        "--picks-suffix",
        ".txt",
        "--particle-size",
        str(PARTICLE_SIZE),
        "-o",
        str(model),
    )
    assert result.returncode == 0, result.stderr
    result = _flybox(
        "pick", "auto", "--model", str(model), "--micrographs", glob, "-o", str(tmp_path / "Auto")
    )
    assert result.returncode == 0, result.stderr
    found = read_coordinates(tmp_path / "Auto" / "mic1_autopick.star")
    assert abs(len(found) - len(truth["mic1"])) <= 8

    # A session made by serve, then summarised and exported.
    process = start_server(micrographs, tmp_path / "Session", "--particle-size", "64")
    url = read_url(process)
    request = urllib.request.Request(
        url + "api/pick/micrographs/mic0/picks",
        data=json.dumps({"picks": [{"x": 100, "y": 100}, {"x": 300, "y": 300}]}).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()
    process.terminate()
    process.communicate(timeout=20)
    assert process.returncode == 0
    summary = _flybox("pick", "summary", str(tmp_path / "Session"))
    assert summary.returncode == 0
    assert "manual picks:         2" in summary.stdout
    assert "no, 13 more manual picks" in summary.stdout
    for fmt in ("box", "pos", "star"):
        result = _flybox(
            "pick", "export", str(tmp_path / "Session"), "--format", fmt, "-o", str(tmp_path / fmt)
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / fmt / f"mic0.{fmt}").is_file()
