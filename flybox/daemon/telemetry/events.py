"""Events of a session, and the in-process bus that fans them out (DESIGN.md §2, §8).

The service emits one event per thing that happens (:meth:`EventBus.emit`); MQTT, Prometheus
metrics, the HTTP status and the log are subscribers. Payloads are pydantic models: the same
JSON goes to MQTT, and ``event_json_schema()`` documents it. Every event carries ``event_id``
(unique, for de-duplication by subscribers), ``time`` (ISO 8601, UTC) and ``session``.

Emitting never blocks: each subscriber has a bounded queue; when a slow subscriber's queue is
full, its oldest event is dropped and counted (``dropped``), the service goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "AlertEvent",
    "Backlog",
    "Counts",
    "Event",
    "EventBus",
    "ExecutorStatus",
    "FailureEvent",
    "Health",
    "MicrographEvent",
    "MissingCoordinatesEvent",
    "ModelEvent",
    "OutputSetEvent",
    "Quality",
    "QuarantineEvent",
    "Rates",
    "ServiceState",
    "StatusEvent",
    "Subscription",
    "WarningEvent",
    "event_json_schema",
    "parse_event",
    "warning_code",
]

ServiceState = Literal["starting", "running", "draining", "stopped", "offline"]


def _now() -> datetime:
    return datetime.now(UTC)


def _event_id() -> str:
    return uuid.uuid4().hex


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventBase(_Model):
    """Fields common to every event."""

    event_id: str = Field(default_factory=_event_id, description="unique id, for de-duplication")
    time: datetime = Field(default_factory=_now, description="ISO 8601, UTC")
    session: str = Field(description="session name ([session] name)")


class Counts(_Model):
    """Micrograph counts of the session."""

    seen: int = 0
    waiting: int = Field(default=0, description="complete, waiting for coordinates or CTF")
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    quarantined: int = 0


class Rates(_Model):
    """Throughput over the last hour."""

    micrographs_per_hour: float = 0.0
    particles_per_hour: float = 0.0


class Backlog(_Model):
    """Work not yet done and how long it should take."""

    micrographs: int = 0
    seconds: float = Field(default=0.0, description="estimated processing time of the backlog")
    catch_up_seconds: float | None = Field(
        default=None, description="time to clear the backlog at the current rates (None: never)"
    )


class ExecutorStatus(_Model):
    """Where the work runs: the local pool, or a Dask cluster and whether it is reachable."""

    kind: Literal["local", "dask"] = "local"
    connected: bool = Field(default=True, description="False while a Dask scheduler is lost")
    workers: int = Field(default=0, description="worker processes accepted")


class Health(_Model):
    """Whether the service makes progress: no stalled loop, room to commit."""

    ok: bool = True
    stalled: list[str] = Field(
        default_factory=list, description="loops without progress (intake, work, journal)"
    )
    disk_full: bool = Field(
        default=False, description="the output's file system is full: commits wait, then resume"
    )
    problem: str = Field(default="", description="one line: what is wrong")


class StatusEvent(EventBase):
    """``PREFIX/status`` (retained): the session at a glance."""

    type: Literal["status"] = "status"
    state: ServiceState
    counts: Counts = Counts()
    particles: dict[str, int] = Field(default_factory=dict, description="committed, per stream")
    rates: Rates = Rates()
    backlog: Backlog = Backlog()
    version: str = ""
    unmatched_patterns: list[str] = Field(
        default_factory=list, description="[watch] patterns that have matched no file yet"
    )
    executor: ExecutorStatus = ExecutorStatus()
    health: Health = Health()


class Quality(_Model):
    """Quality figures of one micrograph (None when unknown)."""

    local_variance_mean: float | None = None
    local_variance_median: float | None = None
    gini: float | None = None
    defocus_a: float | None = None
    border_fraction_mean: float | None = None
    pick_score_mean: float | None = Field(
        default=None, description="the picker model's mean score of the micrograph's picks"
    )


class MicrographEvent(EventBase):
    """``PREFIX/micrographs/<name>``: one micrograph committed."""

    type: Literal["micrograph"] = "micrograph"
    name: str = Field(description="micrograph stem (output file stem)")
    path: str
    version: int = Field(default=1, description="increases when inputs or settings change")
    picks: int
    particles: dict[str, int] = Field(description="particles written per stream")
    excluded_border: int = 0
    quality: Quality = Quality()
    latency_seconds: float = Field(description="file complete → committed")
    stages: dict[str, float] = Field(
        default_factory=dict, description="seconds per stage: wait, queue, process, commit"
    )
    pick_origins: dict[str, int] = Field(
        default_factory=dict, description="picks by origin: auto, manual, external"
    )
    model_version: int | None = Field(
        default=None, description="the picker model version of autopicked micrographs"
    )


class QuarantineEvent(EventBase):
    """An input set aside (``OUTPUT/quarantine/<name>.json`` has the same content)."""

    type: Literal["quarantine"] = "quarantine"
    path: str
    kind: Literal["micrograph", "coordinates", "ctf"]
    reason: str
    code: str | None = Field(
        default=None,
        description="short machine-readable reason, e.g. 'truncated_mrc' (metric label)",
    )


class FailureEvent(EventBase):
    """Processing of a micrograph failed (after retries, or for a reason retries cannot fix)."""

    type: Literal["failure"] = "failure"
    path: str
    reason: str
    attempts: int = 1
    code: str | None = Field(
        default=None,
        description="short machine-readable reason, e.g. 'worker_crash' (metric label)",
    )


class MissingCoordinatesEvent(EventBase):
    """A complete micrograph has waited too long for its coordinates (or CTF)."""

    type: Literal["missing_coordinates"] = "missing_coordinates"
    path: str
    waited_seconds: float
    missing: Literal["coordinates", "ctf"] = "coordinates"


class AlertEvent(EventBase):
    """A quality rule fired (``active``) or cleared."""

    type: Literal["alert"] = "alert"
    rule: str
    active: bool
    message: str
    value: float | None = None


class WarningEvent(EventBase):
    """Something that will cost particles or break the next RELION job, though nothing failed:
    a pixel size that disagrees with the header or CTF table, most picks outside a micrograph,
    an optics table RELION cannot use, a watched folder that does not exist."""

    type: Literal["warning"] = "warning"
    message: str
    code: str = Field(
        description="short machine-readable kind: pixel_size, picks_outside, optics, "
        "missing_input or other (metric label)"
    )


class OutputSetEvent(EventBase):
    """A stream's cumulative STAR file was updated."""

    type: Literal["output_set"] = "output_set"
    stream: str
    path: str
    particles: int
    micrographs: int


