"""Everything that tells the world how the session goes: MQTT, metrics, HTTP, quality alerts.

The service enters one :class:`Telemetry` for its whole lifetime::

    bus = EventBus()
    async with Telemetry(config, bus, service.status_snapshot) as telemetry:
        ...  # the service emits events on the bus
        bus.emit(StatusEvent(session=..., state="stopped", ...))

Inside, one task (``telemetry-follow-bus``, in the telemetry's own task group) follows the bus
and, for each event, updates the Prometheus metrics, the ``/api/status`` aggregate and the
quality-rule windows (whose alerts go back onto the bus), and queues the event for MQTT. The
MQTT publisher (when ``[mqtt]`` is configured) and the HTTP server are async context managers
with their own tasks. Nothing here blocks the service or raises into it because a broker or a
client misbehaves: problems are logged and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

from flybox.config import FlyboxConfig
from flybox.daemon.telemetry.dashboard import DashboardFeed
from flybox.daemon.telemetry.events import (
    AlertEvent,
    EventBus,
    MicrographEvent,
    StatusEvent,
    Subscription,
)
from flybox.daemon.telemetry.http import HttpServer
from flybox.daemon.telemetry.metrics import SessionMetrics
from flybox.daemon.telemetry.mqtt import MqttPublisher
from flybox.daemon.telemetry.quality import QualityRules
from flybox.daemon.telemetry.status import MqttSummary, StatusAggregator, StatusReport

__all__ = ["Telemetry"]

log = logging.getLogger(__name__)

#: Events the bus may hold for the telemetry task before the oldest is dropped; the task
#: only does in-memory work per event, so this is reached only if the loop is starved.
_SUBSCRIPTION_SIZE = 100_000


class Telemetry:
    """MQTT, Prometheus metrics, the HTTP API and quality rules for one service lifetime.

    Parameters
    ----------
    config
        The whole configuration (``[session]``, ``[mqtt]``, ``[http]``, ``[[quality]]``).
    bus
        The service's event bus; alerts from the quality rules are emitted on it too.
    status
        Returns the service's current status (read at scrape time, for ``/api/status``,
        and for the retained MQTT status).
    registry
        Where the metrics are registered (default: a new registry with the process, platform
        and garbage-collector collectors).
    """

    def __init__(
        self,
        config: FlyboxConfig,
        bus: EventBus,
        status: Callable[[], StatusEvent],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.session = config.session.name if config.session is not None else "flybox"
        self._bus = bus
        self._status = status
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        streams = list(config.build_chain().streams)
        self.mqtt: MqttPublisher | None = None
        self.metrics = SessionMetrics(
            registry,
            self._safe_status,
            streams=streams,
            rules=[rule.name for rule in config.quality],
            mqtt=lambda: self.mqtt,
        )
        if config.mqtt is not None:
            self.mqtt = MqttPublisher(
                config.mqtt,
                self.session,
                self._safe_status,
                on_drop=self.metrics.mqtt_dropped.inc,
                on_publish=self.metrics.mqtt_published.inc,
                on_connect=self.metrics.mqtt_reconnects.inc,
            )
        self.aggregator = StatusAggregator(self._safe_status)
        self.rules = QualityRules(config.quality, self.session, streams[0] if streams else None)
        output = config.session.output if config.session is not None else None
        self.dashboard = DashboardFeed(
            Path(output).absolute() if output is not None else None,
            streams[0] if streams else None,
        )
        self.http = HttpServer(config.http, registry, self.report, feed=self.dashboard)
        self._stack: contextlib.AsyncExitStack | None = None
        self._subscription: Subscription | None = None
        self._follower: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._last_status: StatusEvent | None = None

    def report(self) -> StatusReport:
        """The ``/api/status`` report now."""
        mqtt = None
        if self.mqtt is not None:
            mqtt = MqttSummary(
                connected=self.mqtt.connected,
                outbox_depth=self.mqtt.outbox_depth,
                dropped=self.mqtt.dropped,
            )
        return self.aggregator.report(mqtt)

    def _safe_status(self) -> StatusEvent:
        """The service's status; the last one seen on the bus if asking fails."""
        try:
            return self._status()
        except Exception:
            log.exception("reading the service status failed")
            if self._last_status is not None:
                return self._last_status
            return StatusEvent(session=self.session, state="running")

    async def __aenter__(self) -> Telemetry:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.http)
            if self.mqtt is not None:
                await stack.enter_async_context(self.mqtt)
            subscription = stack.enter_context(self._bus.subscribe(_SUBSCRIPTION_SIZE))
            self._subscription = subscription
            # Entered last, left first: the follower has finished before MQTT and HTTP close.
            self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._follower = self._tasks.create_task(
                self._follow(subscription), name="telemetry-follow-bus"
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        follower = self._follower
        try:
            if self._subscription is not None:
                self._subscription.close()  # the follower ends once the queue is drained
            if follower is not None:
                await follower
            last = self._last_status
            if self.mqtt is not None and (last is None or last.state != "stopped"):
                self.mqtt.put(self._final_status())
        finally:
            if follower is not None and not follower.done():
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            await stack.aclose()
            self._tasks = None

    def _final_status(self) -> StatusEvent:
        """The service left without publishing ``stopped``: say it for it."""
        current = self._safe_status()
        return current.model_copy(update={"state": "stopped", "event_id": uuid.uuid4().hex})

    async def _follow(self, subscription: Subscription) -> None:
        async for event in subscription:
            try:
                if isinstance(event, StatusEvent):
                    self._last_status = event
                self.metrics.observe(event)
                self.aggregator.observe(event)
                self.dashboard.observe(event)
                if self.mqtt is not None:
                    self.mqtt.put(event)
                if isinstance(event, MicrographEvent):
                    for alert in self.rules.observe(event):
                        self._alert(alert)
            except Exception:
                log.exception("publishing %s event %s failed", event.type, event.event_id)

    def _alert(self, alert: AlertEvent) -> None:
        if alert.active:
            log.warning("quality alert %s: %s", alert.rule, alert.message)
        else:
            log.info("quality alert %s cleared: %s", alert.rule, alert.message)
        self._bus.emit(alert)
