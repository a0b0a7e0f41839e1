"""``flybox demo``: the simulator and the service together, from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flybox.io.star import read_relion_star


@pytest.mark.slow
def test_flybox_demo_runs_a_session_and_summarises_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flybox",
            "demo",
            "--micrographs",
            "4",
            "--rate",
            "240",
            "--keep",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "flybox demo: 4 micrographs in" in done.stdout
    assert "particles 240, particles_small 240" in done.stdout
    assert "mean latency" in done.stdout
    output = tmp_path / "demo" / "output"
    assert f"output: {output}" in done.stdout
    rows = read_relion_star(output / "particles_small.star", "particles").rows
    assert len(rows) == 240
