"""Rolling-window quality rules: configuration, firing and clearing, alerts on the bus."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flybox.config import QualityRule, parse_config
from flybox.daemon.telemetry.events import (
    AlertEvent,
    EventBus,
    MicrographEvent,
    Quality,
    StatusEvent,
)
from flybox.daemon.telemetry.fanout import Telemetry
from flybox.daemon.telemetry.quality import QualityRules, figure_value
from flybox.errors import ConfigError
from tests.helpers.mqtt_broker import free_port
from tests.helpers.tasks import no_tasks_left

S = "quality-test"


def _mic(particles: int, small: int | None = None, **quality: float) -> MicrographEvent:
    streams = {"particles": particles}
    if small is not None:
        streams["particles_small"] = small
    return MicrographEvent(
        session=S,
        name="m",
        path="/m.mrc",
        picks=particles,
        particles=streams,
        quality=Quality(**quality),
        latency_seconds=5.0,
    )


def _rule(when: str, count: int, window: int, **extra: str) -> QualityRule:
    return QualityRule(name="rule", when=when, count=count, window=window, **extra)


def test_a_rule_fires_at_count_of_window_and_clears_when_fewer() -> None:
    rules = QualityRules([_rule("particles < 50", 3, 5)], S)
    fired = []
    for particles in [10, 100, 10, 100]:  # 2 of 4 low
        fired += rules.observe(_mic(particles))
    assert fired == []
    (alert,) = rules.observe(_mic(10))  # 3 of the last 5
    assert alert.active
    assert alert.rule == "rule"
    assert alert.value == 3
    assert alert.message == "particles < 50 in 3 of the last 5 micrographs (rule: 3 of 5)"
    assert rules.active == ["rule"]
    assert rules.observe(_mic(10)) == []  # [100, 10, 100, 10, 10]: still active, no repeat
    assert rules.observe(_mic(100)) == []  # [10, 100, 10, 10, 100]: 3 of 5
    (cleared,) = rules.observe(_mic(100))  # [100, 10, 10, 100, 100]: 2 of 5
    assert not cleared.active
    assert cleared.message.startswith("cleared: ")
    assert rules.active == []


def test_micrographs_without_the_figure_are_not_counted() -> None:
    rules = QualityRules([_rule("defocus > 30000", 2, 3)], S)
    assert rules.observe(_mic(10, defocus_a=40000.0)) == []
    assert rules.observe(_mic(10)) == []  # no defocus: skipped, not a pass
    (alert,) = rules.observe(_mic(10, defocus_a=35000.0))
    assert alert.active


@pytest.mark.parametrize(
    ("figure", "expected"),
    [
        ("particles", 40.0),
        ("particles.particles_small", 20.0),
        ("particles.unknown", None),
        ("picks", 40.0),
        ("gini", 0.5),
        ("local_variance", None),
        ("latency", 5.0),
        ("excluded_border", 0.0),
    ],
)
def test_figures(figure: str, expected: float | None) -> None:
    assert figure_value(_mic(40, 20, gini=0.5), figure) == expected


def test_a_message_from_the_configuration_leads_the_alert() -> None:
    rules = QualityRules([_rule("gini >= 0.9", 1, 1, message="ice looks bad")], S)
    (alert,) = rules.observe(_mic(5, gini=0.95))
    assert alert.message.startswith("ice looks bad: gini >= 0.9 in 1 of the last 1")


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"name": "a", "when": "particles << 5", "count": 1, "window": 2}, "quality[0].when"),
        ({"name": "a", "when": "thickness < 5", "count": 1, "window": 2}, "quality[0].when"),
        ({"name": "a", "when": "particles < 5", "count": 3, "window": 2}, "quality[0]"),
        ({"name": "a b", "when": "particles < 5", "count": 1, "window": 2}, "quality[0].name"),
    ],
)
def test_bad_rules_are_refused_with_their_key(rule: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"quality": [rule]})
    assert caught.value.key == key


def test_rule_names_must_be_unique() -> None:
    rule = {"name": "a", "when": "particles < 5", "count": 1, "window": 2}
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({"quality": [rule, rule]})


async def test_alerts_go_onto_the_bus_and_set_the_metric(tmp_path: Path) -> None:
    config = parse_config(
        {
            "session": {"name": S, "output": str(tmp_path)},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "quality": [
                {"name": "few-particles", "when": "particles < 50", "count": 20, "window": 25}
            ],
        }
    )
    bus = EventBus()
    alerts: list[AlertEvent] = []
    with bus.subscribe() as watcher:

        async def watch() -> None:
            async for event in watcher:
                if isinstance(event, AlertEvent):
                    alerts.append(event)

        async with asyncio.TaskGroup() as group:
            group.create_task(watch())
            async with Telemetry(
                config, bus, lambda: StatusEvent(session=S, state="running")
            ) as publishing:
                value = publishing.registry.get_sample_value
                assert value("flybox_alert_active", {"rule": "few-particles"}) == 0
                for _ in range(20):
                    bus.emit(_mic(30))
                await asyncio.sleep(0.05)
                assert value("flybox_alert_active", {"rule": "few-particles"}) == 1
                report = publishing.report()
                assert [alert.rule for alert in report.alerts] == ["few-particles"]
                for _ in range(6):
                    bus.emit(_mic(300))
                await asyncio.sleep(0.05)
                assert value("flybox_alert_active", {"rule": "few-particles"}) == 0
                assert value("flybox_alerts_total", {"rule": "few-particles"}) == 1
                assert publishing.report().alerts == []
            watcher.close()
    assert [alert.active for alert in alerts] == [True, False]
    await no_tasks_left()
