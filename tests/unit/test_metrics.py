"""Prometheus metrics from events, with a fresh registry per test (read by get_sample_value)."""

from __future__ import annotations

import platform
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from flybox import __version__
from flybox.daemon.telemetry.events import (
    AlertEvent,
    Backlog,
    Counts,
    FailureEvent,
    MicrographEvent,
    MissingCoordinatesEvent,
    OutputSetEvent,
    Quality,
    QuarantineEvent,
    Rates,
    StatusEvent,
)
from flybox.daemon.telemetry.metrics import MAX_REASONS, SessionMetrics, metric_names, reason_code

S = "metrics-test"


@dataclass
class _Mqtt:
    connected: bool = True
    outbox_depth: int = 3


def _status() -> StatusEvent:
    return StatusEvent(
        session=S,
        state="running",
        counts=Counts(seen=20, waiting=2, queued=4, running=2, done=10, failed=1, quarantined=1),
        rates=Rates(micrographs_per_hour=120.0, particles_per_hour=36000.0),
        backlog=Backlog(micrographs=8, seconds=40.0, catch_up_seconds=None),
    )


def _micrograph(particles: int, **quality: float) -> MicrographEvent:
    return MicrographEvent(
        session=S,
        name="m",
        path="/m.mrc",
        picks=particles + 3,
        particles={"particles": particles, "particles_small": particles},
        excluded_border=3,
        quality=Quality(**quality),
        latency_seconds=12.0,
        stages={"wait": 2.0, "queue": 4.0, "process": 5.5, "commit": 0.5},
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_micrograph_events_update_the_contract_metrics(registry: CollectorRegistry) -> None:
    metrics = SessionMetrics(registry, _status, streams=["particles", "particles_small"])
    value = registry.get_sample_value
    assert value("flybox_micrographs_total", {"result": "done"}) == 0
    assert value("flybox_particles_total", {"stream": "particles_small"}) == 0
    metrics.observe(_micrograph(100, gini=0.25, defocus_a=12000.0))
    metrics.observe(_micrograph(40))
    assert value("flybox_micrographs_total", {"result": "done"}) == 2
    assert value("flybox_particles_total", {"stream": "particles"}) == 140
    assert value("flybox_particles_total", {"stream": "particles_small"}) == 140
    assert value("flybox_latency_seconds_count") == 2
    assert value("flybox_latency_seconds_sum") == 24.0
    assert value("flybox_latency_seconds_bucket", {"le": "10.0"}) == 0
    assert value("flybox_latency_seconds_bucket", {"le": "20.0"}) == 2
    assert value("flybox_stage_seconds_sum", {"stage": "process"}) == 11.0
    assert value("flybox_picks_total") == 146
    assert value("flybox_border_exclusions_total") == 6
    assert value("flybox_micrograph_particles_bucket", {"stream": "particles", "le": "50.0"}) == 1
    assert value("flybox_micrograph_gini_count") == 1  # only micrographs that have it
    assert value("flybox_micrograph_defocus_angstroms_sum") == 12000.0
    build = {"version": __version__, "python": platform.python_version()}
    assert value("flybox_build_info", build) == 1


def test_failures_quarantines_alerts_and_outputs(registry: CollectorRegistry) -> None:
    metrics = SessionMetrics(registry, _status, rules=["few-particles"])
    value = registry.get_sample_value
    assert value("flybox_alert_active", {"rule": "few-particles"}) == 0
    metrics.observe(FailureEvent(session=S, path="/a.mrc", reason="worker died: signal 9"))
    metrics.observe(
        QuarantineEvent(session=S, path="/b.mrc", kind="micrograph", reason="truncated MRC: x")
    )
    metrics.observe(
        QuarantineEvent(
            session=S, path="/b.star", kind="coordinates", reason="whatever", code="bad_star"
        )
    )
    metrics.observe(MissingCoordinatesEvent(session=S, path="/c.mrc", waited_seconds=600))
    metrics.observe(AlertEvent(session=S, rule="few-particles", active=True, message="few"))
    metrics.observe(
        OutputSetEvent(session=S, stream="particles", path="/p.star", particles=900, micrographs=3)
    )
    assert value("flybox_micrographs_total", {"result": "failed"}) == 1
    assert value("flybox_micrographs_total", {"result": "quarantined"}) == 2
    assert value("flybox_failures_total", {"reason": "worker_died"}) == 1
    assert value("flybox_quarantined_total", {"kind": "micrograph", "reason": "truncated_mrc"}) == 1
    assert value("flybox_quarantined_total", {"kind": "coordinates", "reason": "bad_star"}) == 1
    assert value("flybox_missing_inputs_total", {"missing": "coordinates"}) == 1
    assert value("flybox_alert_active", {"rule": "few-particles"}) == 1
    assert value("flybox_alerts_total", {"rule": "few-particles"}) == 1
    assert value("flybox_output_particles", {"stream": "particles"}) == 900
    metrics.observe(AlertEvent(session=S, rule="few-particles", active=False, message="ok"))
    assert value("flybox_alert_active", {"rule": "few-particles"}) == 0
    assert value("flybox_alerts_total", {"rule": "few-particles"}) == 1


def test_gauges_are_read_from_the_status_at_scrape_time(registry: CollectorRegistry) -> None:
    current = [_status()]
    SessionMetrics(registry, lambda: current[0], mqtt=lambda: _Mqtt())
    value = registry.get_sample_value
    assert value("flybox_queue_depth") == 4
    assert value("flybox_backlog_micrographs") == 8
    assert value("flybox_backlog_seconds") == 40
    assert value("flybox_catch_up_seconds") == float("inf")
    assert value("flybox_micrographs_per_hour") == 120
    assert value("flybox_session_micrographs", {"state": "waiting"}) == 2
    assert value("flybox_state", {"state": "running"}) == 1
    assert value("flybox_state", {"state": "draining"}) == 0
    assert value("flybox_mqtt_connected") == 1
    assert value("flybox_mqtt_outbox_depth") == 3
    current[0] = current[0].model_copy(
        update={"state": "draining", "counts": Counts(queued=1), "backlog": Backlog(seconds=2.0)}
    )
    assert value("flybox_queue_depth") == 1
    assert value("flybox_state", {"state": "draining"}) == 1
    assert value("flybox_backlog_seconds") == 2


def test_without_mqtt_there_are_no_mqtt_gauges(registry: CollectorRegistry) -> None:
    SessionMetrics(registry, _status)
    names = set(metric_names(registry))
    assert "flybox_queue_depth" in names
    assert "flybox_mqtt_connected" not in names


def test_reason_labels_are_short_codes_and_bounded(registry: CollectorRegistry) -> None:
    assert reason_code(None, "truncated MRC: header says 4 MiB") == "truncated_mrc"
    assert reason_code("Bad-Star", "ignored") == "bad_star"
    assert reason_code(None, "!!!") == "other"
    metrics = SessionMetrics(registry, _status)
    for index in range(MAX_REASONS + 10):
        metrics.observe(FailureEvent(session=S, path="/x", reason=f"reason {index}: details"))
    labels = {
        sample.labels["reason"]
        for family in registry.collect()
        if family.name == "flybox_failures"
        for sample in family.samples
        if sample.name == "flybox_failures_total"
    }
    assert len(labels) == MAX_REASONS + 1
    assert registry.get_sample_value("flybox_failures_total", {"reason": "other"}) == 10
