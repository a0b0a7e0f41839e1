"""[picking] configuration, quality figures by pick origin, and the dashboard's event stream
over real HTTP (issue 13)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from flybox.config import parse_config
from flybox.daemon.picking import SessionFileWriter
from flybox.daemon.telemetry.events import EventBus, MicrographEvent, Quality, StatusEvent
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.quality import figure_value
from flybox.errors import ConfigError
from flybox.io.mrc import write_micrograph
from flybox.pick.store import SESSION_FILE, PickStore
from tests.helpers.mqtt_broker import free_port
from tests.helpers.tasks import no_tasks_left


def _base(tmp_path: Path) -> dict[str, object]:
    return {
        "session": {"name": "s", "output": str(tmp_path)},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }


def test_picking_section_is_validated(tmp_path: Path) -> None:
    config = parse_config({**_base(tmp_path), "picking": {"model": "/m.flypick", "learn": True}})
    assert config.picking is not None
    assert (config.picking.threshold, config.picking.learn) == (0.5, True)
    with pytest.raises(ConfigError) as error:
        parse_config({**_base(tmp_path), "picking": {"model": "/m", "threshold": 2}})
    assert error.value.key == "picking.threshold"
    with pytest.raises(ConfigError):
        parse_config({**_base(tmp_path), "picking": {"model": "/m", "size": 3}})


def test_quality_rules_know_picks_by_origin_and_the_model_score(tmp_path: Path) -> None:
    rules = [{"name": "few-auto", "when": "picks.auto < 10", "count": 1, "window": 1}]
    parse_config({**_base(tmp_path), "quality": rules})
    with pytest.raises(ConfigError):
        parse_config({**_base(tmp_path), "quality": [{**rules[0], "when": "picks.robot < 1"}]})
    event = MicrographEvent(
        session="s",
        name="m",
        path="/m.mrc",
        picks=12,
        particles={"particles": 12},
        latency_seconds=1.0,
        pick_origins={"auto": 9, "manual": 3},
        quality=Quality(pick_score_mean=0.8),
    )
    assert figure_value(event, "picks.auto") == 9
    assert figure_value(event, "picks.external") == 0
    assert figure_value(event, "pick_score") == 0.8


async def test_dashboard_page_history_and_event_stream(tmp_path: Path) -> None:
    config = parse_config(_base(tmp_path))
    bus = EventBus()

    def status() -> StatusEvent:
        return StatusEvent(session="s", state="running")

    async with Telemetry(config, bus, status) as telemetry:
        port = telemetry.http.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"retry: 2000\n\n")
        assert b"text/event-stream" in head
        while telemetry.dashboard.listeners == 0:
            await asyncio.sleep(0.01)
        bus.emit(
            MicrographEvent(
                session="s",
                name="m1",
                path="/d/m1.mrc",
                picks=5,
                particles={"particles": 5},
                latency_seconds=0.5,
            )
        )
        line = await reader.readuntil(b"\n\n")
        while b"event: micrograph" not in line:
            line = await reader.readuntil(b"\n\n")
        data = json.loads(line.split(b"data: ", 1)[1])
        assert (data["name"], data["particles"]) == ("m1", 5)
        page = await asyncio.to_thread(
            lambda: (
                __import__("urllib.request")
                .request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
                .read()
            )
        )
        assert b"dashboard.js" in page
    writer.close()
    await writer.wait_closed()
    await no_tasks_left()


async def test_picking_json_is_written_coalesced_not_once_per_commit(tmp_path: Path) -> None:
    """N micrographs joining the service's picker cost a bounded number of writes of
    ``picking.json`` (each holds every micrograph), not N; the file ends complete."""
    folder = tmp_path / "Micrographs"
    folder.mkdir()
    store = PickStore([], tmp_path / "Picks", particle_size=20, allow_empty=True)
    initial = store.session_writes
    interval, joins = 30.0, 60
    started = time.monotonic()
    async with SessionFileWriter(store, interval).running() as writer:
        for i in range(joins):
            path = folder / f"m{i:03d}.mrc"
            write_micrograph(path, np.zeros((32, 32), np.float32), 1.0)
            await asyncio.to_thread(store.add_micrograph, path, None, save=False)
            writer.changed()
            await asyncio.sleep(0)  # the writer task runs between joins
        # A user's save still writes at once (and catches up with the joins).
        await asyncio.to_thread(store.update_session, threshold=0.4)
        assert not store.dirty
        on_disk = json.loads((store.folder / SESSION_FILE).read_text())
        assert len(on_disk["micrographs"]) == joins
        path = folder / "late.mrc"
        write_micrograph(path, np.zeros((32, 32), np.float32), 1.0)
        await asyncio.to_thread(store.add_micrograph, path, None, save=False)
        writer.changed()
    elapsed = time.monotonic() - started
    writes = store.session_writes - initial
    # At most one write per interval while joining, the user's save, and the one on exit.
    assert writes <= 3 + int(elapsed // interval)
    assert writes < joins
    on_disk = json.loads((store.folder / SESSION_FILE).read_text())
    assert len(on_disk["micrographs"]) == joins + 1
    assert (on_disk["threshold"], store.dirty) == (0.4, False)
    await no_tasks_left()
