"""The service in this process (events, status, quarantine, pairing timeouts), with jobs run in
a thread behind the executor seam; the end-to-end tests run the real service in a subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flybox.config import parse_config
from flybox.daemon.service import Service
from flybox.daemon.systemd import Notifier
from flybox.daemon.telemetry.events import (
    Event,
    FailureEvent,
    MicrographEvent,
    MissingCoordinatesEvent,
    OutputSetEvent,
    QuarantineEvent,
    StatusEvent,
    WarningEvent,
)
from flybox.errors import ConfigError
from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.pipeline.job import JobResult, MicrographJob, run_job
from flybox.sim.microscope import synthetic_micrograph, write_ctf_table

CHAIN = [
    {"step": "extract", "box": 64, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 64, "particles_small": 32}},
]


class ThreadExecutor:
    """Runs jobs in one thread of this process (an executor seam for in-process tests)."""

    workers = 1

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="test-worker")

    def submit(self, job: MicrographJob) -> asyncio.Future[JobResult]:
        return asyncio.wrap_future(self._pool.submit(run_job, job))

    def abandon(self, future: asyncio.Future[JobResult]) -> None:
        future.cancel()

    async def close(self, *, cancel: bool) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks behind."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    assert not leaked, f"tasks left running: {leaked}"


def _config(root: Path, *, ctf: bool = True, **watch: Any) -> Any:
    settings = {
        "micrographs": [str(root / "in" / "*.mrc")],
        "coordinates": [str(root / "in" / "*_autopick.star")],
        "coordinate_suffix": "_autopick.star",
        "settle_seconds": 0.1,
        "rescan_seconds": 0.5,
        "incomplete_timeout_seconds": 1.0,
        **watch,
    }
    if ctf:
        settings["ctf"] = str(root / "in" / "micrographs_ctf.star")
    (root / "in").mkdir(parents=True, exist_ok=True)
    return parse_config(
        {
            "session": {"name": "unit", "output": str(root / "out")},
            "watch": settings,
            "chain": CHAIN,
            "executor": {"workers": 1, "drain_seconds": 10},
        }
    )


def _write(root: Path, stem: str, *, picks: bool = True, seed: int = 0) -> int:
    mic = synthetic_micrograph(256, 8, rng=seed)
    write_micrograph(root / "in" / f"{stem}.mrc", mic.image, 1.0)
    if picks:
        write_coordinates_star(root / "in" / f"{stem}_autopick.star", mic.picks)
    return len(mic.picks)


def _ctf(root: Path, stems: list[str]) -> None:
    ctf = synthetic_micrograph(64, 1, rng=0).ctf
    rows = [
        {
            "rlnMicrographName": f"{s}.mrc",
            "rlnOpticsGroup": 1,
            "rlnDefocusU": ctf.defocus_u_a,
            "rlnDefocusV": ctf.defocus_v_a,
            "rlnDefocusAngle": ctf.defocus_angle_deg,
        }
        for s in stems
    ]
    write_ctf_table(root / "in" / "micrographs_ctf.star", rows, 1.0)


def _service(config: Any) -> Service:
    return Service(config, executor=ThreadExecutor(), notifier=Notifier({}), telemetry=False)


async def _collect(service: Service, until: Any, timeout: float = 30.0) -> list[Event]:
    events: list[Event] = []
    with service.bus.subscribe() as subscription:
        async with asyncio.timeout(timeout):
            async for event in subscription:
                events.append(event)
                if until(events):
                    return events
    return events


def _count(events: list[Event], kind: type) -> int:
    return sum(isinstance(e, kind) for e in events)


async def test_a_session_publishes_status_micrograph_and_output_events(tmp_path: Path) -> None:
    config = _config(tmp_path)
    picks = {s: _write(tmp_path, s, seed=i) for i, s in enumerate(["m1", "m2", "m3"])}
    _ctf(tmp_path, list(picks))
    service = _service(config)
    with service.bus.subscribe() as subscription:
        async with service:
            await _collect(service, lambda e: _count(e, MicrographEvent) == 3)
        events = list(subscription._queue)  # everything, from "starting" to "stopped"
    states = [e.state for e in events if isinstance(e, StatusEvent)]
    assert states[0] == "starting"
    assert "running" in states
    assert states[-2:] == ["draining", "stopped"]
    micrographs = [e for e in events if isinstance(e, MicrographEvent)]
    assert {m.name: m.picks for m in micrographs} == picks
    for event in micrographs:
        assert event.version == 1
        assert event.particles == {"particles": 8, "particles_small": 8}
        assert event.quality.defocus_a is not None
        assert event.quality.border_fraction_mean is not None
        assert set(event.stages) == {"wait", "queue", "process", "commit"}
        assert event.latency_seconds >= event.stages["process"]
    outputs = [e for e in events if isinstance(e, OutputSetEvent)]
    assert {o.stream for o in outputs} == {"particles", "particles_small"}
    assert max(o.particles for o in outputs if o.stream == "particles") == 24
    final = service.status_snapshot()
    assert final.counts.done == 3
    assert final.particles == {"particles": 24, "particles_small": 24}


async def test_missing_picks_are_reported_then_processed_when_they_come(tmp_path: Path) -> None:
    config = _config(tmp_path, ctf=False, pairing_timeout_seconds=0.5)
    _write(tmp_path, "m1", picks=False)
    service = _service(config)
    async with service:
        events = await _collect(service, lambda e: _count(e, MissingCoordinatesEvent) == 1)
        missing = next(e for e in events if isinstance(e, MissingCoordinatesEvent))
        assert missing.missing == "coordinates"
        assert missing.path.endswith("m1.mrc")
        assert service.status_snapshot().counts.waiting == 1
        picks = synthetic_micrograph(256, 8, rng=0).picks
        write_coordinates_star(tmp_path / "in" / "m1_autopick.star", picks)
        await _collect(service, lambda e: _count(e, MicrographEvent) == 1)
    assert service.status_snapshot().counts.done == 1


async def test_a_corrupt_micrograph_is_quarantined_and_taken_back_when_rewritten(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, ctf=False)
    (tmp_path / "in" / "bad.mrc").write_bytes(b"this is not an MRC file" * 100)
    write_coordinates_star(
        tmp_path / "in" / "bad_autopick.star", synthetic_micrograph(256, 8, rng=0).picks
    )
    service = _service(config)
    async with service:
        events = await _collect(service, lambda e: _count(e, QuarantineEvent) == 1)
        event = next(e for e in events if isinstance(e, QuarantineEvent))
        assert (event.kind, event.code) == ("micrograph", "invalid_mrc")
        record = json.loads((tmp_path / "out" / "quarantine" / "bad.mrc.json").read_text())
        assert record["reason"] == event.reason
        assert record["path"] == str(tmp_path / "in" / "bad.mrc")
        assert service.status_snapshot().counts.quarantined == 1
        _write(tmp_path, "bad", picks=False)
        await _collect(service, lambda e: _count(e, MicrographEvent) == 1)
    assert not (tmp_path / "out" / "quarantine" / "bad.mrc.json").exists()
    assert service.status_snapshot().counts.quarantined == 0


async def test_unparsable_picks_are_quarantined_with_the_reason(tmp_path: Path) -> None:
    config = _config(tmp_path, ctf=False)
    _write(tmp_path, "m1", picks=False)
    (tmp_path / "in" / "m1_autopick.star").write_text("data_\nloop_\n_rlnFoo #1\n1\n")
    service = _service(config)
    async with service:
        events = await _collect(service, lambda e: _count(e, QuarantineEvent) == 1)
    event = next(e for e in events if isinstance(e, QuarantineEvent))
    assert (event.kind, event.code) == ("coordinates", "bad_coordinates")
    assert (tmp_path / "out" / "quarantine" / "m1_autopick.star.json").exists()


def test_a_chain_that_needs_ctf_needs_a_ctf_source(tmp_path: Path) -> None:
    config = _config(tmp_path, ctf=False)
    chain = [{"step": "extract", "box": 64}, {"step": "phase_flip"}]
    needs_ctf = config.model_copy(update={"chain": chain})
    with pytest.raises(ConfigError, match=r"watch\.ctf"):
        Service(needs_ctf, telemetry=False)
    with pytest.raises(ConfigError, match=r"^session"):
        Service(config.model_copy(update={"session": None}), telemetry=False)


async def test_a_rewritten_micrograph_is_processed_again_as_a_new_version(tmp_path: Path) -> None:
    config = _config(tmp_path, ctf=False)
    picks = _write(tmp_path, "m1", seed=1)
    service = _service(config)
    async with service:
        first = await _collect(service, lambda e: _count(e, MicrographEvent) == 1)
        # the committed stem keeps no picks in memory; a new micrograph re-reads the picks file
        image = synthetic_micrograph(256, 8, rng=2).image
        write_micrograph(tmp_path / "in" / "m1.mrc", image, 1.0)
        second = await _collect(service, lambda e: _count(e, MicrographEvent) == 1)
    versions = [e.version for e in [*first, *second] if isinstance(e, MicrographEvent)]
    assert versions == [1, 2]
    last = next(e for e in second if isinstance(e, MicrographEvent))
    assert last.picks == picks
    assert service.status_snapshot().particles == {"particles": 8, "particles_small": 8}


class FailingDiskExecutor(ThreadExecutor):
    """Every job fails with an I/O error (EIO; a full disk, ENOSPC, is not a failure since
    issue 9: the service waits for space, see tests/integration/test_hardening.py)."""

    def submit(self, job: MicrographJob) -> asyncio.Future[JobResult]:
        def fail() -> JobResult:
            raise OSError(5, "Input/output error", job.output_dir)

        return asyncio.wrap_future(self._pool.submit(fail))


async def test_a_micrograph_failed_by_io_errors_is_retried_then_done_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flybox")
    config = _config(tmp_path, ctf=False)
    picks = _write(tmp_path, "m1", seed=1)
    failing = Service(
        config, executor=FailingDiskExecutor(), notifier=Notifier({}), telemetry=False
    )
    async with failing:
        events = await _collect(failing, lambda e: _count(e, FailureEvent) == 1)
    failure = next(e for e in events if isinstance(e, FailureEvent))
    assert (failure.code, failure.attempts) == ("io_error", config.executor.max_attempts)
    assert "Input/output error" in failure.reason
    assert failing.status_snapshot().counts.failed == 1
    assert caplog.text.count("trying again") == config.executor.max_attempts - 1

    service = _service(config)  # the disk has room again
    async with service:
        done = await _collect(service, lambda e: _count(e, MicrographEvent) == 1)
    event = next(e for e in done if isinstance(e, MicrographEvent))
    assert (event.version, event.picks) == (1, picks)
    assert "1 failed micrographs (worker crash, I/O or internal error) queued again" in caplog.text
    snapshot = service.status_snapshot()
    assert snapshot.particles == {"particles": picks, "particles_small": picks}
    assert snapshot.counts.failed == 0


async def test_a_wrong_pixel_size_is_a_warning_event_at_start_and_per_micrograph(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, ctf=False)
    config = config.model_copy(
        update={
            "micrograph": config.micrograph.model_copy(
                update={"pixel_size": 0.83, "picking_pixel_size": 3.32}
            )
        }
    )
    _write(tmp_path, "m1", seed=1)  # 1.0 Å in the header
    service = _service(config)
    with service.bus.subscribe() as subscription:
        async with service:
            await _collect(
                service,
                lambda e: _count(e, MicrographEvent) + _count(e, FailureEvent) == 1,
            )
        events = list(subscription._queue)
    warnings = [e for e in events if isinstance(e, WarningEvent)]
    codes = {w.code for w in warnings}
    assert {"pixel_size", "optics", "picks_outside"} <= codes, [w.message for w in warnings]
    at_start = [w for w in warnings if w.code == "pixel_size"]
    assert "MRC header" in at_start[0].message
    outside = next(w for w in warnings if w.code == "picks_outside")
    assert "picking" in outside.message
    first_micrograph = next(i for i, e in enumerate(events) if isinstance(e, MicrographEvent))
    assert events.index(at_start[0]) < first_micrograph  # said before any particle is lost
