"""Telemetry in a separate process (``tests/helpers/telemetry_standin.py``: ``Telemetry`` fed
by a synthetic event source) with real mosquitto brokers: the last-will after SIGKILL, the retained
``stopped`` status after a clean stop, and a short broker outage mid-stream.

The same behaviours are tested against the real ``flybox run`` in ``test_mqtt_service.py``
(with the issue's 30 s outage); these run in seconds and isolate the publishing layer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tests.conftest import REPO
from tests.helpers.mqtt_broker import (
    Mosquitto,
    Received,
    free_port,
    mqtt_settings,
    parse_sub_line,
    stop_process,
    toml_text,
)

SESSION = "accept-1"
PREFIX = f"flybox/{SESSION}"


def _write_config(tmp_path: Path, broker: Mosquitto, **mqtt: Any) -> Path:
    path = tmp_path / "flybox.toml"
    data = {
        "session": {"name": SESSION, "output": str(tmp_path / "out")},
        "mqtt": mqtt_settings(broker, **mqtt),
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }
    path.write_text(toml_text(data))
    return path


def _start_service(config: Path, *args: str, log: IO[bytes]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.telemetry_standin", str(config), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def _retained_status(broker: Mosquitto) -> Received:
    command = broker.subscriber_command(f"{PREFIX}/status", "-C", "1", "-W", "5")
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_sub_line(line.strip())


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def test_last_will_marks_the_status_offline_after_sigkill(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, open(tmp_path / "service.log", "wb") as log:
        config = _write_config(tmp_path, broker, status_seconds=0.5)
        service = _start_service(config, "--micrographs", "3", "--linger", log=log)
        try:
            _wait_for(
                lambda: _retained_status(broker).payload["counts"]["done"] == 3,
                20,
                "the retained running status",
            )
            running = _retained_status(broker)
            assert running.retain
            assert running.payload["state"] == "running"
        finally:
            stop_process(service, signal.SIGKILL)
        _wait_for(
            lambda: _retained_status(broker).payload["state"] == "offline", 20, "the last-will"
        )
        offline = _retained_status(broker)
    assert offline.retain
    assert offline.payload["session"] == SESSION
    assert offline.payload["event_id"] != running.payload["event_id"]


def test_a_clean_stop_leaves_a_retained_stopped_status(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker, open(tmp_path / "service.log", "wb") as log:
        config = _write_config(tmp_path, broker)
        service = _start_service(config, "--micrographs", "2", "--linger", log=log)
        assert service.stdout is not None
        assert service.stdout.readline().strip() == "done"
        stop_process(service, signal.SIGTERM)
        assert service.returncode == 0
        stopped = _retained_status(broker)
    assert stopped.retain
    assert stopped.payload["state"] == "stopped"
    assert stopped.payload["counts"]["done"] == 2


def _lines(path: Path) -> list[Received]:
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [parse_sub_line(line) for line in complete.splitlines() if line]


def test_a_broker_stopped_mid_stream_loses_no_event(tmp_path: Path) -> None:
    total = 60
    broker = Mosquitto(tmp_path / "broker")
    output = tmp_path / "subscriber.txt"
    subscribe = broker.subscriber_command(f"{PREFIX}/micrographs/#", "-c", "-i", "outage-sub")
    with broker, open(output, "wb") as sink, open(tmp_path / "service.log", "wb") as log:
        subscriber = subprocess.Popen(subscribe, stdout=sink, stderr=subprocess.DEVNULL)
        try:
            config = _write_config(tmp_path, broker, reconnect_max_seconds=1)
            service = _start_service(
                config, "--micrographs", str(total), "--interval", "0.1", log=log
            )
            try:
                _wait_for(lambda: len(_lines(output)) >= 5, 20, "the first events")
                broker.stop()
                time.sleep(3)
                broker.start()
                assert service.stdout is not None
                assert service.stdout.readline().strip() == "done"
                assert service.wait(timeout=60) == 0
            finally:
                stop_process(service)
            _wait_for(
                lambda: len({r.payload["event_id"] for r in _lines(output)}) >= total,
                30,
                f"{total} distinct events",
            )
        finally:
            stop_process(subscriber)
    received = _lines(output)
    unique: dict[str, Received] = {}
    for message in received:
        unique.setdefault(message.payload["event_id"], message)
    names = [message.payload["name"] for message in unique.values()]
    assert names == [f"mic{index:04d}" for index in range(total)]
    assert all(r.topic == f"{PREFIX}/micrographs/{r.payload['name']}" for r in received)
    service_log = (tmp_path / "service.log").read_text()
    assert service_log.count("unreachable") == 1, service_log  # logged once per outage
    assert "reconnected" in service_log
