"""Prometheus metrics of a session (DESIGN.md §9; the first four names are a contract).

:class:`SessionMetrics` owns the event-driven metrics (counters and histograms, updated in the
service's event loop from the event bus: worker processes never touch a registry) and a
collector computed at scrape time from the service's status (queue depth, backlog, rates) and
from the MQTT publisher (connection, outbox). The registry is passed in, so tests use a fresh
one and read values with ``registry.get_sample_value``.

Label values are bounded: streams come from the chain, stages from the service, rule names
from the configuration, and free-text reasons are reduced to short codes (at most
:data:`MAX_REASONS` distinct ones, the rest count as ``other``).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flybox import __version__
from flybox.daemon.telemetry.events import (
    AlertEvent,
    Event,
    FailureEvent,
    MicrographEvent,
    MissingCoordinatesEvent,
    ModelEvent,
    OutputSetEvent,
    QuarantineEvent,
    StatusEvent,
    WarningEvent,
)

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_REASONS",
    "MqttState",
    "SessionMetrics",
    "metric_names",
    "reason_code",
]

#: Histogram buckets (seconds) of ``flybox_latency_seconds``: file complete → committed.
LATENCY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_PARTICLE_BUCKETS = (0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)
_FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_VARIANCE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0, 10000.0)
_DEFOCUS_BUCKETS = (5e3, 7.5e3, 1e4, 1.25e4, 1.5e4, 1.75e4, 2e4, 2.5e4, 3e4, 4e4, 5e4)

#: Most distinct ``reason`` label values per metric; further reasons count as ``other``.
MAX_REASONS = 32

_RESULTS = ("done", "failed", "quarantined")
_STATES = ("starting", "running", "draining", "stopped", "offline")
_COUNTS = ("seen", "waiting", "queued", "running", "done", "failed", "quarantined")


def reason_code(code: str | None, reason: str) -> str:
    """A short label value for a failure or quarantine reason.

    The event's ``code`` when it has one, else the text before the first ``:`` (or the first
    few words), lower-cased, with runs of other characters replaced by ``_``.

    >>> reason_code(None, "truncated MRC: header says 4 MiB, file has 1 MiB")
    'truncated_mrc'
    """
    text = code if code else reason.partition(":")[0]
    words = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_").split("_")
    return "_".join(words[:4])[:40] or "other"


class MqttState(Protocol):
    """What the metrics read from the MQTT publisher at scrape time."""

    @property
    def connected(self) -> bool:
        """Whether a broker connection is up."""

    @property
    def outbox_depth(self) -> int:
        """Events waiting for the broker."""


class _ScrapeCollector(Collector):
    """Gauges computed at scrape time from the service's status and the MQTT publisher."""

    def __init__(
        self, status: Callable[[], StatusEvent], mqtt: Callable[[], MqttState | None]
    ) -> None:
        self._status = status
        self._mqtt = mqtt

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        yield GaugeMetricFamily(
            "flybox_queue_depth",
            "Micrographs queued for a worker (not yet running)",
            value=status.counts.queued,
        )
        counts = GaugeMetricFamily(
            "flybox_session_micrographs",
            "Micrographs of the session by state (from the journal)",
            labels=["state"],
        )
        for name in _COUNTS:
            counts.add_metric([name], getattr(status.counts, name))
        yield counts
        particles = GaugeMetricFamily(
            "flybox_session_particles",
            "Particles of the session committed, by stream (from the journal)",
            labels=["stream"],
        )
        for stream, count in status.particles.items():
            particles.add_metric([stream], count)
        yield particles
        state = GaugeMetricFamily(
            "flybox_state", "1 for the service's current state", labels=["state"]
        )
        for name in _STATES:
            state.add_metric([name], 1.0 if status.state == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "flybox_backlog_micrographs",
            "Micrographs not yet processed (waiting, queued, running)",
            value=status.backlog.micrographs,
        )
        yield GaugeMetricFamily(
            "flybox_backlog_seconds",
            "Estimated processing time of the backlog",
            value=status.backlog.seconds,
        )
        catch_up = status.backlog.catch_up_seconds
        if not status.backlog.micrographs:
            catch_up = 0.0
        yield GaugeMetricFamily(
            "flybox_catch_up_seconds",
            "Time to clear the backlog at the current rates (+Inf: not catching up)",
            value=float("inf") if catch_up is None else catch_up,
        )
        yield GaugeMetricFamily(
            "flybox_micrographs_per_hour",
            "Micrographs committed over the last hour",
            value=status.rates.micrographs_per_hour,
        )
        yield GaugeMetricFamily(
            "flybox_particles_per_hour",
            "Particles committed over the last hour (all streams)",
            value=status.rates.particles_per_hour,
        )
        yield GaugeMetricFamily(
            "flybox_executor_connected",
            "1 while the executor can run work (0 while a Dask scheduler is lost)",
            value=1.0 if status.executor.connected else 0.0,
        )
        yield GaugeMetricFamily(
            "flybox_executor_workers",
            "Worker processes of the executor (Dask: accepted workers)",
            value=status.executor.workers,
        )
        mqtt = self._mqtt()
        if mqtt is not None:
            yield GaugeMetricFamily(
                "flybox_mqtt_connected",
                "1 while the MQTT broker connection is up",
                value=1.0 if mqtt.connected else 0.0,
            )
            yield GaugeMetricFamily(
                "flybox_mqtt_outbox_depth",
                "Events waiting to be delivered to the MQTT broker",
                value=mqtt.outbox_depth,
            )


