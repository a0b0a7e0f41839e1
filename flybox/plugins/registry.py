"""Discovery and validation of processing steps.

Built-in steps and third-party plugins register the same way: an entry point in the group
``flybox.processors`` whose name is the step name and whose object is a
:class:`~flybox.processors.base.Processor` subclass::

    [project.entry-points."flybox.processors"]
    my_step = "my_package.module:MyStep"

Plugins are validated when they are loaded (like pluggy), not when first called: a chain that
names a step loads it while the chain is built, and a plugin that cannot be imported, or whose
class does not honour the processor contract, is refused then with a
:class:`~flybox.errors.PluginError` naming it. Steps a chain does not use are not imported
(``flybox config check`` loads and validates all of them).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Protocol

from pydantic import BaseModel

from flybox.errors import PluginError
from flybox.processors.base import (
    Extractor,
    MicrographProcessor,
    ParticleProcessor,
    Processor,
    StepSettings,
    StreamSplitter,
)

__all__ = [
    "BUILTIN_STEPS",
    "ENTRY_POINT_GROUP",
    "available_steps",
    "get_step",
    "plugin_errors",
    "validate_step",
]

ENTRY_POINT_GROUP = "flybox.processors"

#: The built-in steps (also declared as entry points in pyproject.toml; this table is the
#: fallback for a source tree that is imported without being installed).
BUILTIN_STEPS = {
    "dust": "flybox.processors.dust:DustStep",
    "phase_flip_micrograph": "flybox.processors.ctf:MicrographPhaseFlipStep",
    "descriptors": "flybox.processors.descriptors:DescriptorsStep",
    "extract": "flybox.processors.extract:ExtractStep",
    "phase_flip": "flybox.processors.ctf:PhaseFlipStep",
    "fourier_crop": "flybox.processors.fourier:FourierCropStep",
    "window": "flybox.processors.fourier:WindowStep",
    "normalize": "flybox.processors.normalize:NormalizeStep",
    "invert": "flybox.processors.normalize:InvertStep",
    "mask": "flybox.processors.mask:MaskStep",
}


class _EntryPointLike(Protocol):
    """An entry point: the standard library's, or ``importlib_metadata``'s (another class, which
    the standard library's ``entry_points`` hands back once that backport is installed, e.g. by
    Dask), told apart from a built-in ``"module:attribute"`` string by duck typing."""

    name: str
    value: str

    def load(self) -> object: ...


_KIND_BASES: dict[str, type[Processor[StepSettings]]] = {
    "micrograph": MicrographProcessor,
    "extract": Extractor,
    "particles": ParticleProcessor,
    "fanout": StreamSplitter,
}


def validate_step(name: str, obj: object) -> type[Processor[StepSettings]]:
    """Check that ``obj`` honours the processor contract for step ``name``.

    Raises
    ------
    PluginError
        Naming the plugin and what is wrong.
    """
    if not isinstance(obj, type) or not issubclass(obj, Processor):
        raise PluginError(name, f"{obj!r} is not a flybox.processors.base.Processor subclass")
    if getattr(obj, "name", None) != name:
        raise PluginError(
            name, f"class {obj.__name__} declares name {getattr(obj, 'name', None)!r}"
        )
    kind = getattr(obj, "kind", None)
    base = _KIND_BASES.get(str(kind))
    if base is None or not issubclass(obj, base):
        raise PluginError(name, f"kind {kind!r} does not match its base class")
    settings = getattr(obj, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
        raise PluginError(name, "Settings must be a pydantic model (StepSettings subclass)")
    if getattr(obj, "__abstractmethods__", None):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginError(name, f"class {obj.__name__} leaves abstract methods: {missing}")
    return obj


def _load(name: str, target: str | _EntryPointLike) -> type[Processor[StepSettings]]:
    try:
        if isinstance(target, str):
            module, _, attribute = target.partition(":")
            obj = getattr(importlib.import_module(module), attribute)
        else:
            obj = target.load()
    except Exception as exc:  # any import-time failure of a plugin is reported, not raised
        raise PluginError(name, f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return validate_step(name, obj)


@lru_cache(maxsize=1)
def _targets() -> tuple[dict[str, str | _EntryPointLike], dict[str, PluginError]]:
    """Registered step names and where they live (nothing is imported yet)."""
    targets: dict[str, str | _EntryPointLike] = dict(BUILTIN_STEPS)
    errors: dict[str, PluginError] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        builtin = BUILTIN_STEPS.get(entry_point.name)
        if builtin is not None and builtin != entry_point.value:
            errors[entry_point.name] = PluginError(
                entry_point.name, f"{entry_point.value} shadows a built-in step"
            )
            continue
        targets[entry_point.name] = entry_point
    return targets, errors


_loaded: dict[str, type[Processor[StepSettings]] | PluginError] = {}


def _get(name: str) -> type[Processor[StepSettings]] | PluginError:
    """Load and validate one step on first use (each module is imported only when needed)."""
    if name not in _loaded:
        targets, errors = _targets()
        if name in errors:
            _loaded[name] = errors[name]
        elif name in targets:
            try:
                _loaded[name] = _load(name, targets[name])
            except PluginError as exc:
                _loaded[name] = exc
        else:
            known = ", ".join(sorted(set(targets) | set(errors)))
            return PluginError(name, f"no such step (known steps: {known})")
    return _loaded[name]


def available_steps() -> dict[str, type[Processor[StepSettings]]]:
    """Every registered step that loads and validates: built-ins plus installed plugins."""
    targets, errors = _targets()
    loaded = {name: _get(name) for name in sorted(set(targets) | set(errors))}
    return {name: step for name, step in loaded.items() if not isinstance(step, PluginError)}


def plugin_errors() -> dict[str, PluginError]:
    """Registered steps that cannot be loaded or break the contract, by name."""
    targets, errors = _targets()
    loaded = {name: _get(name) for name in sorted(set(targets) | set(errors))}
    return {name: step for name, step in loaded.items() if isinstance(step, PluginError)}


def get_step(name: str) -> type[Processor[StepSettings]]:
    """The step class registered under ``name``, loaded and validated on first use.

    Raises
    ------
    PluginError
        When the step fails to load or validate, or when no step has that name.
    """
    step = _get(name)
    if isinstance(step, PluginError):
        raise step
    return step
