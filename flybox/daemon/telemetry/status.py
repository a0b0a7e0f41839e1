"""The session at a glance: ``/api/status`` and ``flybox status``.

:class:`StatusAggregator` follows the event bus (last micrographs, recent failures, active
alerts, output sets) and combines that with the service's own status (counts, rates, backlog)
into a :class:`StatusReport`, the JSON body of ``GET /api/status``. :func:`render_status`
prints a report for a terminal.
"""

from __future__ import annotations

import collections
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flybox.daemon.telemetry.events import (
    AlertEvent,
    Backlog,
    Counts,
    Event,
    FailureEvent,
    Health,
    MicrographEvent,
    MissingCoordinatesEvent,
    OutputSetEvent,
    Quality,
    QuarantineEvent,
    Rates,
    ServiceState,
    StatusEvent,
)
from flybox.errors import TransientIOError

__all__ = [
    "AlertSummary",
    "Incident",
    "MicrographSummary",
    "MqttSummary",
    "OutputSummary",
    "StatusAggregator",
    "StatusReport",
    "fetch_status",
    "render_status",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MicrographSummary(_Model):
    """One committed micrograph, as listed under ``last_micrographs``."""

    name: str
    time: datetime
    version: int = 1
    picks: int
    particles: dict[str, int]
    excluded_border: int = 0
    latency_seconds: float
    quality: Quality = Quality()


class Incident(_Model):
    """A failure, quarantine or missing input, as listed under ``recent_failures``."""

    time: datetime
    type: Literal["failure", "quarantine", "missing_coordinates"]
    path: str
    reason: str


class AlertSummary(_Model):
    """An active quality alert."""

    rule: str
    message: str
    since: datetime


class OutputSummary(_Model):
    """A stream's cumulative STAR file."""

    stream: str
    path: str
    particles: int
    micrographs: int


class MqttSummary(_Model):
    """The MQTT publisher's state."""

    connected: bool
    outbox_depth: int
    dropped: int


class StatusReport(_Model):
    """The body of ``GET /api/status``."""

    session: str
    state: ServiceState
    version: str = ""
    time: datetime = Field(description="when the report was made (UTC)")
    counts: Counts = Counts()
    particles: dict[str, int] = Field(default_factory=dict)
    rates: Rates = Rates()
    backlog: Backlog = Backlog()
    unmatched_patterns: list[str] = Field(
        default_factory=list, description="[watch] patterns that have matched no file yet"
    )
    last_micrographs: list[MicrographSummary] = Field(
        default_factory=list, description="newest first"
    )
    recent_failures: list[Incident] = Field(default_factory=list, description="newest first")
    alerts: list[AlertSummary] = Field(default_factory=list)
    outputs: list[OutputSummary] = Field(default_factory=list)
    mqtt: MqttSummary | None = None
    health: Health = Health()


class StatusAggregator:
    """Keeps what ``/api/status`` shows beyond the service's own status.

    Parameters
    ----------
    status
        The service's current status (counts, rates, backlog), read for each report.
    keep
        How many recent micrographs and failures to keep.
    """

    def __init__(self, status: Callable[[], StatusEvent], keep: int = 20) -> None:
        self._status = status
        self._micrographs: collections.deque[MicrographSummary] = collections.deque(maxlen=keep)
        self._incidents: collections.deque[Incident] = collections.deque(maxlen=keep)
        self._alerts: dict[str, AlertSummary] = {}
        self._outputs: dict[str, OutputSummary] = {}

    def observe(self, event: Event) -> None:
        """Take one event into account."""
        if isinstance(event, MicrographEvent):
            self._micrographs.appendleft(
                MicrographSummary(
                    name=event.name,
                    time=event.time,
                    version=event.version,
                    picks=event.picks,
                    particles=event.particles,
                    excluded_border=event.excluded_border,
                    latency_seconds=event.latency_seconds,
                    quality=event.quality,
                )
            )
        elif isinstance(event, FailureEvent | QuarantineEvent):
            self._incidents.appendleft(
                Incident(time=event.time, type=event.type, path=event.path, reason=event.reason)
            )
        elif isinstance(event, MissingCoordinatesEvent):
            reason = f"no {event.missing} after {event.waited_seconds:.0f} s"
            self._incidents.appendleft(
                Incident(time=event.time, type=event.type, path=event.path, reason=reason)
            )
        elif isinstance(event, AlertEvent):
            if event.active:
                self._alerts[event.rule] = AlertSummary(
                    rule=event.rule, message=event.message, since=event.time
                )
            else:
                self._alerts.pop(event.rule, None)
        elif isinstance(event, OutputSetEvent):
            self._outputs[event.stream] = OutputSummary(
                stream=event.stream,
                path=event.path,
                particles=event.particles,
                micrographs=event.micrographs,
            )

    def report(self, mqtt: MqttSummary | None = None) -> StatusReport:
        """The current report."""
        status = self._status()
        return StatusReport(
            session=status.session,
            state=status.state,
            version=status.version,
            time=datetime.now(UTC),
            counts=status.counts,
            particles=status.particles,
            unmatched_patterns=status.unmatched_patterns,
            rates=status.rates,
            backlog=status.backlog,
            last_micrographs=list(self._micrographs),
            recent_failures=list(self._incidents),
            alerts=list(self._alerts.values()),
            outputs=list(self._outputs.values()),
            mqtt=mqtt,
            health=status.health,
        )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never at the current rate"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M:%S")


