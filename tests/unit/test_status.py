"""The status aggregate, its terminal rendering and ``flybox status``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flybox.cli import main
from flybox.config import parse_config
from flybox.daemon.telemetry.events import (
    AlertEvent,
    Backlog,
    Counts,
    EventBus,
    FailureEvent,
    MicrographEvent,
    MissingCoordinatesEvent,
    OutputSetEvent,
    Quality,
    QuarantineEvent,
    Rates,
    StatusEvent,
)
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.status import MqttSummary, StatusAggregator, render_status
from tests.helpers.mqtt_broker import free_port
from tests.helpers.tasks import no_tasks_left

S = "status-test"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main()`` installs a handler on the captured stderr; take it away afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def _status() -> StatusEvent:
    return StatusEvent(
        session=S,
        state="running",
        counts=Counts(seen=12, waiting=1, queued=2, running=1, done=7, failed=1),
        particles={"particles": 2100, "particles_small": 2100},
        rates=Rates(micrographs_per_hour=84.0, particles_per_hour=25200.0),
        backlog=Backlog(micrographs=4, seconds=20.0, catch_up_seconds=170.0),
        version="0.1.0",
    )


def _mic(index: int) -> MicrographEvent:
    return MicrographEvent(
        session=S,
        time=T0,
        name=f"mic{index:03d}",
        path=f"/d/mic{index:03d}.mrc",
        picks=310,
        particles={"particles": 300, "particles_small": 300},
        excluded_border=10,
        quality=Quality(gini=0.31, defocus_a=15200.0),
        latency_seconds=4.2,
    )


def test_the_aggregate_keeps_the_newest_micrographs_failures_alerts_and_outputs() -> None:
    aggregator = StatusAggregator(_status, keep=3)
    for index in range(5):
        aggregator.observe(_mic(index))
    aggregator.observe(FailureEvent(session=S, path="/d/a.mrc", reason="worker died"))
    aggregator.observe(
        QuarantineEvent(session=S, path="/d/b.mrc", kind="micrograph", reason="truncated")
    )
    aggregator.observe(MissingCoordinatesEvent(session=S, path="/d/c.mrc", waited_seconds=600))
    aggregator.observe(AlertEvent(session=S, rule="few", active=True, message="few particles"))
    aggregator.observe(AlertEvent(session=S, rule="gone", active=True, message="x"))
    aggregator.observe(AlertEvent(session=S, rule="gone", active=False, message="x"))
    aggregator.observe(
        OutputSetEvent(session=S, stream="particles", path="/o/p.star", particles=9, micrographs=3)
    )
    report = aggregator.report(MqttSummary(connected=False, outbox_depth=12, dropped=0))
    assert [mic.name for mic in report.last_micrographs] == ["mic004", "mic003", "mic002"]
    assert [incident.type for incident in report.recent_failures] == [
        "missing_coordinates",
        "quarantine",
        "failure",
    ]
    assert report.recent_failures[0].reason == "no coordinates after 600 s"
    assert [alert.rule for alert in report.alerts] == ["few"]
    assert report.outputs[0].particles == 9
    assert report.counts.done == 7
    assert report.backlog.catch_up_seconds == 170.0


def test_rendering_is_compact_and_readable() -> None:
    aggregator = StatusAggregator(_status)
    aggregator.observe(_mic(1))
    aggregator.observe(
        FailureEvent(session=S, time=T0, path="/d/a.mrc", reason="worker died: signal 9")
    )
    aggregator.observe(AlertEvent(session=S, time=T0, rule="few", active=True, message="low"))
    text = render_status(aggregator.report(MqttSummary(connected=True, outbox_depth=0, dropped=2)))
    lines = text.splitlines()
    assert lines[0].startswith("status-test: running (flybox 0.1.0) at ")
    assert "7 done, 1 failed, 0 quarantined; 12 seen, 1 waiting, 2 queued, 1 running" in text
    assert "particles    particles 2100, particles_small 2100" in text
    assert "84.0 micrographs/h, 25200 particles/h" in text
    assert "4 micrographs, ~20 s of work, catch-up 3 min" in text
    assert "mqtt         connected, outbox 0, dropped 2" in text
    assert "ALERT        few since 10:00:00: low" in text
    assert "10:00:00  mic001  300/300 particles  latency 4 s, 10 at border, gini 0.31" in text
    assert "defocus 1.52 µm" in text
    assert "10:00:00  failure  /d/a.mrc: worker died: signal 9" in text
    assert all(len(line) <= 120 for line in lines)


async def test_flybox_status_prints_the_running_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    config = parse_config(
        {
            "session": {"name": S, "output": str(tmp_path)},
            "http": {"listen": f"127.0.0.1:{port}", "token": "tok"},
        }
    )
    bus = EventBus()
    url = f"http://127.0.0.1:{port}"
    async with Telemetry(config, bus, _status):
        bus.emit(_mic(3))
        await asyncio.sleep(0.05)
        code = await asyncio.to_thread(main, ["status", "--url", url, "--token", "tok"])
        assert code == 0
        out = capsys.readouterr().out
        assert out.startswith("status-test: running")
        assert "mic003" in out
        monkeypatch.setenv("FLYBOX_TOKEN", "tok")
        assert await asyncio.to_thread(main, ["status", "--url", url, "--json"]) == 0
        assert '"session": "status-test"' in capsys.readouterr().out
        monkeypatch.delenv("FLYBOX_TOKEN")
        assert await asyncio.to_thread(main, ["status", "--url", url]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            f"error: {url}/api/status: unauthorized: give --token or set FLYBOX_TOKEN"
        ]
    await no_tasks_left()


def test_flybox_status_says_in_one_line_when_nothing_answers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: {url}/api/status: cannot reach flybox (")


def test_status_names_patterns_without_files_and_no_unmeasured_latency() -> None:
    from flybox.daemon.intake.watch import compile_pattern
    from flybox.pipeline.matching import PatternMatches

    patterns = [
        compile_pattern("micrograph", "/d/MotionCorr/**/*.mrc"),
        compile_pattern("coordinates", "/d/AutoPick/*_autopick.star"),
    ]
    matched = PatternMatches(patterns)
    matched.see(["/d/MotionCorr/job002/Movies/a.mrc"], {})
    assert matched.unmatched == ["/d/AutoPick/*_autopick.star"]

    def status() -> StatusEvent:
        return _status().model_copy(update={"unmatched_patterns": matched.unmatched})

    aggregator = StatusAggregator(status)
    aggregator.observe(_mic(1).model_copy(update={"latency_seconds": 0.0}))
    aggregator.observe(_mic(2).model_copy(update={"latency_seconds": 0.18}))
    text = render_status(aggregator.report())
    assert "no file yet  /d/AutoPick/*_autopick.star" in text
    assert "MotionCorr" not in text
    assert "latency 0 s" not in text
    assert "mic001  300/300 particles  10 at border" in text
    assert "mic002  300/300 particles  latency 0.18 s" in text
    matched.see(["/d/AutoPick/a_autopick.star"])
    assert matched.unmatched == []
