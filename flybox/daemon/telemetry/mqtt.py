"""MQTT publishing of session events (DESIGN.md §8), with aiomqtt 2.5.

Topics under the prefix (``[mqtt] topic_prefix``, default ``flybox/<session name>``):

- ``PREFIX/status``: :class:`~flybox.daemon.telemetry.events.StatusEvent`, retained; the
  last-will is a retained status with state ``offline`` and the counts of the last
  (re)connection. The broker fixes a will at connection time, so when the counts change the
  publisher reconnects (a clean disconnect discards the old will) with a fresh one, at most
  once per ``status_seconds`` and always once the service is idle: after a SIGKILL the
  retained ``offline`` status carries the last counts, not those of the first connection;
- ``PREFIX/micrographs/<name>``: one :class:`~flybox.daemon.telemetry.events.MicrographEvent` per
  committed micrograph;
- ``PREFIX/events``: quarantines, failures, missing inputs, quality alerts, output sets.

Every message is QoS 1. :meth:`MqttPublisher.put` never blocks: events wait in a bounded
outbox (``[mqtt] outbox_limit``) while the broker is away and are delivered in order after
the reconnection; only past the bound is the oldest event dropped (counted and logged). Only
the newest status waits, since each status replaces the previous one. Delivery is at least
once: an event whose acknowledgement was lost is sent again, and subscribers de-duplicate by
``event_id``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import aiomqtt

from flybox.config import MqttConfig
from flybox.daemon.telemetry.events import Event, MicrographEvent, StatusEvent

__all__ = ["MqttPublisher", "event_topic"]

log = logging.getLogger(__name__)

_FIRST_RETRY_SECONDS = 0.5
_KEEPALIVE_SECONDS = 30
_TIMEOUT_SECONDS = 10.0
_NO_TOPIC = str.maketrans({"/": "_", "+": "_", "#": "_"})


def event_topic(prefix: str, event: Event) -> str:
    """The topic an event is published on (DESIGN.md §8)."""
    if isinstance(event, StatusEvent):
        return f"{prefix}/status"
    if isinstance(event, MicrographEvent):
        return f"{prefix}/micrographs/{event.name.translate(_NO_TOPIC)}"
    return f"{prefix}/events"


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: str
    retain: bool


class MqttPublisher:
    """Delivers events to the broker; an async context manager owning its tasks.

    Parameters
    ----------
    config
        The ``[mqtt]`` section.
    session
        Session name (default topic prefix ``flybox/<session>``).
    status
        The service's current status: published on every (re)connection, refreshed every
        ``status_seconds`` when it changed, and the base of the ``offline`` last-will.
    on_drop, on_publish, on_connect
        Called (in the event loop) for each dropped event, each delivered event and each
        successful connection; the metrics count them.
    """

    def __init__(
        self,
        config: MqttConfig,
        session: str,
        status: Callable[[], StatusEvent],
        *,
        on_drop: Callable[[], None] = lambda: None,
        on_publish: Callable[[], None] = lambda: None,
        on_connect: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self.prefix = (config.topic_prefix or f"flybox/{session}").rstrip("/")
        self._status = status
        self._on_drop = on_drop
        self._on_publish = on_publish
        self._on_connect = on_connect
        self._outbox: collections.deque[_Message] = collections.deque()
        self._status_message: _Message | None = None
        self._in_flight: _Message | None = None
        self._last_status_content: str | None = None
        #: The counts in the broker's last-will, and when that connection was made.
        self._will_counts: str | None = None
        self._connected_at = 0.0
        self._refreshing = False
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._connection: asyncio.Task[None] | None = None
        self._connected = False
        self._outage_since: float | None = None
        self._dropped_in_outage = 0
        self.dropped = 0
        self.published = 0

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected

    @property
    def outbox_depth(self) -> int:
        """Events not yet acknowledged by the broker."""
        pending = (self._status_message is not None) + (self._in_flight is not None)
        return len(self._outbox) + pending

    def put(self, event: Event) -> None:
        """Queue ``event`` for the broker; never blocks, never raises for broker trouble."""
        message = _Message(
            event_topic(self.prefix, event),
            event.model_dump_json(),
            retain=isinstance(event, StatusEvent),
        )
        if isinstance(event, StatusEvent):
            self._status_message = message
            self._last_status_content = _status_content(event)
        else:
            if len(self._outbox) >= self._config.outbox_limit:
                self._outbox.popleft()
                self._drop()
            self._outbox.append(message)
        self._wakeup.set()

    def _drop(self) -> None:
        self.dropped += 1
        self._dropped_in_outage += 1
        self._on_drop()
        if self._dropped_in_outage == 1:
            log.warning(
                "MQTT outbox full (%d events): dropping the oldest (flybox_mqtt_dropped_total)",
                self._config.outbox_limit,
            )

    async def __aenter__(self) -> MqttPublisher:
        async with contextlib.AsyncExitStack() as stack:
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._connection = tasks.create_task(self._run(), name="mqtt-connection")
            tasks.create_task(self._refresh_status(), name="mqtt-status-refresh")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(self._config.flush_seconds)

    async def close(self, flush_seconds: float) -> None:
        """Deliver what is queued (waiting at most ``flush_seconds``), then disconnect."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._closing.set()
        self._wakeup.set()
        connection = self._connection
        try:
            if connection is not None:
                await asyncio.wait({connection}, timeout=flush_seconds)
        finally:
            if connection is not None and not connection.done():
                connection.cancel()
            await stack.aclose()
        if self.outbox_depth:
            log.warning("MQTT: %d events were not delivered before stopping", self.outbox_depth)

    async def _refresh_status(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._config.status_seconds)
            if self._closing.is_set():
                return
            try:
                status = self._status()
            except Exception:
                log.exception("MQTT: reading the service status failed")
                continue
            if _status_content(status) != self._last_status_content:
                self.put(status)

    def _client(self) -> aiomqtt.Client:
        config = self._config
        tls = None
        if config.tls_ca is not None or config.tls_cert is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=None if config.tls_ca is None else str(config.tls_ca),
                certfile=None if config.tls_cert is None else str(config.tls_cert),
                keyfile=None if config.tls_key is None else str(config.tls_key),
            )
        password = None if config.password is None else config.password.get_secret_value()
        current = self._status()
        offline = current.model_copy(update={"state": "offline", "event_id": uuid.uuid4().hex})
        self._will_counts = _counts(current)
        if self._refreshing:
            log.debug(
                "MQTT: reconnecting with a last-will of the current counts (%d done, %d failed, "
                "%d quarantined)",
                current.counts.done,
                current.counts.failed,
                current.counts.quarantined,
            )
        return aiomqtt.Client(
            config.host,
            config.port,
            username=config.username,
            password=password,
            identifier=f"flybox-{uuid.uuid4().hex[:12]}",
            will=aiomqtt.Will(
                f"{self.prefix}/status", offline.model_dump_json(), qos=1, retain=True
            ),
            keepalive=_KEEPALIVE_SECONDS,
            timeout=_TIMEOUT_SECONDS,
            tls_params=tls,
            logger=log.getChild("client"),
        )

    async def _run(self) -> None:
        delay = _FIRST_RETRY_SECONDS
        while not self._closing.is_set():
            try:
                async with self._client() as client:
                    self._connected_now()
                    delay = _FIRST_RETRY_SECONDS
                    async with asyncio.TaskGroup() as group:
                        watcher = group.create_task(self._watch(client), name="mqtt-watch")
                        refresh = await self._drain(client)
                        watcher.cancel()
                if not refresh:
                    return
                self._refreshing = True  # a clean disconnect: the old will is discarded
                continue
            except* Exception as problem:
                self._disconnected_now(problem)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._config.reconnect_max_seconds)

    def _connected_now(self) -> None:
        self._connected = True
        self._connected_at = time.monotonic()
        self._on_connect()
        where = f"{self._config.host}:{self._config.port}"
        if self._refreshing:
            self._refreshing = False
        elif self._outage_since is None:
            log.info("MQTT connected to %s, publishing under %s/", where, self.prefix)
        else:
            log.info(
                "MQTT reconnected to %s after %.0f s; delivering %d queued events",
                where,
                time.monotonic() - self._outage_since,
                self.outbox_depth,
            )
            if self._dropped_in_outage:
                log.warning(
                    "MQTT: %d events were dropped during the outage (outbox limit %d)",
                    self._dropped_in_outage,
                    self._config.outbox_limit,
                )
        self._outage_since = None
        self._dropped_in_outage = 0
        if self._closing.is_set():  # the final status is already queued
            return
        try:
            self.put(self._status())
        except Exception:
            log.exception("MQTT: reading the service status failed")

    def _disconnected_now(self, problem: BaseExceptionGroup[Exception]) -> None:
        self._connected = False
        if self._outage_since is not None:
            log.debug("MQTT still unreachable: %s", _describe(problem))
            return
        self._outage_since = time.monotonic()
        log.warning(
            "MQTT broker %s:%d unreachable (%s); keeping events (at most %d) and retrying",
            self._config.host,
            self._config.port,
            _describe(problem),
            self._config.outbox_limit,
        )

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raise :class:`aiomqtt.MqttError` as soon as the connection drops."""
        async for _ in client.messages:
            pass

    def _next(self) -> _Message | None:
        if self._in_flight is None:
            if self._status_message is not None:
                self._in_flight, self._status_message = self._status_message, None
            elif self._outbox:
                self._in_flight = self._outbox.popleft()
        return self._in_flight

    def _will_stale(self) -> bool:
        try:
            return _counts(self._status()) != self._will_counts
        except Exception:
            return False

    async def _drain(self, client: aiomqtt.Client) -> bool:
        """Deliver queued messages in order; return ``False`` once closing with nothing
        left, ``True`` when the last-will should be refreshed (nothing is left to send, the
        counts changed since the connection, and that was at least ``status_seconds`` ago)."""
        while True:
            message = self._next()
            if message is None:
                if self._closing.is_set():
                    return False
                self._wakeup.clear()
                if self._will_stale():
                    due = self._connected_at + self._config.status_seconds - time.monotonic()
                    if due <= 0:
                        return True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due):
                            await self._wakeup.wait()
                    continue
                await self._wakeup.wait()
                continue
            await client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            self._in_flight = None
            self.published += 1
            self._on_publish()


def _status_content(status: StatusEvent) -> str:
    """A status without its identity, to tell whether anything changed."""
    return status.model_dump_json(exclude={"event_id", "time"})


def _counts(status: StatusEvent) -> str:
    """What the last-will must carry up to date: the micrograph and particle counts."""
    return status.counts.model_dump_json() + repr(sorted(status.particles.items()))


def _describe(problem: BaseException) -> str:
    if isinstance(problem, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in problem.exceptions)
    return str(problem) or type(problem).__name__
