"""The Telemetry lifetime: never blocks or raises into the service, drains, leaks nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from flybox.config import FlyboxConfig, parse_config
from flybox.daemon.telemetry.events import EventBus, MicrographEvent, StatusEvent
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.errors import ConfigError
from tests.helpers.mqtt_broker import Mosquitto, collect, free_port, mqtt_settings
from tests.helpers.tasks import no_tasks_left

S = "publish-test"


def _config(tmp_path: Path, **sections: Any) -> FlyboxConfig:
    return parse_config(
        {
            "session": {"name": S, "output": str(tmp_path)},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            **sections,
        }
    )


def _mic(index: int) -> MicrographEvent:
    return MicrographEvent(
        session=S,
        name=f"m{index}",
        path=f"/m{index}.mrc",
        picks=5,
        particles={"particles": 5},
        latency_seconds=1.0,
    )


def _running() -> StatusEvent:
    return StatusEvent(session=S, state="running")


async def test_a_missing_broker_neither_blocks_nor_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, mqtt={"port": free_port(), "flush_seconds": 1.0})
    bus = EventBus()
    started = time.monotonic()
    async with Telemetry(config, bus, _running) as publishing:
        for index in range(2000):  # synchronous: queued, never waiting on the broker
            bus.emit(_mic(index))
        await asyncio.sleep(0.5)
        done = publishing.registry.get_sample_value("flybox_micrographs_total", {"result": "done"})
        assert done == 2000
    # Leaving gives up on the missing broker after flush_seconds (1 s), not a connect timeout
    # per message (a hang would be minutes): a functional bound with a wide margin.
    assert time.monotonic() - started < 10.0
    assert sum("unreachable" in record.message for record in caplog.records) == 1
    assert "were not delivered" in caplog.text
    await no_tasks_left()


async def test_events_published_just_before_leaving_are_all_counted(tmp_path: Path) -> None:
    bus = EventBus()
    async with Telemetry(_config(tmp_path), bus, _running) as publishing:
        for index in range(500):
            bus.emit(_mic(index))
    value = publishing.registry.get_sample_value("flybox_micrographs_total", {"result": "done"})
    assert value == 500
    await no_tasks_left()


async def test_a_failing_status_callback_does_not_break_publishing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> StatusEvent:
        raise RuntimeError("journal locked")

    bus = EventBus()
    async with Telemetry(_config(tmp_path), bus, broken) as publishing:
        bus.emit(StatusEvent(session=S, state="draining"))
        await asyncio.sleep(0.05)
        assert publishing.registry.get_sample_value("flybox_state", {"state": "draining"}) == 1
        assert publishing.report().state == "draining"
    assert "reading the service status failed" in caplog.text
    await no_tasks_left()


async def test_an_exception_in_the_service_passes_through_after_cleanup(tmp_path: Path) -> None:
    bus = EventBus()
    config = _config(tmp_path)
    with pytest.raises(KeyError, match="boom"):
        async with Telemetry(config, bus, _running):
            raise KeyError("boom")
    await no_tasks_left()
    with pytest.raises(ConnectionRefusedError):  # the listener is gone
        socket.create_connection(("127.0.0.1", config.http.port), timeout=1).close()


async def test_a_busy_http_port_is_refused_at_start_without_leaks(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.http.port))
        busy.listen()
        with pytest.raises(ConfigError, match=r"^http\.listen: cannot listen on .*in use"):
            async with Telemetry(config, EventBus(), _running):
                pass
    await no_tasks_left()


async def test_leaving_publishes_a_final_stopped_status(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        config = _config(tmp_path, mqtt=mqtt_settings(broker))
        bus = EventBus()
        async with Telemetry(config, bus, _running):
            bus.emit(_mic(1))
        async with broker.client() as subscriber:
            await subscriber.subscribe(f"flybox/{S}/status", qos=1)
            (retained,) = await collect(subscriber, lambda got: len(got) >= 1)
    assert retained.retain
    assert retained.payload["state"] == "stopped"
    await no_tasks_left()


async def test_logging_names_no_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = _config(
        tmp_path,
        mqtt={"port": free_port(), "username": "u", "password": "pw-SECRET-1", "flush_seconds": 0},
        http={"listen": f"0.0.0.0:{free_port()}", "token": "tok-SECRET-2"},
    )
    async with Telemetry(config, EventBus(), _running):
        await asyncio.sleep(0.2)
    assert "SECRET" not in caplog.text
    assert "SECRET" not in str(config.model_dump())
    await no_tasks_left()
