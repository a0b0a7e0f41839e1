"""Chain building and validation, the plugin registry, and running a chain on a micrograph."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from flybox.errors import ConfigError, PluginError
from flybox.pipeline.chain import Chain
from flybox.plugins import registry
from flybox.processors.base import Micrograph, ParticleProcessor, ParticleStack, StepSettings
from flybox.processors.extract import picks_frame


def test_builtin_steps_load_and_validate() -> None:
    steps = registry.available_steps()
    assert {
        "extract",
        "fourier_crop",
        "normalize",
        "invert",
        "mask",
        "dust",
        "phase_flip",
        "phase_flip_micrograph",
        "descriptors",
        "window",
    } <= set(steps)
    assert registry.plugin_errors() == {}


def test_unknown_step_is_refused_with_its_key_path() -> None:
    with pytest.raises(ConfigError, match=r"chain\[1\]\.step: plugin frobnicate: no such step"):
        Chain.from_config([{"step": "extract", "box": 64}, {"step": "frobnicate"}])


def test_bad_settings_name_the_key_path() -> None:
    with pytest.raises(ConfigError, match=r"chain\[0\]\.box"):
        Chain.from_config([{"step": "extract", "box": "large"}])
    with pytest.raises(ConfigError, match=r"chain\[1\]\.sigmaa"):
        Chain.from_config([{"step": "extract", "box": 64}, {"step": "normalize", "sigmaa": 1}])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"step": "normalize"}], "must come after extract"),
        ([{"step": "extract", "box": 64}, {"step": "dust"}], "must come before extract"),
        ([{"step": "extract", "box": 64}, {"step": "extract", "box": 32}], "exactly one extract"),
        ([{"step": "invert"}, {"step": "extract", "box": 64}], "must come after extract"),
        ([{"step": "dust"}], "no extract step"),
        ([{"box": 64}], "needs a step name"),
    ],
)
def test_step_order_is_validated(steps: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Chain.from_config(steps)


def test_radius_check_happens_when_the_chain_is_built() -> None:
    with pytest.raises(ConfigError, match=r"chain\[1\]\.bg_radius"):
        Chain.from_config([{"step": "extract", "box": 64}, {"step": "normalize", "bg_radius": 40}])


def test_streams_and_settings_description() -> None:
    steps = [
        {"step": "extract", "box": 128},
        {"step": "fourier_crop", "outputs": {"particles": 96, "particles_small": 32}},
        {"step": "normalize"},
    ]
    chain = Chain.from_config(steps)
    assert chain.streams == {"particles": 96, "particles_small": 32}
    assert chain.extraction_box == 128
    assert not chain.requires_ctf
    same = Chain.from_config([dict(s) for s in steps])
    assert same.describe() == chain.describe()
    other = Chain.from_config([*steps[:2], {"step": "normalize", "method": "background"}])
    assert other.describe() != chain.describe()
    assert Chain.from_config([{"step": "extract", "box": 64}]).streams == {"particles": 64}
    assert Chain.from_config([{"step": "extract", "box": 64}, {"step": "phase_flip"}]).requires_ctf


def test_chain_runs_every_stream_through_the_steps_after_the_fan_out() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(50, 2, size=(200, 220)).astype(np.float32)
    chain = Chain.from_config(
        [
            {"step": "extract", "box": 64},
            {"step": "fourier_crop", "outputs": {"particles": 64, "particles_small": 32}},
            {"step": "normalize"},
            {"step": "invert"},
        ]
    )
    mic = Micrograph(image, 1.0, "m.mrc", picks_frame([100.0, 2.0], [100.0, 100.0]))
    stacks, excluded = chain.particles(chain.prepare(mic))
    assert excluded == 0
    for stream, box in (("particles", 64), ("particles_small", 32)):
        images = stacks[stream].real()
        assert images.shape == (2, box, box)
        assert abs(float(images.mean())) < 0.5  # normalised, not raw 50s
    assert stacks["particles_small"].pixel_size_a == pytest.approx(2.0)


class _EchoSettings(StepSettings):
    factor: float = 1.0


class _Scale(ParticleProcessor[_EchoSettings]):
    name: ClassVar[str] = "scale"
    Settings: ClassVar[type[StepSettings]] = _EchoSettings

    def apply(self, stack: ParticleStack) -> ParticleStack:
        return stack.set_real(stack.real() * self.settings.factor)


class _Abstract(ParticleProcessor[_EchoSettings]):
    name: ClassVar[str] = "abstract"
    Settings: ClassVar[type[StepSettings]] = _EchoSettings


def test_plugin_validation_accepts_a_well_formed_step() -> None:
    assert registry.validate_step("scale", _Scale) is _Scale


@pytest.mark.parametrize(
    ("name", "obj", "message"),
    [
        ("scale", object, "not a flybox.processors.base.Processor subclass"),
        ("other", _Scale, "declares name 'scale'"),
        ("abstract", _Abstract, "abstract methods: apply"),
    ],
)
def test_plugin_validation_refuses_broken_steps(name: str, obj: object, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        registry.validate_step(name, obj)


def test_plugin_load_failure_is_reported_not_raised_on_import() -> None:
    with pytest.raises(PluginError, match="cannot be loaded: ModuleNotFoundError"):
        registry._load("ghost", "flybox_no_such_module:Step")