class ModelEvent(EventBase):
    """A new picker model version is in use (``[picking] learn``: retrained from corrections)."""

    type: Literal["model"] = "model"
    version: int
    path: str
    labels: int = Field(default=0, description="training examples of this version")
    corrected: int = Field(default=0, description="corrected micrographs it learned from")


Event = Annotated[
    StatusEvent
    | MicrographEvent
    | QuarantineEvent
    | FailureEvent
    | MissingCoordinatesEvent
    | AlertEvent
    | WarningEvent
    | OutputSetEvent
    | ModelEvent,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: str | bytes | dict[str, Any]) -> Event:
    """Validate an event from JSON text or a dict (subscribers, tests)."""
    if isinstance(data, dict):
        return _ADAPTER.validate_python(data)
    return _ADAPTER.validate_json(data)


def event_json_schema() -> dict[str, Any]:
    """JSON Schema of every event payload (published in the docs)."""
    return _ADAPTER.json_schema()


class Subscription:
    """One subscriber's bounded queue of events; iterate it with ``async for``."""

    def __init__(self, maxsize: int) -> None:
        self._queue: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def _put(self, event: Event) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    def close(self) -> None:
        """End the iteration once the queued events are consumed."""
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._queue)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()


class EventBus:
    """Fan-out of events to subscribers, without ever blocking the emitter."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def emit(self, event: Event) -> None:
        """Queue ``event`` for every current subscriber (call from the event loop)."""
        for subscription in self._subscriptions:
            subscription._put(event)

    @contextlib.contextmanager
    def subscribe(self, maxsize: int = 10_000) -> Iterator[Subscription]:
        """A subscription for the duration of the ``with`` block."""
        subscription = Subscription(maxsize)
        self._subscriptions.append(subscription)
        try:
            yield subscription
        finally:
            subscription.close()
            self._subscriptions.remove(subscription)

    def close(self) -> None:
        """End every subscription (the service is stopping)."""
        for subscription in self._subscriptions:
            subscription.close()


def warning_code(message: str) -> str:
    """The ``code`` of a warning message (what kind of trap it names)."""
    lowered = message.lower()
    for code, words in (
        ("picks_outside", ("outside the micrograph", "fall outside")),
        ("pixel_size", ("pixel size", "pixel_size")),
        ("optics", ("optics table",)),
        ("missing_input", ("does not exist", "no such", "matches nothing")),
    ):
        if any(word in lowered for word in words):
            return code
    return "other"
