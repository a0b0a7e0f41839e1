"""``flybox extract --dask local|ADDRESS``: the same stacks, byte for byte, and the same STAR
files as the local worker pool's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from flybox.sim.microscope import write_dataset
from tests.conftest import require_module
from tests.helpers.dask_cluster import DaskProcesses

require_module("distributed")

MICROGRAPHS = 6


def _extract(star: Path, folder: Path, output: Path, *extra: str) -> str:
    """Run ``flybox extract`` with the test's folder as the project folder (the working
    directory), so that STAR paths are relative to it."""
    command = [
        sys.executable, "-m", "flybox", "extract",
        "--micrographs", str(star), "--coords", str(folder / "AutoPick"),
        "--coord-suffix", "_autopick.star", "--box", "48", "--fcrop-small", "24",
        "--no-progress", "--workers", "2", "-o", str(output), *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=output.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    if "--dask" in extra:  # the client's start, reported on its own (it overlaps the planning)
        assert re.search(r"2 workers accepted, 2 task slots; client started in", done.stderr), (
            done.stderr
        )
    return done.stdout


def _same_outputs(a: Path, b: Path) -> None:
    for stream in ("Particles", "ParticlesSmall"):
        for index in range(MICROGRAPHS):
            name = f"{stream}/mic{index:03d}.mrcs"
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for star in ("particles.star", "particles_small.star"):
        # The same text but for the output folder's own name in each image path.
        theirs = (b / star).read_text().replace(f"@{b.name}/", f"@{a.name}/")
        assert f"@{a.name}/Particles" in theirs
        assert (a / star).read_text() == theirs, star
    assert not [p for p in b.rglob("*") if p.name.endswith(".tmp")]


def test_dask_local_and_a_dask_scheduler_give_the_local_pools_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    star = write_dataset(folder, MICROGRAPHS, shape=256, n_particles=8, seed=5)
    pool = _extract(star, folder, tmp_path / "pool")
    local = _extract(star, folder, tmp_path / "dask-local", "--dask", "local")
    _same_outputs(tmp_path / "pool", tmp_path / "dask-local")
    cluster = DaskProcesses(tmp_path)
    try:
        cluster.start_scheduler()
        for name in ("a", "b"):
            cluster.start_worker(name)
        for name in ("a", "b"):
            cluster.wait_worker(name)
        remote = _extract(star, folder, tmp_path / "dask-remote", "--dask", cluster.address)
    finally:
        cluster.close()
    _same_outputs(tmp_path / "pool", tmp_path / "dask-remote")

    def summary(out: str) -> str:  # the summary line without its timing
        line = out.splitlines()[-1]
        timing = re.compile(r"; [0-9.]+ s, [0-9.]+ micrographs/s")
        assert timing.search(line), line
        return timing.sub("", line)

    assert summary(pool) == summary(local) == summary(remote)
