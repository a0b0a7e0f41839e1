"""The separately installed example plugin (examples/flybox-plugin-example): discovered
through the entry-point group, validated, and run in a chain."""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np
import pandas as pd
import pytest

from flybox.errors import ConfigError
from flybox.pipeline.chain import Chain
from flybox.plugins.registry import ENTRY_POINT_GROUP, available_steps, get_step, plugin_errors
from flybox.processors.base import Micrograph
from tests.conftest import missing_component


def _require_plugin() -> None:
    names = {e.name for e in entry_points(group=ENTRY_POINT_GROUP)}
    if "clip" not in names:
        missing_component(
            "the example plugin is not installed (pip install -e examples/flybox-plugin-example)"
        )


def test_the_example_step_is_found_through_its_entry_point() -> None:
    _require_plugin()
    step = get_step("clip")
    assert step.__module__ == "flybox_plugin_example"
    assert step.kind == "particles"
    assert "clip" in available_steps()
    assert "clip" not in plugin_errors()


def test_built_in_steps_are_registered_as_entry_points_too() -> None:
    names = {e.name for e in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"extract", "fourier_crop", "normalize", "invert", "mask", "dust"} <= names


def _boxes(steps: list[dict[str, object]]) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((128, 128)).astype(np.float32)
    image[64, 64] = 100.0  # an outlier inside the box
    picks = pd.DataFrame({"rlnCoordinateX": [64.0, 40.0], "rlnCoordinateY": [64.0, 50.0]})
    chain = Chain.from_config(steps)
    stacks, excluded = chain.particles(chain.prepare(Micrograph(image, 1.0, "m", picks)))
    assert excluded == 0
    return stacks["particles"].real()


def test_the_example_step_runs_in_a_chain() -> None:
    _require_plugin()
    raw = _boxes([{"step": "extract", "box": 32}]).astype(np.float64)
    clipped = _boxes([{"step": "extract", "box": 32}, {"step": "clip", "sigma": 1.0}])
    assert clipped.dtype == np.float32
    mean = raw.mean(axis=(1, 2), keepdims=True)
    std = raw.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(clipped, np.clip(raw, mean - std, mean + std), rtol=1e-5, atol=1e-5)
    assert clipped.max() < 100.0


def test_settings_of_the_plugin_are_validated_when_the_chain_is_built() -> None:
    _require_plugin()
    with pytest.raises(ConfigError) as caught:
        Chain.from_config([{"step": "extract", "box": 32}, {"step": "clip", "sigma": -1}])
    assert caught.value.key == "chain[1].sigma"