def _quality(summary: MicrographSummary) -> str:
    # No latency when none was measured (0: e.g. committed before a restart); sub-second ones
    # with two decimals rather than "0 s".
    latency = summary.latency_seconds
    parts = [f"latency {latency:.2f} s" if latency < 1 else f"latency {_duration(latency)}"]
    parts = parts if latency > 0 else []
    if summary.excluded_border:
        parts.append(f"{summary.excluded_border} at border")
    if summary.quality.gini is not None:
        parts.append(f"gini {summary.quality.gini:.2f}")
    if summary.quality.defocus_a is not None:
        parts.append(f"defocus {summary.quality.defocus_a / 1e4:.2f} µm")
    return ", ".join(parts)


def render_status(report: StatusReport, *, width: int = 120) -> str:
    """A compact terminal rendering of ``report`` (no colours, one item per line, lines cut
    at ``width`` characters)."""
    counts = report.counts
    version = f" (flybox {report.version})" if report.version else ""
    lines = [
        f"{report.session}: {report.state}{version} at {_clock(report.time)} UTC",
        (
            f"  micrographs  {counts.done} done, {counts.failed} failed, "
            f"{counts.quarantined} quarantined; {counts.seen} seen, {counts.waiting} waiting, "
            f"{counts.queued} queued, {counts.running} running"
        ),
    ]
    if report.particles:
        streams = ", ".join(f"{name} {count}" for name, count in report.particles.items())
        lines.append(f"  particles    {streams}")
    rates = report.rates
    lines.append(
        f"  rates        {rates.micrographs_per_hour:.1f} micrographs/h, "
        f"{rates.particles_per_hour:.0f} particles/h"
    )
    backlog = report.backlog
    catch_up = _duration(backlog.catch_up_seconds) if backlog.micrographs else "-"
    lines.append(
        f"  backlog      {backlog.micrographs} micrographs, ~{_duration(backlog.seconds)} of "
        f"work, catch-up {catch_up}"
    )
    for pattern in report.unmatched_patterns:
        lines.append(f"  no file yet  {pattern}")
    if report.mqtt is not None:
        mqtt = report.mqtt
        link = "connected" if mqtt.connected else "DISCONNECTED"
        lines.append(f"  mqtt         {link}, outbox {mqtt.outbox_depth}, dropped {mqtt.dropped}")
    for alert in report.alerts:
        lines.append(f"  ALERT        {alert.rule} since {_clock(alert.since)}: {alert.message}")
    if report.last_micrographs:
        lines.append("last micrographs:")
        for mic in report.last_micrographs[:5]:
            streams = "/".join(str(count) for count in mic.particles.values())
            lines.append(f"  {_clock(mic.time)}  {mic.name}  {streams} particles  {_quality(mic)}")
    if report.recent_failures:
        lines.append("recent failures:")
        for incident in report.recent_failures[:5]:
            lines.append(
                f"  {_clock(incident.time)}  {incident.type}  {incident.path}: {incident.reason}"
            )
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in lines)


def fetch_status(url: str, token: str | None = None, timeout: float = 10.0) -> StatusReport:
    """``GET URL/api/status`` of a running service (blocking; for the ``flybox status`` CLI).

    Parameters
    ----------
    url
        The service's HTTP address, e.g. ``http://127.0.0.1:9464``.
    token
        Bearer token (``[http] token``), needed when the service requires one.
    timeout
        Seconds to wait for the answer.

    Raises
    ------
    TransientIOError
        When the service cannot be reached, refuses the request or answers something that is
        not a status report; the message is one line naming the URL.
    """
    address = url.rstrip("/") + "/api/status"
    request = urllib.request.Request(address, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            problem = "unauthorized: give --token or set FLYBOX_TOKEN"
        else:
            try:
                problem = f"HTTP {exc.code}: {json.loads(exc.read())['error']}"
            except (ValueError, KeyError, TypeError):
                problem = f"HTTP {exc.code} {exc.reason}"
        raise TransientIOError(address, problem) from None
    except urllib.error.URLError as exc:
        raise TransientIOError(address, f"cannot reach flybox ({exc.reason})") from None
    except (OSError, TimeoutError) as exc:
        raise TransientIOError(address, f"cannot reach flybox ({exc})") from None
    try:
        return StatusReport.model_validate_json(body)
    except ValidationError:
        raise TransientIOError(address, "the answer is not a flybox status report") from None
