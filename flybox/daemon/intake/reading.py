"""Blocking helpers for inputs: content fingerprints, picks, CTF tables, quarantine records.

Blocking helpers that the service runs in threads. A unit of work is keyed by what its outputs
depend on (:func:`unit_key`): the micrograph's content (SHA-256 of the whole file: about
1.4 GB/s here, 45 ms for a 4096² float32 micrograph, and cached in the journal by stat
signature so that a restart does not read unchanged files again), the coordinate file's
content, the CTF values, and the settings hash. Same key ⇒ the same outputs, never computed
twice; any difference ⇒ a new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from flybox.config import FlyboxConfig
from flybox.errors import FlyboxError
from flybox.io.atomic import atomic_write
from flybox.io.coords import read_coordinates
from flybox.io.ctf import read_ctf
from flybox.pipeline.chain import Chain
from flybox.types import CtfParams

__all__ = [
    "FileChangedError",
    "TextParseError",
    "clear_quarantine",
    "ctf_text",
    "fingerprint_file",
    "quarantine_path",
    "read_ctf_table",
    "read_picks",
    "settings_description",
    "unit_key",
    "write_quarantine",
]

_CHUNK = 8 << 20


class FileChangedError(Exception):
    """The file changed while it was read; look at it again later."""


class TextParseError(Exception):
    """A settled text file does not parse (``reason`` is the one-line problem)."""

    def __init__(self, reason: str, code: str) -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


def _stat_key(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def fingerprint_file(path: str) -> str:
    """SHA-256 of a file's whole content.

    Raises
    ------
    FileChangedError
        When the file changed during the read.
    OSError
        When it cannot be read.
    """
    before = _stat_key(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if _stat_key(path) != before:
        raise FileChangedError(path)
    return "sha256:" + digest.hexdigest()


def read_picks(path: str, *, min_fom: float | None = None) -> tuple[str, pd.DataFrame]:
    """A coordinate file's content hash and its picks.

    Raises
    ------
    TextParseError
        When the file cannot be read as any supported format.
    FileChangedError
        When it changed meanwhile.
    """
    try:
        before = _stat_key(path)
        with open(path, "rb") as handle:
            digest = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        picks = read_coordinates(path, min_fom=min_fom)
        if _stat_key(path) != before:
            raise FileChangedError(path)
    except FlyboxError as exc:
        raise TextParseError(getattr(exc, "problem", str(exc)), "bad_coordinates") from exc
    except (OSError, ValueError) as exc:
        raise TextParseError(f"cannot read: {exc}", "bad_coordinates") from exc
    return digest, picks


def read_ctf_table(path: str) -> dict[str, CtfParams]:
    """The CTFs in a CTF file (RELION micrographs STAR, CTFFIND4 ``.txt``, cryoSPARC ``.cs``).

    Raises
    ------
    TextParseError
        When it cannot be parsed.
    """
    try:
        return read_ctf(path)
    except FlyboxError as exc:
        raise TextParseError(getattr(exc, "problem", str(exc)), "bad_ctf") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise TextParseError(f"cannot read: {exc}", "bad_ctf") from exc


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


def quarantine_path(output_dir: Path, path: str) -> Path:
    """``OUTPUT/quarantine/<input file name>.json``."""
    return output_dir / "quarantine" / f"{os.path.basename(path)}.json"


def write_quarantine(
    output_dir: Path, path: str, kind: str, reason: str, code: str, signature: str | None
) -> Path:
    """Write the quarantine record of an input (atomically); the input is not touched."""
    record = quarantine_path(output_dir, path)
    record.parent.mkdir(parents=True, exist_ok=True)
    content = {
        "path": path,
        "kind": kind,
        "reason": reason,
        "code": code,
        "time": datetime.now(UTC).isoformat(),
        "fingerprint": signature,
    }
    with atomic_write(record, "w") as handle:
        handle.write(json.dumps(content, indent=2) + "\n")
    return record


def clear_quarantine(output_dir: Path, path: str) -> bool:
    """Remove an input's quarantine record (it was rewritten and is fine now)."""
    record = quarantine_path(output_dir, path)
    try:
        content = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    if content.get("path") != path:
        return False
    record.unlink(missing_ok=True)
    return True
