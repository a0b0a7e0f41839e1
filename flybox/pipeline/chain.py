"""A validated, ordered chain of processing steps (DESIGN.md §4).

A chain is built from the ``[[chain]]`` tables of the configuration (or from the options of
``flybox extract``): a list of mappings with a ``step`` key and the step's settings. Building
validates everything (names, settings, order, radii against the box) and raises
:class:`~flybox.errors.ConfigError` with the key path (``chain[3].bg_radius``) before any
micrograph is touched.

Order rules: micrograph steps, then exactly one ``extract``, then particle steps, at most one
fan-out step (``fourier_crop``), then particle steps that run on every stream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from flybox.errors import ConfigError, PluginError, config_errors
from flybox.plugins.registry import get_step
from flybox.processors.base import (
    MAIN_STREAM,
    Extractor,
    Micrograph,
    MicrographProcessor,
    ParticleProcessor,
    ParticleStack,
    Processor,
    StreamSplitter,
)

__all__ = ["Chain", "ChainSpec", "StepSpec"]


@dataclass(frozen=True)
class StepSpec:
    """One chain entry as plain data: a step name and its settings (not yet validated)."""

    step: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainSpec:
    """A chain as plain, picklable data: what workers receive and rebuild (once per process,
    :func:`flybox.pipeline.job.chain_for`). Two specs with the same :attr:`key` build the same
    chain; a spec made by :attr:`Chain.spec` is complete (defaults filled in) and valid.
    """

    steps: tuple[StepSpec, ...]

    @classmethod
    def of(cls, entries: Sequence[Mapping[str, Any]]) -> ChainSpec:
        """From ``[{"step": name, **settings}, …]`` (the ``[[chain]]`` tables)."""
        specs = []
        for entry in entries:
            values = dict(entry)
            specs.append(StepSpec(str(values.pop("step", "")), values))
        return cls(tuple(specs))

    def entries(self) -> list[dict[str, Any]]:
        """As ``[{"step": name, **settings}, …]``."""
        return [{"step": spec.step, **spec.settings} for spec in self.steps]

    @cached_property
    def key(self) -> str:
        """Canonical JSON of the entries: the spec's identity."""
        return json.dumps(self.entries(), sort_keys=True, separators=(",", ":"))


class Chain:
    """An ordered, validated list of processors.

    Use :meth:`from_config` to build one. A chain is cheap to keep and reuse: steps cache
    per-shape setup (masks, CTF grids), so build it once per worker and apply it to many
    micrographs.
    """

    def __init__(self, steps: Sequence[Processor[Any]]) -> None:
        self.steps = list(steps)
        self.micrograph_steps: list[MicrographProcessor[Any]] = []
        self.before_split: list[ParticleProcessor[Any]] = []
        self.after_split: list[ParticleProcessor[Any]] = []
        self.splitter: StreamSplitter[Any] | None = None
        extractor: Extractor[Any] | None = None
        for index, step in enumerate(self.steps):
            key = f"chain[{index}].step"
            if isinstance(step, MicrographProcessor):
                if extractor is not None:
                    raise ConfigError(
                        key, f"micrograph step {step.name!r} must come before extract"
                    )
                self.micrograph_steps.append(step)
            elif isinstance(step, Extractor):
                if extractor is not None:
                    raise ConfigError(key, "a chain has exactly one extract step")
                extractor = step
            elif extractor is None:
                raise ConfigError(key, f"particle step {step.name!r} must come after extract")
            elif isinstance(step, StreamSplitter):
                if self.splitter is not None:
                    raise ConfigError(key, "a chain has at most one fan-out step")
                self.splitter = step
            elif isinstance(step, ParticleProcessor):
                (self.after_split if self.splitter is not None else self.before_split).append(step)
            else:  # pragma: no cover - the registry only admits the four kinds
                raise ConfigError(key, f"step {step.name!r} has an unknown kind")
        if extractor is None:
            raise ConfigError("chain", "the chain has no extract step")
        self.extractor: Extractor[Any] = extractor
        self.before_split = _fused(self.before_split)
        self.after_split = _fused(self.after_split)
        for index, step in enumerate(self.steps):
            try:
                step.bind(extractor.box)
            except ConfigError as exc:
                raise ConfigError(
                    f"chain[{index}].{exc.key.rsplit('.', 1)[-1]}", exc.problem
                ) from exc

    @classmethod
    def from_config(cls, steps: Sequence[Mapping[str, Any]] | ChainSpec) -> Chain:
        """Build and validate a chain from ``[{"step": name, **settings}, …]`` or a spec.

        Raises
        ------
        ConfigError
            With the key path of the first problem found.
        """
        if isinstance(steps, ChainSpec):
            steps = steps.entries()
        processors: list[Processor[Any]] = []
        for index, entry in enumerate(steps):
            values = dict(entry)
            name = values.pop("step", None)
            if not isinstance(name, str):
                raise ConfigError(f"chain[{index}].step", "every chain entry needs a step name")
            try:
                step_class = get_step(name)
            except PluginError as exc:
                raise ConfigError(f"chain[{index}].step", str(exc)) from exc
            try:
                processors.append(step_class.from_mapping(values))
            except ValidationError as exc:
                raise config_errors(exc, f"chain[{index}]")[0] from exc
        return cls(processors)

    @property
    def extraction_box(self) -> int:
        """Extraction box in micrograph pixels."""
        return self.extractor.box

    @property
    def streams(self) -> dict[str, int]:
        """Output streams and their box sizes, in output order."""
        if self.splitter is None:
            return {MAIN_STREAM: self.extraction_box}
        return self.splitter.streams(self.extraction_box)

    @property
    def requires_ctf(self) -> bool:
        """Whether some step needs the micrograph's CTF (the service waits for it)."""
        return any(step.requires_ctf for step in self.steps)

    def describe(self) -> list[dict[str, Any]]:
        """The chain as plain data: ``[{"step": name, **settings}, …]`` with defaults filled."""
        return [{"step": step.name, **step.settings_dict()} for step in self.steps]

    @cached_property
    def spec(self) -> ChainSpec:
        """This chain as a complete spec (what workers receive)."""
        return ChainSpec.of(self.describe())

    def prepare(self, micrograph: Micrograph) -> Micrograph:
        """Run the micrograph steps (dust removal, whole-micrograph flip, descriptors)."""
        for step in self.micrograph_steps:
            micrograph = step.apply(micrograph)
        return micrograph

    def particles(self, micrograph: Micrograph) -> tuple[dict[str, ParticleStack], int]:
        """Extract the picks of a (prepared) micrograph and run the particle steps.

        Returns
        -------
        stacks, excluded
            One stack per output stream (in :attr:`streams` order) with real-space images,
            and the number of picks excluded at the border.
        """
        stack, excluded = self.extractor.apply(micrograph)
        for step in self.before_split:
            stack = step.apply(stack)
        stacks = {MAIN_STREAM: stack} if self.splitter is None else self.splitter.apply(stack)
        for stream, current in stacks.items():
            for step in self.after_split:
                current = step.apply(current)
            current.real()
            stacks[stream] = current
        return stacks, excluded


def _fused(steps: list[ParticleProcessor[Any]]) -> list[ParticleProcessor[Any]]:
    """Consecutive steps with the later one absorbed into the earlier where possible."""
    fused: list[ParticleProcessor[Any]] = []
    for step in steps:
        if fused and fused[-1].absorb(step):
            continue
        fused.append(step)
    return fused
