"""End to end: the real service in a subprocess, SIGKILLed at random moments while a simulated
microscope writes a 24-micrograph session, restarted each time; in the end every particle is
in every stream exactly once and nothing partial or temporary is left."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flybox.sim.microscope import Acquisition, AcquisitionSettings
from tests.helpers.service import (
    ServiceProcess,
    both_streams_committed,
    check_outputs,
    expected_picks,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

MICROGRAPHS = 24
PARTICLES = 20


def test_sigkill_at_random_moments_then_restart_gives_every_particle_exactly_once(
    tmp_path: Path,
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    config = write_config(tmp_path, inputs, output)
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=MICROGRAPHS,
            rate_per_minute=200,
            size=512,
            particles=PARTICLES,
            chunks=3,
            chunk_pause_seconds=0.02,
            seed=seed % 1000,
        ),
    )
    writer = threading.Thread(target=acquisition.run, daemon=True)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    writer.start()
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.3, 3.0))
            service.kill()
            service.start()
        writer.join(60)
        total = MICROGRAPHS * PARTICLES
        wait_for(
            lambda: both_streams_committed(output, total),
            120,
            f"all particles committed (seed {seed})",
        )
        assert service.terminate() == 0, service.output()
    finally:
        acquisition.stop()
        if service.alive():
            service.kill()
    service.assert_no_leftovers()
    check_outputs(output, expected_picks(inputs))
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM units GROUP BY state").fetchall())
        versions = db.execute("SELECT MAX(version) FROM units").fetchone()[0]
    assert states == {"done": MICROGRAPHS}, (states, seed)
    assert versions == 1
