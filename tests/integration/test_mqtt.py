"""MQTT publishing against a real mosquitto (anonymous, password, TLS with client certificate)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flybox.config import MqttConfig, parse_config
from flybox.daemon.telemetry.events import (
    AlertEvent,
    EventBus,
    FailureEvent,
    MicrographEvent,
    OutputSetEvent,
    QuarantineEvent,
    StatusEvent,
    parse_event,
)
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.mqtt import MqttPublisher, event_topic
from tests.helpers.mqtt_broker import (
    Mosquitto,
    Received,
    collect,
    free_port,
    make_tls_files,
    mqtt_settings,
)
from tests.helpers.tasks import no_tasks_left

SESSION = "krios9-test"
PREFIX = f"flybox/{SESSION}"


def _micrograph(index: int, particles: int = 120) -> MicrographEvent:
    return MicrographEvent(
        session=SESSION,
        name=f"mic{index:03d}",
        path=f"/data/mic{index:03d}.mrc",
        picks=particles + 5,
        particles={"particles": particles, "particles_small": particles},
        excluded_border=5,
        latency_seconds=3.0 + index,
        stages={"wait": 1.0, "queue": 0.5, "process": 1.2, "commit": 0.3},
    )


def _config(tmp_path: Path, mqtt: dict[str, Any] | None, **sections: Any) -> Any:
    data: dict[str, Any] = {
        "session": {"name": SESSION, "output": str(tmp_path / "out")},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        **sections,
    }
    if mqtt is not None:
        data["mqtt"] = mqtt
    return parse_config(data)


class _Status:
    """A service status that the test changes."""

    def __init__(self) -> None:
        self.current = StatusEvent(session=SESSION, state="running")

    def __call__(self) -> StatusEvent:
        return self.current


@pytest.fixture(scope="module", params=["anonymous", "password", "tls"])
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mosquitto]:
    folder = tmp_path_factory.mktemp(f"mosquitto-{request.param}")
    users = {"flybox": "s3cret-pass"} if request.param == "password" else {}
    tls = make_tls_files(folder / "tls") if request.param == "tls" else None
    with Mosquitto(folder / "broker", users=users, tls=tls) as running:
        yield running


@pytest.fixture
def anonymous_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as running:
        yield running


async def test_status_is_retained_and_each_micrograph_is_one_event_in_order(
    broker: Mosquitto, tmp_path: Path
) -> None:
    config = _config(tmp_path, mqtt_settings(broker))
    bus = EventBus()
    status = _Status()
    async with broker.client() as subscriber:
        await subscriber.subscribe(f"{PREFIX}/#", qos=1)
        async with Telemetry(config, bus, status):
            for index in range(30):
                bus.emit(_micrograph(index))
            received = await collect(
                subscriber,
                lambda got: sum("/micrographs/" in r.topic for r in got) >= 30,
            )
            async with broker.client() as late:
                await late.subscribe(f"{PREFIX}/status", qos=1)
                (retained,) = await collect(late, lambda got: len(got) >= 1)
        stopped = await collect(
            subscriber, lambda got: any(r.payload.get("state") == "stopped" for r in got)
        )
    names = [r.payload["name"] for r in received if "/micrographs/" in r.topic]
    assert names == [f"mic{index:03d}" for index in range(30)]
    for message in received:
        event = parse_event(message.payload)
        assert event.session == SESSION
        if isinstance(event, MicrographEvent):
            assert message.topic == f"{PREFIX}/micrographs/{event.name}"
    assert retained.retain
    assert retained.topic == f"{PREFIX}/status"
    assert retained.payload["state"] == "running"
    assert stopped[-1].topic == f"{PREFIX}/status"
    await no_tasks_left()


async def test_other_events_go_to_the_events_topic_and_validate(
    anonymous_broker: Mosquitto, tmp_path: Path
) -> None:
    config = _config(tmp_path, mqtt_settings(anonymous_broker, topic_prefix="site/scope1"))
    bus = EventBus()
    sent = [
        QuarantineEvent(session=SESSION, path="/d/bad.mrc", kind="micrograph", reason="truncated"),
        FailureEvent(session=SESSION, path="/d/m.mrc", reason="worker crashed", attempts=3),
        AlertEvent(session=SESSION, rule="few", active=True, message="few particles"),
        OutputSetEvent(
            session=SESSION, stream="particles", path="/o/p.star", particles=5, micrographs=1
        ),
    ]
    async with anonymous_broker.client() as subscriber:
        await subscriber.subscribe("site/scope1/events", qos=1)
        async with Telemetry(config, bus, _Status()):
            for event in sent:
                bus.emit(event)
            received = await collect(subscriber, lambda got: len(got) >= len(sent))
    assert [parse_event(r.payload) for r in received] == sent
    await no_tasks_left()


def test_topics_follow_the_contract() -> None:
    mic = _micrograph(1).model_copy(update={"name": "odd/name+#"})
    assert event_topic("p", mic) == "p/micrographs/odd_name__"
    assert event_topic("p", StatusEvent(session="s", state="running")) == "p/status"
    assert event_topic("p", AlertEvent(session="s", rule="r", active=False, message="")) == (
        "p/events"
    )


async def test_default_prefix_is_flybox_and_the_session_name() -> None:
    publisher = MqttPublisher(
        MqttConfig(), "krios1-x", lambda: StatusEvent(session="s", state="running")
    )
    assert publisher.prefix == "flybox/krios1-x"


async def test_events_wait_for_a_broker_that_is_down_and_the_oldest_are_dropped_past_the_bound(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker")
    # A persistent subscriber session, so the broker keeps what arrives while we reconnect.
    with broker:
        async with broker.client(identifier="outbox-test", clean_session=False) as subscriber:
            await subscriber.subscribe(f"{PREFIX}/micrographs/#", qos=1)
    config = _config(tmp_path, mqtt_settings(broker, outbox_limit=5, reconnect_max_seconds=0.5))
    bus = EventBus()
    async with Telemetry(config, bus, _Status()) as publishing:
        for index in range(12):
            bus.emit(_micrograph(index))
        await asyncio.sleep(0.3)
        assert publishing.mqtt is not None
        assert not publishing.mqtt.connected
        assert publishing.mqtt.dropped == 7
        assert publishing.registry.get_sample_value("flybox_mqtt_dropped_total") == 7
        assert publishing.registry.get_sample_value("flybox_mqtt_outbox_depth") == 5
        assert publishing.registry.get_sample_value("flybox_mqtt_connected") == 0
        with broker:
            async with broker.client(identifier="outbox-test", clean_session=False) as subscriber:
                received = await collect(subscriber, lambda got: len(got) >= 5)
            assert publishing.mqtt.connected
            assert publishing.registry.get_sample_value("flybox_mqtt_connected") == 1
            assert publishing.registry.get_sample_value("flybox_mqtt_outbox_depth") == 0
    assert [r.payload["name"] for r in received] == [f"mic{i:03d}" for i in range(7, 12)]
    await no_tasks_left()


async def test_a_broker_that_refuses_the_password_neither_blocks_nor_leaks_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Mosquitto(tmp_path / "broker", users={"flybox": "right-password"}) as broker:
        settings = mqtt_settings(broker, password="wrong-password-XYZ", flush_seconds=0.5)
        config = _config(tmp_path, settings)
        bus = EventBus()
        async with Telemetry(config, bus, _Status()) as publishing:
            for index in range(3):
                bus.emit(_micrograph(index))
            await asyncio.sleep(1.5)
            assert publishing.mqtt is not None
            assert not publishing.mqtt.connected
            assert publishing.mqtt.outbox_depth >= 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "MQTT" in r.message]
    assert any("unreachable" in r.message for r in warnings)
    assert sum("unreachable" in r.message for r in warnings) == 1  # once per outage
    assert all("wrong-password-XYZ" not in r.getMessage() for r in caplog.records)
    assert "wrong-password-XYZ" not in repr(config)
    await no_tasks_left()


async def test_received_payloads_are_what_was_published(
    anonymous_broker: Mosquitto, tmp_path: Path
) -> None:
    config = _config(tmp_path, mqtt_settings(anonymous_broker))
    bus = EventBus()
    event = _micrograph(7)
    async with anonymous_broker.client() as subscriber:
        await subscriber.subscribe(f"{PREFIX}/micrographs/#", qos=1)
        async with Telemetry(config, bus, _Status()):
            bus.emit(event)
            (message,) = await collect(subscriber, lambda got: len(got) >= 1)
    assert isinstance(message, Received)
    assert parse_event(message.payload) == event
    assert not message.retain
    await no_tasks_left()
