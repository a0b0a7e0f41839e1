"""Rolling-window quality rules (``[[quality]]`` in the configuration; FIELD.md §14.11).

A rule such as ``when = "particles < 50"``, ``count = 20``, ``window = 25`` looks at the last
25 committed micrographs that have the figure; when 20 or more of them meet the condition the
rule fires (an :class:`~flybox.daemon.telemetry.events.AlertEvent` with ``active=True``), and when
fewer do again it clears (``active=False``). Each transition is one event, so subscribers see
an alert once, not once per micrograph.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Sequence

from flybox.config import QualityRule
from flybox.daemon.telemetry.events import AlertEvent, MicrographEvent

__all__ = ["QualityRules", "figure_value"]

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def figure_value(
    event: MicrographEvent, figure: str, main_stream: str | None = None
) -> float | None:
    """One per-micrograph figure of ``event`` (``None`` when the micrograph lacks it).

    Parameters
    ----------
    event
        A committed micrograph.
    figure
        One of :data:`flybox.config.QUALITY_FIGURES`, or ``particles.<stream>``.
    main_stream
        The stream plain ``particles`` refers to (default: the event's first stream).
    """
    quality = event.quality
    if figure.startswith("picks."):
        origin = figure.partition(".")[2]
        if not event.pick_origins:
            return None
        return float(event.pick_origins.get(origin, 0))
    if figure.startswith("particles"):
        _, _, stream = figure.partition(".")
        stream = stream or main_stream or next(iter(event.particles), "")
        count = event.particles.get(stream)
        return None if count is None else float(count)
    values: dict[str, float | None] = {
        "picks": event.picks,
        "excluded_border": event.excluded_border,
        "local_variance": quality.local_variance_mean,
        "local_variance_median": quality.local_variance_median,
        "gini": quality.gini,
        "defocus": quality.defocus_a,
        "border_fraction": quality.border_fraction_mean,
        "latency": event.latency_seconds,
        "pick_score": quality.pick_score_mean,
    }
    return values[figure]


class _RuleState:
    def __init__(self, rule: QualityRule) -> None:
        self.rule = rule
        self.compare = _OPERATORS[rule.operator]
        self.threshold = rule.threshold
        self.figure = rule.figure
        self.window: collections.deque[bool] = collections.deque(maxlen=rule.window)
        self.active = False


class QualityRules:
    """Evaluates the configured rules on each committed micrograph.

    Parameters
    ----------
    rules
        The ``[[quality]]`` rules.
    session
        Session name, for the alert events.
    main_stream
        The stream that plain ``particles`` refers to (the chain's first stream).
    """

    def __init__(
        self, rules: Sequence[QualityRule], session: str, main_stream: str | None = None
    ) -> None:
        self._states = [_RuleState(rule) for rule in rules]
        self._session = session
        self._main_stream = main_stream

    @property
    def active(self) -> list[str]:
        """Names of the rules whose alert is active now."""
        return [state.rule.name for state in self._states if state.active]

    def observe(self, event: MicrographEvent) -> list[AlertEvent]:
        """Add one micrograph to every rule's window; the alerts that fired or cleared."""
        alerts = []
        for state in self._states:
            value = figure_value(event, state.figure, self._main_stream)
            if value is None:
                continue
            state.window.append(state.compare(value, state.threshold))
            hits = sum(state.window)
            firing = hits >= state.rule.count
            if firing == state.active:
                continue
            state.active = firing
            alerts.append(self._alert(state, hits))
        return alerts

    def _alert(self, state: _RuleState, hits: int) -> AlertEvent:
        rule = state.rule
        seen = len(state.window)
        summary = (
            f"{rule.when} in {hits} of the last {seen} micrographs "
            f"(rule: {rule.count} of {rule.window})"
        )
        if state.active:
            message = f"{rule.message}: {summary}" if rule.message else summary
        else:
            message = f"cleared: {summary}"
        return AlertEvent(
            session=self._session,
            rule=rule.name,
            active=state.active,
            message=message,
            value=float(hits),
        )
