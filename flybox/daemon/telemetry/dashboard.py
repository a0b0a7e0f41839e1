"""What the live dashboard (``/``) shows: a bounded history and a fan-out of live updates.

:class:`DashboardFeed` follows the event bus (from the telemetry task): it keeps the last
micrographs (time, particles, latency, defocus, picks by origin, model score) and status
snapshots (counts, rates, backlog) for the plots, and queues every update for each open
event stream (``/api/dashboard/events``, Server-Sent Events). A page loads the history once,
then only receives updates: no polling. Thumbnails of recent micrographs are rendered on
request in a thread (binned, low-passed) and cached; their picks are the extracted particles
of the first stream's per-micrograph STAR file, so that the page shows what was committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flybox.daemon.telemetry.events import (
    AlertEvent,
    Event,
    FailureEvent,
    MicrographEvent,
    ModelEvent,
    QuarantineEvent,
    StatusEvent,
)

__all__ = ["DashboardFeed"]

log = logging.getLogger(__name__)

#: Points kept for the plots (micrographs and status snapshots).
HISTORY = 2000
#: Micrographs whose thumbnails can be asked for.
RECENT = 200
#: Updates an event stream may hold for a slow page before the oldest are dropped.
_LISTENER_QUEUE = 1000
#: Width of a thumbnail in pixels (at most).
THUMBNAIL_WIDTH = 320

Update = tuple[str, str] | None


def _micrograph_point(event: MicrographEvent, stream: str | None) -> dict[str, Any]:
    quality = event.quality
    main = stream if stream in event.particles else next(iter(event.particles), None)
    return {
        "t": event.time.timestamp(),
        "name": event.name,
        "version": event.version,
        "picks": event.picks,
        "particles": event.particles.get(main, 0) if main else 0,
        "latency": round(event.latency_seconds, 3),
        "process": round(event.stages.get("process", 0.0), 3),
        "defocus": quality.defocus_a,
        "gini": quality.gini,
        "variance": quality.local_variance_mean,
        "score": quality.pick_score_mean,
        "origins": event.pick_origins,
        "model": event.model_version,
        "excluded": event.excluded_border,
    }


def _status_point(event: StatusEvent) -> dict[str, Any]:
    return {
        "t": event.time.timestamp(),
        "state": event.state,
        "counts": event.counts.model_dump(),
        "mph": round(event.rates.micrographs_per_hour, 2),
        "pph": round(event.rates.particles_per_hour, 1),
        "backlog": event.backlog.micrographs,
        "catch_up": event.backlog.catch_up_seconds,
        "particles": event.particles,
    }


class DashboardFeed:
    """History and live updates for the dashboard (module docstring).

    Parameters
    ----------
    output_dir
        The session's output folder (per-micrograph STAR files: the thumbnails' picks).
    stream
        The chain's first stream.
    """

    def __init__(self, output_dir: Path | None = None, stream: str | None = None) -> None:
        self.output_dir = output_dir
        self.stream = stream
        self._micrographs: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._status: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._incidents: collections.deque[dict[str, Any]] = collections.deque(maxlen=50)
        self._models: list[dict[str, Any]] = []
        self._paths: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        self._thumbnails: collections.OrderedDict[tuple[str, int], bytes] = (
            collections.OrderedDict()
        )
        self._listeners: set[asyncio.Queue[Update]] = set()
        #: Diameter of the circles drawn on thumbnails (micrograph pixels), when known.
        self.particle_diameter: float | None = None
        #: Whether the session picks (``[picking]``): the page links to the picker.
        self.picking = False

    # ----------------------------------------------------------------------------- input
    def observe(self, event: Event) -> None:
        """Take one event (from the telemetry task, in the event loop)."""
        if isinstance(event, MicrographEvent):
            point = _micrograph_point(event, self.stream)
            self._micrographs.append(point)
            self._paths[event.name] = (event.path, event.version)
            self._paths.move_to_end(event.name)
            while len(self._paths) > RECENT:
                self._paths.popitem(last=False)
            self._broadcast("micrograph", point)
        elif isinstance(event, StatusEvent):
            point = _status_point(event)
            self._status.append(point)
            self._broadcast("status", point)
        elif isinstance(event, FailureEvent | QuarantineEvent):
            incident = {
                "t": event.time.timestamp(),
                "type": event.type,
                "path": event.path,
                "reason": event.reason,
            }
            self._incidents.append(incident)
            self._broadcast("incident", incident)
        elif isinstance(event, AlertEvent):
            self._broadcast(
                "alert",
                {
                    "t": event.time.timestamp(),
                    "rule": event.rule,
                    "active": event.active,
                    "message": event.message,
                },
            )
        elif isinstance(event, ModelEvent):
            model = {"t": event.time.timestamp(), "version": event.version, "path": event.path}
            self._models.append(model)
            self._broadcast("model", model)

    def _broadcast(self, kind: str, body: dict[str, Any]) -> None:
        text = json.dumps(body, separators=(",", ":"))
        for queue in self._listeners:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((kind, text))

    # ----------------------------------------------------------------------------- output
    def history(self) -> dict[str, Any]:
        """Everything the page draws on load (JSON-ready)."""
        return {
            "micrographs": list(self._micrographs),
            "status_history": list(self._status),
            "incidents": list(self._incidents)[::-1],
            "models": list(self._models),
            "stream": self.stream,
            "particle_diameter": self.particle_diameter,
            "picking": self.picking,
        }

    @contextlib.contextmanager
    def listen(self) -> Iterator[asyncio.Queue[Update]]:
        """A queue of ``(kind, json)`` updates for one event stream (``None``: closing)."""
        queue: asyncio.Queue[Update] = asyncio.Queue(_LISTENER_QUEUE)
        self._listeners.add(queue)
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    def close_listeners(self) -> None:
        """The server is stopping: every event stream ends."""
        for queue in self._listeners:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(None)

    @property
    def listeners(self) -> int:
        """Open event streams."""
        return len(self._listeners)

    async def thumbnail(self, name: str) -> bytes:
        """PNG of a recent micrograph (``KeyError``: not a recent one)."""
        path, version = self._paths[name]
        key = (name, version)
        cached = self._thumbnails.get(key)
        if cached is None:
            cached = await asyncio.to_thread(_render_thumbnail, path)
            self._thumbnails[key] = cached
            while len(self._thumbnails) > 64:
                self._thumbnails.popitem(last=False)
        return cached

    async def picks(self, name: str) -> dict[str, Any]:
        """The committed particles of a recent micrograph (``KeyError``: not a recent one)."""
        path, version = self._paths[name]
        if self.output_dir is None or self.stream is None:
            return {"name": name, "version": version, "shape": None, "picks": []}
        return await asyncio.to_thread(
            _committed_picks, self.output_dir, self.stream, name, path, version
        )


def _render_thumbnail(path: str) -> bytes:
    from flybox.io.mrc import read_micrograph
    from flybox.pick.render import RenderSettings, render_micrograph

    image, _ = read_micrograph(path)
    binning = max(1, -(-max(image.shape) // THUMBNAIL_WIDTH))
    png, _ = render_micrograph(image, RenderSettings(binning=binning, lowpass=2.0 * binning))
    return png


def _committed_picks(
    output_dir: Path, stream: str, name: str, path: str, version: int
) -> dict[str, Any]:
    from flybox.errors import FlyboxError
    from flybox.io.mrc import read_header
    from flybox.io.star import read_relion_star
    from flybox.pipeline.layout import stream_paths

    shape = None
    with contextlib.suppress(FlyboxError, OSError):
        header = read_header(path)
        shape = [header.ny, header.nx]
    picks: list[list[Any]] = []
    star = stream_paths(output_dir, stream, name)[1]
    try:
        rows = read_relion_star(star, "particles").rows
    except (FlyboxError, OSError):
        rows = None
    if rows is not None and len(rows):
        origins = (
            rows["flyboxPickOrigin"].astype(str).tolist()
            if "flyboxPickOrigin" in rows
            else ["external"] * len(rows)
        )
        for x, y, origin in zip(
            rows["rlnCoordinateX"], rows["rlnCoordinateY"], origins, strict=True
        ):
            picks.append([round(float(x), 1), round(float(y), 1), origin])
    return {"name": name, "version": version, "shape": shape, "picks": picks}
