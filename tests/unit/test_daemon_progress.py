"""Session counters, rates and the backlog estimate, with a fake clock."""

from __future__ import annotations

import pytest

from flybox.daemon.telemetry.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_phases_are_counted_once_per_stem() -> None:
    progress = Progress("s", ["particles"], 2, clock=Clock())
    progress.set_phase("a", "waiting")
    progress.set_phase("a", "queued")
    progress.set_phase("b", "done")
    progress.set_phase("c", "failed")
    progress.set_phase("c", None)
    status = progress.snapshot("running")
    assert (status.counts.waiting, status.counts.queued, status.counts.done) == (0, 1, 1)
    assert status.counts.failed == 0
    assert status.state == "running"
    assert "1 done" in progress.line()


def test_rates_cover_the_last_hour() -> None:
    clock = Clock()
    progress = Progress("s", ["particles"], 2, clock=clock)
    clock.now += 3600
    for _ in range(10):
        progress.committed(100, 1.0)
    rates = progress.rates()
    assert rates.micrographs_per_hour == pytest.approx(10)
    assert rates.particles_per_hour == pytest.approx(1000)
    clock.now += 3601
    assert progress.rates().micrographs_per_hour == 0


def test_backlog_and_catch_up_estimates() -> None:
    clock = Clock()
    progress = Progress("s", ["particles"], 2, clock=clock)
    for stem in "abcd":
        progress.set_phase(stem, "queued")
    assert progress.backlog().catch_up_seconds is None  # no processing time known yet
    clock.now += 600
    progress.committed(10, 2.0)  # 2 s per micrograph, 2 workers: 1 micrograph/s
    backlog = progress.backlog()
    assert backlog.micrographs == 4
    assert backlog.seconds == pytest.approx(4.0)
    assert backlog.catch_up_seconds == pytest.approx(4.0)
    for _ in range(1200):  # arrivals at 2/s over the last 10 minutes outpace the workers
        progress.arrived()
    assert progress.backlog().catch_up_seconds is None
