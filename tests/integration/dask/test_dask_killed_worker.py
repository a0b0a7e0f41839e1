"""Dask gives up on a task (``KilledWorker``): a failed attempt for the journal, bounded by
``[executor] max_attempts``; then the unit is ``failed`` with a failure event, and the session
goes on with the other micrographs.

Nothing is faked: the scheduler is told to give up on a task as soon as one worker died running
it (``distributed.scheduler.allowed-failures = 0``), and the only worker runs under a nanny with
a memory limit. One micrograph is too large for that limit: reading it takes the worker past
95 % of its memory budget, so the nanny terminates the worker process (and starts a new one),
every time.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from flybox.io.coords import write_coordinates_star
from flybox.io.mrc.write import write_micrograph
from flybox.sim.microscope import Acquired, Acquisition, AcquisitionSettings
from tests.conftest import require_module
from tests.helpers.dask_cluster import DaskProcesses
from tests.helpers.service import (
    ServiceProcess,
    both_streams_committed,
    check_outputs,
    committed_rows,
    expected_picks,
    wait_for,
    write_config,
)

require_module("distributed")

PARTICLES = 16
#: Micrographs before the one too large for the worker, and after it.
BEFORE, AFTER = 4, 4
MAX_ATTEMPTS = 2
#: The worker's memory limit; a worker with flybox's processing modules loaded holds about
#: 300 MB, a 1024² micrograph adds a few tens.
MEMORY_LIMIT = "700MB"
#: 12288² float32: 600 MB, mapped and read in full by the worker (the finite-values check).
HUGE = 12288


def _write_huge(inputs: Path) -> Path:
    """A valid micrograph with a few picks, too large for the worker's memory limit."""
    rng = np.random.default_rng(11)
    band = rng.standard_normal((256, HUGE)).astype(np.float32)
    path = inputs / "Micrographs" / "huge.mrc"
    write_micrograph(path, np.tile(band, (HUGE // 256, 1)), 1.0)
    picks = pd.DataFrame({"rlnCoordinateX": [500.0, 6000.0], "rlnCoordinateY": [700.0, 9000.0]})
    write_coordinates_star(inputs / "AutoPick" / "huge_autopick.star", picks)
    return path


def _unit(output: Path, stem: str) -> tuple[str, int, str | None, str | None]:
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        row = db.execute(
            "SELECT state, attempts, code, error FROM units WHERE stem = ? "
            "ORDER BY version DESC LIMIT 1",
            (stem,),
        ).fetchone()
    return tuple(row) if row else ("absent", 0, None, None)  # type: ignore[return-value]


def _states(output: Path) -> dict[str, int]:
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM units GROUP BY state").fetchall())


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_killed_worker_is_a_failed_attempt_then_the_unit_fails_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    cluster = DaskProcesses(tmp_path)
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    config = write_config(tmp_path, inputs, output, ctf=False)
    text = config.read_text().replace(
        "workers = 2",
        f'workers = 2\naddress = "{cluster.address}"\nmax_attempts = {MAX_ATTEMPTS}',
    )
    config.write_text(text)
    http = "http://" + text.split('listen = "', 1)[1].split('"', 1)[0]
    service = ServiceProcess(config, tmp_path / "service.log")
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=BEFORE + AFTER,
            rate_per_minute=600,
            size=1024,
            particles=PARTICLES,
            chunks=1,
            seed=5,
        ),
    )
    huge_stem = "huge"

    def huge_in_between(acquired: Acquired) -> None:
        """After the first micrographs are committed, the huge one; the others once it has
        failed (so that no other task shares the worker it kills: Dask would give up on those
        too, as it should, and the test would depend on timing)."""
        if acquired.index != BEFORE - 1:
            return
        wait_for(lambda: committed_rows(output) == BEFORE * PARTICLES, 120, "the first commits")
        _write_huge(inputs)
        wait_for(lambda: _unit(output, huge_stem)[0] == "failed", 240, "the huge unit failed")

    writer = threading.Thread(
        target=acquisition.run, kwargs={"on_written": huge_in_between}, daemon=True
    )
    try:
        cluster.start_scheduler(env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
        cluster.start_worker(
            "limited",
            memory_limit=MEMORY_LIMIT,
            env={"DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "10ms"},
        )
        cluster.wait_worker("limited")
        service.start()
        service.wait_running()
        writer.start()
        total = (BEFORE + AFTER) * PARTICLES
        try:
            wait_for(
                lambda: both_streams_committed(output, total) and not writer.is_alive(),
                300,
                "every other micrograph committed",
            )
        except AssertionError:
            raise AssertionError(service.output()[-6000:] + cluster.logs()) from None

        state, attempts, code, error = _unit(output, huge_stem)
        assert (state, attempts, code) == ("failed", MAX_ATTEMPTS, "worker_crash"), error
        assert "died" in str(error), error
        assert _states(output) == {"done": BEFORE + AFTER, "failed": 1}
        # The failure event, as the dashboard and the metrics got it.
        incidents = json.loads(_get(f"{http}/api/dashboard/history"))["incidents"]
        failures = [i for i in incidents if i["type"] == "failure"]
        assert [Path(i["path"]).name for i in failures] == ["huge.mrc"], incidents
        metrics = _get(f"{http}/metrics")
        assert 'flybox_failures_total{reason="worker_crash"} 1.0' in metrics, metrics[-3000:]
        log = service.output()
        assert log.count("huge.mrc: attempt") == MAX_ATTEMPTS - 1, log[-6000:]
        assert log.count("huge.mrc: failed:") == 1, log[-6000:]
        # It was Dask giving up after the nanny's memory kills, every attempt.
        assert cluster.log("scheduler").count(b"marked as failed because 1 workers died") == (
            MAX_ATTEMPTS
        ), cluster.logs()
        assert cluster.log("worker-limited").count(b"memory budget") >= MAX_ATTEMPTS

        assert service.terminate() == 0, service.output()[-6000:]
        service.assert_no_leftovers()
        stems = [f"mic{i:04d}" for i in range(BEFORE + AFTER)]
        check_outputs(output, expected_picks(inputs, stems))
        assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]
    finally:
        acquisition.stop()
        if service.alive():
            service.kill()
        cluster.close()
        (inputs / "Micrographs" / "huge.mrc").unlink(missing_ok=True)  # 600 MB of disk
