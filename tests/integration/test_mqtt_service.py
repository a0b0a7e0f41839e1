"""MQTT acceptance tests against the real service: ``python -m flybox run -c CONFIG`` fed by
the simulated microscope (:mod:`flybox.sim.microscope`), with real mosquitto brokers.

- retained status and one event per micrograph, in commit order (anonymous; password + TLS),
  and a quality-rule alert on ``PREFIX/events``;
- the last-will: after SIGKILL of the service the retained status says ``offline``;
- a broker stopped for 30 s mid-stream and restarted on the same port loses no event (a
  persistent ``mosquitto_sub`` session, de-duplicated by ``event_id``).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flybox.daemon.telemetry.events import MicrographEvent, parse_event
from tests.helpers.mqtt_broker import (
    FlyboxRun,
    Mosquitto,
    Received,
    make_tls_files,
    mqtt_settings,
    parse_sub_line,
    stop_process,
)

SESSION = "service-mqtt"
PREFIX = f"flybox/{SESSION}"


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _lines(path: Path) -> list[Received]:
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [parse_sub_line(line) for line in complete.splitlines() if line]


def _micrographs(path: Path) -> list[Received]:
    return [r for r in _lines(path) if "/micrographs/" in r.topic]


def _retained_status(broker: Mosquitto) -> Received:
    command = broker.subscriber_command(f"{PREFIX}/status", "-C", "1", "-W", "5")
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_sub_line(line.strip())


@pytest.mark.parametrize("security", ["anonymous", "password+tls"])
def test_the_service_publishes_a_retained_status_and_one_event_per_micrograph(
    tmp_path: Path, security: str
) -> None:
    users = {"flybox": "pa55-word"} if security != "anonymous" else {}
    tls = make_tls_files(tmp_path / "tls") if security != "anonymous" else None
    broker = Mosquitto(tmp_path / "broker", users=users, tls=tls)
    output = tmp_path / "subscriber.txt"
    with broker, open(output, "wb") as sink:
        subscriber = subprocess.Popen(
            broker.subscriber_command(f"{PREFIX}/#"), stdout=sink, stderr=subprocess.DEVNULL
        )
        try:
            rule = {"name": "few-particles", "when": "particles < 50", "count": 3, "window": 4}
            service = FlyboxRun(
                tmp_path / "session", SESSION, mqtt_settings(broker), extra={"quality": [rule]}
            )
            with service:
                written = service.acquisition(6, rate_per_minute=240).run()
                _wait_for(lambda: len(_micrographs(output)) >= 6, 60, "6 micrograph events")
                _wait_for(
                    lambda: _retained_status(broker).payload["counts"]["done"] == 6,
                    20,
                    "the retained status to count 6 done",
                )
                running = _retained_status(broker)
                alert_metric = service.metrics()[
                    ("flybox_alert_active", (("rule", "few-particles"),))
                ]
                assert service.stop() == 0
            stopped = _retained_status(broker)
        finally:
            stop_process(subscriber)
    events = [parse_event(r.payload) for r in _micrographs(output)]
    assert all(isinstance(event, MicrographEvent) for event in events)
    names = [event.name for event in events if isinstance(event, MicrographEvent)]
    assert sorted(names) == sorted(item.path.stem for item in written)  # one per micrograph
    assert len({event.event_id for event in events}) == 6
    times = [event.time for event in events]
    assert times == sorted(times)  # in the order the service committed them
    for message in _micrographs(output):
        assert message.topic == f"{PREFIX}/micrographs/{message.payload['name']}"
    # 30 particles per simulated micrograph: the rule fires at the third, once.
    alerts = [r.payload for r in _lines(output) if r.payload.get("type") == "alert"]
    assert [(a["rule"], a["active"]) for a in alerts] == [("few-particles", True)]
    assert all(r.topic == f"{PREFIX}/events" for r in _lines(output) if "rule" in r.payload)
    assert alert_metric == 1
    assert running.retain
    assert running.payload["state"] == "running"
    assert stopped.retain
    assert stopped.payload["state"] == "stopped"
    assert stopped.payload["counts"]["done"] == 6


def test_the_last_will_marks_the_status_offline_after_sigkill_of_the_service(
    tmp_path: Path,
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        service = FlyboxRun(tmp_path / "session", SESSION, mqtt_settings(broker))
        with service:
            _wait_for(
                lambda: _retained_status(broker).payload["state"] == "running",
                20,
                "the retained running status",
            )
            running = _retained_status(broker)
            service.stop(signal.SIGKILL)
            _wait_for(
                lambda: _retained_status(broker).payload["state"] == "offline",
                20,
                "the last-will",
            )
        offline = _retained_status(broker)
    assert running.retain
    assert offline.retain
    assert offline.payload["session"] == SESSION
    assert offline.payload["event_id"] != running.payload["event_id"]


@pytest.mark.slow
def test_a_broker_stopped_for_20_micrographs_mid_stream_loses_no_event(tmp_path: Path) -> None:
    total = 45
    broker = Mosquitto(tmp_path / "broker")
    output = tmp_path / "subscriber.txt"
    subscribe = broker.subscriber_command(f"{PREFIX}/micrographs/#", "-c", "-i", "outage-sub")
    with broker, open(output, "wb") as sink:
        subscriber = subprocess.Popen(subscribe, stdout=sink, stderr=subprocess.DEVNULL)
        try:
            mqtt = mqtt_settings(broker, reconnect_max_seconds=5)
            service = FlyboxRun(tmp_path / "session", SESSION, mqtt)
            with service:
                acquisition = service.acquisition(total, rate_per_minute=60)
                writer = threading.Thread(target=acquisition.run)
                writer.start()
                try:
                    _wait_for(lambda: len(_lines(output)) >= 5, 60, "the first events")
                    broker.stop()
                    stopped_at = len(acquisition.written)
                    # The outage lasts while 20 micrographs arrive (about 20 s at 60 per minute).
                    _wait_for(lambda: len(acquisition.written) - stopped_at >= 20, 60, "the outage")
                    during = len(acquisition.written) - stopped_at
                    broker.start()
                finally:
                    writer.join()
                _wait_for(
                    lambda: len({r.payload["event_id"] for r in _lines(output)}) >= total,
                    90,
                    f"{total} distinct events",
                )
                assert service.stop() == 0
        finally:
            stop_process(subscriber)
    assert during >= 20  # the outage really was mid-stream
    unique: dict[str, Received] = {}
    for message in _lines(output):
        unique.setdefault(message.payload["event_id"], message)
    names = [message.payload["name"] for message in unique.values()]
    assert sorted(names) == [f"mic{index:04d}" for index in range(total)]
    assert len(set(names)) == total  # exactly one event per micrograph after de-duplication
    times = [parse_event(message.payload).time for message in unique.values()]
    assert times == sorted(times)  # the outbox kept the order
    log = service.log.read_text()
    assert log.count("unreachable") == 1, log  # logged once per outage
    assert "reconnected" in log
