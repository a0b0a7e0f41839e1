"""Quarantine records: ``OUTPUT/quarantine/<input file name>.json`` (DESIGN.md §6).

A record says why an input was set aside; the input itself is never touched. The record goes
when the input is rewritten and accepted (blocking helpers; run in threads).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from flybox.io.atomic import atomic_write

__all__ = ["clear_quarantine", "quarantine_path", "write_quarantine"]


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