class _LimitedLabels:
    """Free-text label values, capped at :data:`MAX_REASONS` distinct ones."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen or len(self._seen) < MAX_REASONS:
            self._seen.add(value)
            return value
        return "other"


class SessionMetrics:
    """The service's metrics, registered in ``registry``.

    Parameters
    ----------
    registry
        Where the metrics live (a fresh :class:`~prometheus_client.CollectorRegistry` in
        tests).
    status
        The service's current status, read at scrape time.
    streams
        Output stream names (their counters start at 0).
    rules
        Quality rule names (their ``flybox_alert_active`` gauges start at 0).
    mqtt
        Returns the MQTT publisher, or ``None`` when MQTT is off (then no MQTT gauges).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        status: Callable[[], StatusEvent],
        *,
        streams: Sequence[str] = (),
        rules: Sequence[str] = (),
        mqtt: Callable[[], MqttState | None] = lambda: None,
    ) -> None:
        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(
            name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
        ) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self.micrographs = counter(
            "flybox_micrographs", "Micrographs finished, by result", ["result"]
        )
        self.particles = counter("flybox_particles", "Particles committed, by stream", ["stream"])
        self.latency = histogram(
            "flybox_latency_seconds", "File complete → outputs committed", LATENCY_BUCKETS
        )
        self.stages = histogram(
            "flybox_stage_seconds",
            "Time per stage (wait, queue, process, commit)",
            _STAGE_BUCKETS,
            ["stage"],
        )
        self.picks = counter("flybox_picks", "Picks read for committed micrographs")
        self.picks_by_origin = counter(
            "flybox_picks_by_origin", "Picks of committed micrographs, by origin", ["origin"]
        )
        self.pick_score = histogram(
            "flybox_micrograph_pick_score",
            "The picker model's mean score per autopicked micrograph",
            _FRACTION_BUCKETS,
        )
        self.pick_model_version = Gauge(
            "flybox_pick_model_version",
            "The picker model version in use ([picking]; 0: no picking)",
            registry=registry,
        )
        self.border_exclusions = counter(
            "flybox_border_exclusions", "Picks excluded because their box crosses the edge"
        )
        self.quarantined = counter(
            "flybox_quarantined", "Inputs set aside, by kind and reason", ["kind", "reason"]
        )
        self.failures = counter("flybox_failures", "Micrograph failures, by reason", ["reason"])
        self.missing = counter(
            "flybox_missing_inputs",
            "Micrographs that waited too long for coordinates or CTF",
            ["missing"],
        )
        self.alerts = counter("flybox_alerts", "Quality alerts fired, by rule", ["rule"])
        self.warnings = counter(
            "flybox_warnings",
            "Warnings about settings or inputs that cost particles (pixel size, picks outside…)",
            ["code"],
        )
        self.alert_active = Gauge(
            "flybox_alert_active",
            "1 while a quality rule's alert is active",
            ["rule"],
            registry=registry,
        )
        self.output_particles = Gauge(
            "flybox_output_particles",
            "Particles in each stream's cumulative STAR file",
            ["stream"],
            registry=registry,
        )
        self.quality_particles = histogram(
            "flybox_micrograph_particles", "Particles per micrograph", _PARTICLE_BUCKETS, ["stream"]
        )
        self.quality_gini = histogram(
            "flybox_micrograph_gini", "Gini coefficient per micrograph", _FRACTION_BUCKETS
        )
        self.quality_variance = histogram(
            "flybox_micrograph_local_variance",
            "Mean local variance per micrograph",
            _VARIANCE_BUCKETS,
        )
        self.quality_defocus = histogram(
            "flybox_micrograph_defocus_angstroms",
            "Defocus per micrograph (Å), when known",
            _DEFOCUS_BUCKETS,
        )
        self.quality_border = histogram(
            "flybox_micrograph_border_fraction",
            "Mean fraction of the box outside the micrograph, per micrograph",
            _FRACTION_BUCKETS,
        )
        self.mqtt_dropped = counter(
            "flybox_mqtt_dropped", "Events dropped from a full MQTT outbox (oldest first)"
        )
        self.mqtt_published = counter("flybox_mqtt_published", "Events delivered to the broker")
        self.mqtt_reconnects = counter(
            "flybox_mqtt_connections", "Successful connections to the MQTT broker"
        )
        build = Gauge(
            "flybox_build_info",
            "flybox version (value 1)",
            ["version", "python"],
            registry=registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._quarantine_reasons = _LimitedLabels()
        self._failure_reasons = _LimitedLabels()
        for result in _RESULTS:
            self.micrographs.labels(result)
        for stream in streams:
            self.particles.labels(stream)
        for rule in rules:
            self.alert_active.labels(rule).set(0)
            self.alerts.labels(rule)
        registry.register(_ScrapeCollector(status, mqtt))

    def observe(self, event: Event) -> None:
        """Update the metrics for one event (in the service's event loop)."""
        if isinstance(event, MicrographEvent):
            self._micrograph(event)
        elif isinstance(event, FailureEvent):
            self.micrographs.labels("failed").inc()
            self.failures.labels(self._failure_reasons(reason_code(event.code, event.reason))).inc()
        elif isinstance(event, QuarantineEvent):
            if event.kind != "ctf":  # a bad micrograph or coordinates file: one micrograph lost
                self.micrographs.labels("quarantined").inc()
            reason = self._quarantine_reasons(reason_code(event.code, event.reason))
            self.quarantined.labels(event.kind, reason).inc()
        elif isinstance(event, MissingCoordinatesEvent):
            self.missing.labels(event.missing).inc()
        elif isinstance(event, AlertEvent):
            self.alert_active.labels(event.rule).set(1 if event.active else 0)
            if event.active:
                self.alerts.labels(event.rule).inc()
        elif isinstance(event, OutputSetEvent):
            self.output_particles.labels(event.stream).set(event.particles)
        elif isinstance(event, WarningEvent):
            self.warnings.labels(event.code).inc()
        elif isinstance(event, ModelEvent):
            self.pick_model_version.set(event.version)

    def _micrograph(self, event: MicrographEvent) -> None:
        self.micrographs.labels("done").inc()
        for stream, count in event.particles.items():
            self.particles.labels(stream).inc(count)
            self.quality_particles.labels(stream).observe(count)
        self.latency.observe(max(event.latency_seconds, 0.0))
        for stage, seconds in event.stages.items():
            self.stages.labels(stage).observe(max(seconds, 0.0))
        self.picks.inc(event.picks)
        self.border_exclusions.inc(event.excluded_border)
        for origin, count in event.pick_origins.items():
            self.picks_by_origin.labels(origin).inc(count)
        quality = event.quality
        if quality.pick_score_mean is not None:
            self.pick_score.observe(quality.pick_score_mean)
        for histogram, value in (
            (self.quality_gini, quality.gini),
            (self.quality_variance, quality.local_variance_mean),
            (self.quality_defocus, quality.defocus_a),
            (self.quality_border, quality.border_fraction_mean),
        ):
            if value is not None:
                histogram.observe(value)


def metric_names(registry: CollectorRegistry) -> Iterator[str]:
    """Every sample name the registry exposes now (``flybox_latency_seconds_bucket``…)."""
    for family in registry.collect():
        for sample in family.samples:
            yield sample.name
