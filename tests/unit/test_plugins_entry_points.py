"""The plugin registry with the ``[dask]`` extra installed: ``importlib_metadata`` (pulled in by
Dask) hands back entry points of its own class, which the registry must load like the standard
library's."""

from __future__ import annotations

import importlib.metadata

from flybox.plugins import registry
from flybox.processors.base import Processor
from tests.conftest import require_module

importlib_metadata = require_module("importlib_metadata")


def test_backport_entry_points_load_like_the_standard_librarys() -> None:
    for name, value in registry.BUILTIN_STEPS.items():
        backport = importlib_metadata.EntryPoint(
            name=name, value=value, group=registry.ENTRY_POINT_GROUP
        )
        standard = importlib.metadata.EntryPoint(
            name=name, value=value, group=registry.ENTRY_POINT_GROUP
        )
        for entry_point in (backport, standard):
            step = registry._load(name, entry_point)
            assert issubclass(step, Processor)
            assert step.name == name


def test_every_registered_step_loads_in_this_environment() -> None:
    registry._targets.cache_clear()
    registry._loaded.clear()
    assert registry.plugin_errors() == {}
    assert set(registry.BUILTIN_STEPS) <= set(registry.available_steps())
    assert registry.get_step("extract").name == "extract"
