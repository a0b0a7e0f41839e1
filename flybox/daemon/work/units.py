"""What identifies a unit of work: the settings that shape the outputs, and the unit key.

A unit is keyed by everything its outputs depend on (:func:`unit_key`): the settings hash
(:func:`settings_hash` of :func:`settings_description`), the micrograph's content fingerprint,
the coordinate file's content hash and the CTF values. Same key ⇒ the same outputs, never
computed twice; any difference ⇒ a new version of that micrograph's unit
(:func:`resolve_units`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from flybox.config import FlyboxConfig
from flybox.daemon.work.journal import Journal, UnitRecord
from flybox.pipeline.chain import Chain
from flybox.types import CtfParams

__all__ = [
    "UnitRequest",
    "autopick_digest",
    "autopick_versions",
    "ctf_text",
    "resolve_units",
    "settings_description",
    "settings_hash",
    "unit_key",
]


def ctf_text(ctf: CtfParams | None) -> str | None:
    """The CTF values as canonical JSON (part of the unit key)."""
    if ctf is None:
        return None
    return json.dumps(dataclasses.asdict(ctf), sort_keys=True, separators=(",", ":"))


def settings_description(config: FlyboxConfig, chain: Chain) -> dict[str, Any]:
    """Everything in the configuration that shapes the outputs (hashed into every unit key;
    an output folder never mixes two of them)."""
    return {
        "chain": chain.describe(),
        "pixel_size": config.micrograph.pixel_size,
        "picking_pixel_size": config.micrograph.picking_pixel_size,
        "float16": config.output.float16,
    }


def settings_hash(description: dict[str, Any]) -> str:
    """SHA-256 of a settings description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def unit_key(settings: str, micrograph: str, coordinates: str, ctf: CtfParams | None) -> str:
    """The key of a unit of work (see the module docstring)."""
    text = json.dumps([settings, micrograph, coordinates, ctf_text(ctf)], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: What intake asks the journal for: (stem, micrograph path, unit key, the unit's inputs).
UnitRequest = tuple[str, str, str, dict[str, Any]]


def resolve_units(journal: Journal, requests: list[UnitRequest]) -> list[UnitRecord]:
    """The unit of each (stem, key): the existing one, or a new version that supersedes an
    unfinished older one (blocking; run on the journal thread)."""
    units = []
    for stem, micrograph, key, inputs in requests:
        latest = journal.latest(stem)
        if latest is not None and latest.key == key:
            units.append(latest)
            continue
        current = journal.current(stem)
        if current is not None and current.key == key:
            if latest is not None and latest.state in ("queued", "running", "failed"):
                journal.set_state(latest.id, "superseded")
            units.append(current)
            continue
        units.append(journal.add_unit(stem, micrograph, key, inputs))
    return units


def autopick_digest(version: int, model_sha: str, threshold: float, particle_size: float) -> str:
    """What stands for the coordinates' content hash in the key of an autopicked unit: the
    model version and its content, the threshold and the particle size."""
    return f"autopick:v{version}:{model_sha}:t{threshold:g}:d{particle_size:g}"


def autopick_versions(journal: Journal, stems: list[tuple[str, str]]) -> dict[str, int]:
    """The model version each (stem, micrograph fingerprint) was autopicked with, for stems
    whose newest unit was (blocking; on the journal thread): a restart, or a new model, never
    repicks a micrograph by itself ("re-pick with the current model" does)."""
    found = {}
    for stem, fingerprint in stems:
        latest = journal.latest(stem)
        if latest is None or latest.inputs.get("fingerprint") != fingerprint:
            continue
        version = latest.inputs.get("autopick_model")
        if isinstance(version, int):
            found[stem] = version
    return found
