"""The service on a real Dask cluster (``dask scheduler`` and ``dask worker`` processes on
loopback): a stream of micrographs while a worker is SIGKILLed mid-task and a new one joins,
while the service itself is SIGKILLed and restarted, and while the scheduler is away for 30 s;
every particle exactly once in every stream, nothing temporary left, SIGTERM exits 0. A worker
with another flybox is refused."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flybox.sim.microscope import Acquisition, AcquisitionSettings
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

MICROGRAPHS = 20
PARTICLES = 16


@pytest.fixture
def dask_processes(tmp_path: Path) -> Iterator[DaskProcesses]:
    cluster = DaskProcesses(tmp_path)
    cluster.start_scheduler()
    try:
        yield cluster
    finally:
        cluster.close()


def _config(tmp_path: Path, address: str) -> tuple[Path, Path, Path]:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    config = write_config(tmp_path, inputs, output)
    text = config.read_text().replace("workers = 2", f'workers = 2\naddress = "{address}"')
    config.write_text(text)
    return config, inputs, output


def _acquisition(inputs: Path, rate: float) -> Acquisition:
    return Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=MICROGRAPHS,
            rate_per_minute=rate,
            size=1024,
            particles=PARTICLES,
            chunks=2,
            chunk_pause_seconds=0.02,
            seed=7,
        ),
    )


def _journal_states(output: Path) -> dict[str, int]:
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM units GROUP BY state").fetchall())


def _temporaries(output: Path) -> list[Path]:
    return [p for p in output.rglob("*") if p.name.endswith(".tmp")]


def _finish(service: ServiceProcess, output: Path, inputs: Path, cluster: DaskProcesses) -> None:
    total = MICROGRAPHS * PARTICLES
    try:
        wait_for(
            lambda: both_streams_committed(output, total),
            150,
            "all particles committed",
        )
    except AssertionError:
        raise AssertionError(service.output()[-6000:] + cluster.logs()) from None
    assert service.terminate() == 0, service.output()[-6000:]
    service.assert_no_leftovers()
    check_outputs(output, expected_picks(inputs))
    assert _journal_states(output) == {"done": MICROGRAPHS}


def test_stream_survives_a_killed_worker_a_new_worker_and_a_killed_service(
    tmp_path: Path, dask_processes: DaskProcesses
) -> None:
    cluster = dask_processes
    for name in ("a", "b"):
        cluster.start_worker(name)
    for name in ("a", "b"):
        cluster.wait_worker(name)
    config, inputs, output = _config(tmp_path, cluster.address)
    acquisition = _acquisition(inputs, rate=120)
    writer = threading.Thread(target=acquisition.run, daemon=True)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    service.wait_running()
    writer.start()
    try:
        # A worker SIGKILLed while the scheduler says it runs a micrograph.
        key = cluster.kill_worker_mid_task("a")
        assert key.startswith("flybox-"), key
        cluster.start_worker("c")
        cluster.wait_worker("c")
        wait_for(lambda: committed_rows(output) >= 4 * PARTICLES, 60, "commits after the kill")
        # The service SIGKILLed mid-stream and started again.
        service.kill()
        service.start()
        service.wait_running()
        writer.join(60)
        _finish(service, output, inputs, cluster)
    finally:
        acquisition.stop()
        if service.alive():
            service.kill()
    assert "dask scheduler" in service.output()


def test_scheduler_away_for_30_seconds_then_back_the_session_completes(
    tmp_path: Path, dask_processes: DaskProcesses
) -> None:
    cluster = dask_processes
    cluster.start_worker("a")
    cluster.wait_worker("a")
    config, inputs, output = _config(tmp_path, cluster.address)
    acquisition = _acquisition(inputs, rate=240)
    writer = threading.Thread(target=acquisition.run, daemon=True)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    service.wait_running()
    writer.start()
    try:
        wait_for(lambda: committed_rows(output) >= 2 * PARTICLES, 60, "first commits")
        cluster.stop_scheduler()
        cluster.kill_worker("a")
        time.sleep(30)  # the outage itself (what is asserted is the outcome, not a timing)
        cluster.start_scheduler()
        cluster.start_worker("b")
        cluster.wait_worker("b")
        writer.join(60)
        _finish(service, output, inputs, cluster)
    finally:
        acquisition.stop()
        if service.alive():
            service.kill()
    log = service.output()
    assert log.count("lost (") == 1 or log.count("unreachable (") == 1, log[-4000:]
    assert "connected again" in log
    assert ": failed:" not in log  # work in flight was submitted again, not failed


def test_a_worker_with_another_flybox_is_refused(
    tmp_path: Path, dask_processes: DaskProcesses
) -> None:
    cluster = dask_processes
    preload = tmp_path / "other_flybox.py"
    preload.write_text(
        '"""Makes this worker\'s flybox report another version (a stale install)."""\n'
        "import flybox\n\nflybox.__version__ = '0.0.1-other'\n"
    )
    cluster.start_worker("good")
    cluster.start_worker("stale", preload=preload)
    cluster.wait_worker("good")
    cluster.wait_worker("stale")
    config, inputs, output = _config(tmp_path, cluster.address)
    acquisition = _acquisition(inputs, rate=600)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    try:
        service.wait_running()
        wait_for(
            lambda: cluster.workers["stale"].poll() is not None, 60, "the stale worker retired"
        )
        acquisition.run()
        _finish(service, output, inputs, cluster)
    finally:
        acquisition.stop()
        if service.alive():
            service.kill()
    refused = [line for line in service.output().splitlines() if "refused" in line]
    assert len(refused) == 1, refused
    assert "0.0.1-other" in refused[0]
    assert "flybox" in refused[0]
