"""A real ``flybox pick serve`` on a free loopback port, over synthetic micrographs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flybox.io.mrc import write_micrograph
from flybox.pick.synthetic import synthetic_micrograph

PARTICLE_SIZE = 64


@dataclass
class Served:
    url: str
    folder: Path
    micrographs: list[Path]
    truth: dict[str, np.ndarray]
    process: subprocess.Popen[str]

    stderr: str = ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, self.stderr = self.process.communicate(timeout=20)
        return self.process.returncode


def make_micrographs(folder: Path, count: int = 3) -> tuple[list[Path], dict[str, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    paths, truth = [], {}
    for i in range(count):
        mic = synthetic_micrograph(1024, PARTICLE_SIZE, particles=40, amplitude=0.8, seed=10 + i)
        path = folder / f"mic{i}.mrc"
        write_micrograph(path, mic.image, 1.0)
        paths.append(path)
        truth[path.stem] = mic.particles
    return paths, truth


def start_server(micrographs: list[Path], folder: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "flybox", "pick", "serve", *map(str, micrographs)]
    command += ["-o", str(folder), "--listen", "127.0.0.1:0", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def read_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    for _ in range(5):
        line = process.stdout.readline()
        if line.startswith("picker at "):
            return line.removeprefix("picker at ").strip()
        if not line:
            break
    process.kill()
    _, stderr = process.communicate()
    raise AssertionError(f"no URL printed; stderr: {stderr}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    micrographs, truth = make_micrographs(tmp_path / "Micrographs")
    folder = tmp_path / "Picks"
    process = start_server(micrographs, folder, "--particle-size", str(PARTICLE_SIZE))
    server = Served(read_url(process), folder, micrographs, truth, process)
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.stderr
    assert "Traceback" not in server.stderr, server.stderr
