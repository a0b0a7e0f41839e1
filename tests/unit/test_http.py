"""The HTTP server over real sockets: /metrics, /api/status, /healthz, and the bearer token."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flybox.config import FlyboxConfig, parse_config
from flybox.daemon.telemetry.events import (
    Counts,
    EventBus,
    FailureEvent,
    MicrographEvent,
    Quality,
    StatusEvent,
)
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.status import StatusReport
from tests.helpers.mqtt_broker import free_port
from tests.helpers.tasks import no_tasks_left

S = "http-test"


def _config(tmp_path: Path, host: str = "127.0.0.1", **http: Any) -> FlyboxConfig:
    return parse_config(
        {
            "session": {"name": S, "output": str(tmp_path)},
            "http": {"listen": f"{host}:{free_port()}", **http},
        }
    )


def _status() -> StatusEvent:
    return StatusEvent(session=S, state="running", counts=Counts(seen=3, done=2, queued=1))


async def _get(
    port: int, path: str, *, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    def request() -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()

    return await asyncio.to_thread(request)


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def test_metrics_scraped_over_http_match_the_events(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bus = EventBus()
    events = [
        MicrographEvent(
            session=S,
            name=f"m{index}",
            path=f"/d/m{index}.mrc",
            picks=60 + index,
            particles={"particles": 50 + index, "particles_small": 50 + index},
            excluded_border=index,
            quality=Quality(gini=0.2, defocus_a=15000.0),
            latency_seconds=4.0,
        )
        for index in range(5)
    ]
    async with Telemetry(config, bus, _status) as publishing:
        for event in events:
            bus.emit(event)
        bus.emit(FailureEvent(session=S, path="/d/bad.mrc", reason="worker died"))
        await asyncio.sleep(0.05)
        status, headers, body = await _get(publishing.http.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = _samples(body)
    assert samples[("flybox_micrographs_total", (("result", "done"),))] == 5
    assert samples[("flybox_micrographs_total", (("result", "failed"),))] == 1
    expected = sum(event.particles["particles"] for event in events)
    assert samples[("flybox_particles_total", (("stream", "particles"),))] == expected
    assert samples[("flybox_latency_seconds_count", ())] == 5
    assert samples[("flybox_border_exclusions_total", ())] == sum(range(5))
    assert samples[("flybox_queue_depth", ())] == 1
    assert ("process_resident_memory_bytes", ()) in samples
    await no_tasks_left()


async def test_api_status_reports_the_session(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bus = EventBus()
    async with Telemetry(config, bus, _status) as publishing:
        bus.emit(
            MicrographEvent(
                session=S,
                name="m7",
                path="/m7.mrc",
                picks=9,
                particles={"particles": 9},
                latency_seconds=1.5,
            )
        )
        bus.emit(FailureEvent(session=S, path="/d/bad.mrc", reason="worker died"))
        await asyncio.sleep(0.05)
        status, headers, body = await _get(publishing.http.port, "/api/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    report = StatusReport.model_validate_json(body)
    assert report.session == S
    assert report.state == "running"
    assert report.counts.done == 2
    assert [mic.name for mic in report.last_micrographs] == ["m7"]
    assert report.recent_failures[0].path == "/d/bad.mrc"
    assert report.mqtt is None
    await no_tasks_left()


async def test_health_head_unknown_paths_and_methods(tmp_path: Path) -> None:
    async with Telemetry(_config(tmp_path), EventBus(), _status) as publishing:
        port = publishing.http.port
        assert (await _get(port, "/healthz"))[::2] == (200, b"ok\n")
        status, headers, body = await _get(port, "/metrics", method="HEAD")
        assert (status, body) == (200, b"")
        assert int(headers["Content-Length"]) > 100
        assert (await _get(port, "/nope"))[0] == 404
        assert (await _get(port, "/api/nope"))[0] == 404
        status, headers, _ = await _get(port, "/metrics", method="POST")
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"garbage\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 400 ")
    await no_tasks_left()


async def test_a_non_loopback_listener_requires_the_bearer_token_for_the_api(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, host="0.0.0.0", token="t0ken-value")
    assert not config.http.is_loopback
    async with Telemetry(config, EventBus(), _status) as publishing:
        port = publishing.http.port
        status, headers, body = await _get(port, "/api/status")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body) == {"error": "a bearer token is required"}
        assert (await _get(port, "/api/status", token="wrong"))[0] == 401
        status, _, body = await _get(port, "/api/status", token="t0ken-value")
        assert status == 200
        assert StatusReport.model_validate_json(body).session == S
        # Prometheus scrapes and health checks stay open.
        assert (await _get(port, "/metrics"))[0] == 200
        assert (await _get(port, "/healthz"))[0] == 200
    await no_tasks_left()


async def test_a_non_loopback_listener_without_a_token_refuses_the_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, host="0.0.0.0")
    async with Telemetry(config, EventBus(), _status) as publishing:
        status, _, body = await _get(publishing.http.port, "/api/status")
    assert status == 403
    assert "set [http] token" in json.loads(body)["error"]
    assert "token is not set" in caplog.text
    await no_tasks_left()


async def test_a_configured_token_is_required_on_loopback_too(tmp_path: Path) -> None:
    config = _config(tmp_path, token="abc")
    async with Telemetry(config, EventBus(), _status) as publishing:
        assert (await _get(publishing.http.port, "/api/status"))[0] == 401
        assert (await _get(publishing.http.port, "/api/status", token="abc"))[0] == 200
    await no_tasks_left()


async def test_open_connections_do_not_keep_the_server_alive(tmp_path: Path) -> None:
    async with Telemetry(_config(tmp_path), EventBus(), _status) as publishing:
        _, idle = await asyncio.open_connection("127.0.0.1", publishing.http.port)
        await asyncio.sleep(0.05)
    idle.close()
    await no_tasks_left()
