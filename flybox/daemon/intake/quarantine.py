"""Quarantine records: ``OUTPUT/quarantine/<input file name>.json`` (DESIGN.md §6), and the
checks of input *names* done before anything else.

A record says why an input was set aside; the input itself is never touched. The record goes
when the input is rewritten and accepted (blocking helpers; run in threads).

Record names: ``<file name>.json``; a second input with the same file name in another folder
(``a/dup.mrc``, ``b/dup.mrc``) gets ``<file name>.<hash>.json`` (the hash is of its whole
path), and so does a name that is not printable UTF-8 (control characters become ``_``) or is
so long that the record's temporary name would not fit the file system's 255-byte limit (the
name is shortened). The record's ``path`` field always holds the input's full path.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

from flybox.io.atomic import atomic_write

__all__ = [
    "MAX_NAME_BYTES",
    "clear_quarantine",
    "name_problem",
    "quarantine_path",
    "shown",
    "write_quarantine",
]

#: The longest input file name (bytes) whose outputs still fit NAME_MAX (255) with their
#: temporary names (``.<stem>.mrcs.<12 hex>.tmp``: 23 bytes more than the stem).
MAX_NAME_BYTES = 200
#: Record names are shortened to this many bytes before ``.<hash>.json``.
_RECORD_NAME_BYTES = 160
_lock = threading.Lock()

_CONTROL_NAMES = {"\n": "newline", "\r": "carriage return", "\t": "tab", "\x7f": "delete"}


def shown(path: str) -> str:
    """A path as it may appear in one log line: control characters and bytes that are not
    UTF-8 escaped (``\\n``, ``\\xff``), everything else as it is."""
    raw = os.fsencode(path).decode("utf-8", "backslashreplace")
    if raw.isprintable():
        return raw
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in raw)


def name_problem(path: str) -> str | None:
    """Why an input's *name* cannot be used (``None`` when it can).

    RELION's STAR files cannot carry a name with a newline or other control characters
    (C0, DEL, C1; ``Could not find closing quote``), nor bytes that are not UTF-8; a name
    longer than :data:`MAX_NAME_BYTES` bytes leaves no room for the outputs' temporary names.
    """
    name = os.path.basename(path)
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return "file name is not valid UTF-8 (RELION's STAR files cannot carry it)"
    for char in path:
        if unicodedata.category(char) == "Cc":
            what = _CONTROL_NAMES.get(char, f"control character U+{ord(char):04X}")
            return f"file name contains a {what} (RELION's STAR files cannot carry it)"
    size = len(os.fsencode(name))
    if size > MAX_NAME_BYTES:
        return (
            f"file name is {size} bytes long: at most {MAX_NAME_BYTES} leave room for the "
            "outputs' names (the file system allows 255)"
        )
    return None


def _digest(path: str) -> str:
    return hashlib.sha256(os.fsencode(path)).hexdigest()[:12]


def _record_names(path: str) -> tuple[str, str]:
    """(plain name, hashed name) of an input's record; the plain one is ``""`` when the file
    name cannot be used as is."""
    name = os.path.basename(path)
    safe = "".join(c if c.isprintable() else "_" for c in shown(name)).replace("/", "_")
    hashed = os.fsencode(safe)[:_RECORD_NAME_BYTES].decode("utf-8", "ignore")
    hashed = f"{hashed}.{_digest(path)}.json"
    if safe != name or len(os.fsencode(name)) > _RECORD_NAME_BYTES:
        return "", hashed
    return f"{name}.json", hashed


def _record_path(record: Path) -> str | None:
    try:
        content = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    value = content.get("path") if isinstance(content, dict) else None
    return value if isinstance(value, str) else None


def quarantine_path(output_dir: Path, path: str) -> Path:
    """The record of ``path``: ``OUTPUT/quarantine/<file name>.json`` unless another input
    with that file name has it, else ``<file name>.<hash>.json`` (module docstring)."""
    folder = output_dir / "quarantine"
    plain, hashed = _record_names(path)
    if (folder / hashed).exists() or not plain:
        return folder / hashed
    holder = _record_path(folder / plain)
    if holder is None or holder == _text(path):
        return folder / plain
    return folder / hashed


def _text(path: str) -> str:
    """The path as it is stored in a record (surrogate escapes become ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write_quarantine(
    output_dir: Path, path: str, kind: str, reason: str, code: str, signature: str | None
) -> Path:
    """Write the quarantine record of an input (atomically); the input is not touched."""
    with _lock:  # two inputs with one file name: the second must see the first's record
        record = quarantine_path(output_dir, path)
        record.parent.mkdir(parents=True, exist_ok=True)
        content = {
            "path": _text(path),
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
    with _lock:
        record = quarantine_path(output_dir, path)
        if _record_path(record) != _text(path):
            return False
        record.unlink(missing_ok=True)
    return True
