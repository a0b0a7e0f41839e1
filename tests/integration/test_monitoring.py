"""Monitoring files: the Grafana dashboard and alert rules query metrics that exist, the
Prometheus examples are valid, a real Prometheus scrapes the service, the schemas are current.

Regenerate the JSON schemas in docs/ with ``FLYBOX_UPDATE_DOCS=1 .venv/bin/pytest
tests/test_monitoring.py -k schema``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from flybox import __version__
from flybox.config import parse_config
from flybox.daemon.telemetry.events import (
    AlertEvent,
    Counts,
    EventBus,
    FailureEvent,
    MicrographEvent,
    MissingCoordinatesEvent,
    OutputSetEvent,
    Quality,
    QuarantineEvent,
    StatusEvent,
    event_json_schema,
)
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.metrics import SessionMetrics, metric_names
from flybox.daemon.telemetry.status import StatusReport
from tests.conftest import REPO, require_binary
from tests.helpers.mqtt_broker import (
    free_port,
    prometheus_query,
    start_prometheus,
    stop_process,
    wait_for_port,
)
from tests.helpers.tasks import no_tasks_left

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "flybox.json"
S = "monitoring-test"


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def _flybox_metrics(expressions: Iterator[str]) -> set[str]:
    return {name for expr in expressions for name in re.findall(r"\bflybox_[a-z0-9_]+", expr)}


@dataclass
class _Mqtt:
    connected: bool = True
    outbox_depth: int = 0


def _fed_registry() -> CollectorRegistry:
    """A registry after one event of every kind (labelled series exist once used)."""
    registry = CollectorRegistry()
    status = StatusEvent(
        session=S, state="running", counts=Counts(done=1), particles={"particles": 10}
    )
    metrics = SessionMetrics(
        registry, lambda: status, streams=["particles"], rules=["few"], mqtt=lambda: _Mqtt()
    )
    for event in (
        MicrographEvent(
            session=S,
            name="m",
            path="/m.mrc",
            picks=12,
            particles={"particles": 10},
            excluded_border=2,
            quality=Quality(
                local_variance_mean=1.0, gini=0.3, defocus_a=1.5e4, border_fraction_mean=0.1
            ),
            latency_seconds=3.0,
            stages={"wait": 1.0, "queue": 1.0, "process": 0.5, "commit": 0.5},
        ),
        FailureEvent(session=S, path="/f.mrc", reason="worker died"),
        QuarantineEvent(session=S, path="/q.mrc", kind="micrograph", reason="truncated"),
        MissingCoordinatesEvent(session=S, path="/c.mrc", waited_seconds=100.0),
        AlertEvent(session=S, rule="few", active=True, message="few"),
        OutputSetEvent(session=S, stream="particles", path="/p.star", particles=10, micrographs=1),
    ):
        metrics.observe(event)
    return registry


def test_every_metric_the_dashboard_queries_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = _flybox_metrics(_expressions(dashboard))
    assert len(wanted) > 20
    missing = wanted - set(metric_names(_fed_registry()))
    assert not missing, f"the dashboard queries metrics that flybox does not expose: {missing}"


def test_the_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "flybox-session"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    titles = " ".join(panel["title"].lower() for panel in panels if panel["type"] == "row")
    for topic in ("throughput", "latency", "backlog", "quality", "alerts"):
        assert topic in titles
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"]


def test_the_alert_rules_query_metrics_that_exist() -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    wanted = _flybox_metrics(iter(re.findall(r"expr: (.*)", rules)))
    assert wanted
    assert not wanted - set(metric_names(_fed_registry()))


def test_prometheus_examples_pass_promtool() -> None:
    promtool = require_binary("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run(
            [promtool, *args], cwd=MONITORING, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        ("docs/events.schema.json", event_json_schema),
        ("docs/api-status.schema.json", StatusReport.model_json_schema),
    ],
)
def test_the_json_schema_in_docs_is_up_to_date(path: str, schema: Any) -> None:
    text = json.dumps(schema(), indent=2, ensure_ascii=False) + "\n"
    target = REPO / path
    if os.environ.get("FLYBOX_UPDATE_DOCS"):
        target.write_text(text)
    assert target.read_text() == text, (
        f"{path} is out of date: FLYBOX_UPDATE_DOCS=1 .venv/bin/pytest {Path(__file__).name}"
    )


async def test_a_real_prometheus_scrapes_the_service(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    http_port = free_port()
    config = parse_config(
        {
            "session": {"name": S, "output": str(tmp_path)},
            "http": {"listen": f"127.0.0.1:{http_port}"},
        }
    )
    bus = EventBus()
    status = StatusEvent(session=S, state="running", counts=Counts(done=7))
    async with Telemetry(config, bus, lambda: status):
        for index in range(7):
            bus.emit(
                MicrographEvent(
                    session=S,
                    name=f"m{index}",
                    path=f"/m{index}.mrc",
                    picks=20,
                    particles={"particles": 20},
                    latency_seconds=2.0,
                )
            )
        server, web_port = start_prometheus(prometheus, http_port, tmp_path)
        try:
            await asyncio.to_thread(wait_for_port, web_port, "127.0.0.1", 60.0)
            deadline = time.monotonic() + 90
            done: list[dict[str, Any]] = []
            while not done:
                try:
                    done = await asyncio.to_thread(
                        prometheus_query, web_port, 'flybox_micrographs_total{result="done"}'
                    )
                except OSError:
                    done = []
                if not done:
                    assert time.monotonic() < deadline, "prometheus never scraped flybox"
                    await asyncio.sleep(0.5)
            particles = await asyncio.to_thread(
                prometheus_query, web_port, "flybox_particles_total"
            )
            build = await asyncio.to_thread(prometheus_query, web_port, "flybox_build_info")
        finally:
            await asyncio.to_thread(stop_process, server)
    (sample,) = done
    assert sample["metric"]["job"] == "flybox"
    assert sample["metric"]["instance"] == f"127.0.0.1:{http_port}"
    assert float(sample["value"][1]) == 7
    by_stream = {s["metric"]["stream"]: float(s["value"][1]) for s in particles}
    assert by_stream["particles"] == 140
    assert build[0]["metric"]["version"] == __version__  # the dashboard's instance variable
    await no_tasks_left()
