"""The service's memory: an SQLite journal in ``OUTPUT/.flybox/journal.sqlite`` (DESIGN.md §2).

WAL mode, ``synchronous=FULL``: a transaction that returned is on disk. Tables:

``meta(key, value)``
    ``settings_hash`` and ``settings`` (the chain and the options that shape the outputs),
    ``schema``.
``inputs(path, kind, signature, fingerprint, state, reason, code, updated)``
    Every input file the service decided about: its stat signature and content fingerprint
    (so that a restart does not hash unchanged files again), ``complete`` or ``quarantined``.
``units(id, stem, micrograph, key, version, state, attempts, error, code, inputs, result,
created, updated)``
    One row per unit of work: a micrograph with given inputs and settings. ``key`` is the
    SHA-256 of the micrograph fingerprint, the coordinates' content hash, the CTF values and
    the settings hash. States: ``queued``, ``running``, ``done``, ``failed``, ``quarantined``,
    ``superseded`` (newer inputs arrived before it was committed). ``version`` counts the
    units of a stem; ``result`` holds the committed counts (JSON).
``current(stem, unit)``
    The committed unit of each stem (what the outputs hold).
``star_files(stream, path, header, columns, optics, length, particles, micrographs, pending)``
    Each stream's cumulative STAR file: its header text, loop columns, optics rows, and the
    committed length in bytes (anything beyond is an unfinished append, cut on restart);
    ``pending`` names a rewritten file not yet renamed into place.
``segments(stream, stem, unit, offset, length, particles)``
    Where each committed micrograph's rows lie in its stream's file (offset from the end of
    the header), so that a new version can replace them.

A :class:`Journal` is used from one thread at a time (the service's journal thread).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "InputRecord",
    "Journal",
    "SegmentRecord",
    "StarFileRecord",
    "UnitRecord",
    "storable",
]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, signature TEXT NOT NULL, fingerprint TEXT,
    state TEXT NOT NULL, reason TEXT, code TEXT, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY, stem TEXT NOT NULL, micrograph TEXT NOT NULL, key TEXT NOT NULL,
    version INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT, code TEXT, inputs TEXT NOT NULL, result TEXT,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS units_stem ON units (stem, version);
CREATE INDEX IF NOT EXISTS units_state ON units (state);
CREATE TABLE IF NOT EXISTS current (stem TEXT PRIMARY KEY, unit INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS star_files (
    stream TEXT PRIMARY KEY, path TEXT NOT NULL, header TEXT NOT NULL, columns TEXT NOT NULL,
    optics TEXT NOT NULL, length INTEGER NOT NULL, particles INTEGER NOT NULL,
    micrographs INTEGER NOT NULL, pending TEXT);
CREATE TABLE IF NOT EXISTS segments (
    stream TEXT NOT NULL, stem TEXT NOT NULL, unit INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, particles INTEGER NOT NULL, PRIMARY KEY (stream, stem));
"""


@dataclass(frozen=True)
class InputRecord:
    """What the journal remembers about one input file."""

    path: str
    kind: str
    signature: str
    fingerprint: str | None
    state: str
    reason: str | None
    code: str | None


@dataclass(frozen=True)
class UnitRecord:
    """One unit of work."""

    id: int
    stem: str
    micrograph: str
    key: str
    version: int
    state: str
    attempts: int
    error: str | None
    code: str | None
    inputs: dict[str, Any]
    result: dict[str, Any] | None


@dataclass(frozen=True)
class StarFileRecord:
    """The committed state of one stream's cumulative STAR file."""

    stream: str
    path: str
    header: str
    columns: tuple[str, ...]
    optics: tuple[dict[str, Any], ...]
    length: int
    particles: int
    micrographs: int
    pending: str | None = None

    @property
    def header_bytes(self) -> int:
        """Length of the header in bytes (rows start there)."""
        return len(self.header.encode())


@dataclass(frozen=True)
class SegmentRecord:
    """Where one micrograph's rows lie in a stream's file (offset from the end of the header)."""

    stream: str
    stem: str
    unit: int
    offset: int
    length: int
    particles: int


def storable(text: str) -> str:
    """Text SQLite can store: a path decoded with ``surrogateescape`` (bytes that are not
    UTF-8) keeps its bytes as ``\\xNN`` escapes (the same path always gives the same key)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def _unit(row: sqlite3.Row) -> UnitRecord:
    return UnitRecord(
        id=row["id"],
        stem=row["stem"],
        micrograph=row["micrograph"],
        key=row["key"],
        version=row["version"],
        state=row["state"],
        attempts=row["attempts"],
        error=row["error"],
        code=row["code"],
        inputs=json.loads(row["inputs"]),
        result=json.loads(row["result"]) if row["result"] else None,
    )


def _star(row: sqlite3.Row) -> StarFileRecord:
    return StarFileRecord(
        stream=row["stream"],
        path=row["path"],
        header=row["header"],
        columns=tuple(json.loads(row["columns"])),
        optics=tuple(json.loads(row["optics"])),
        length=row["length"],
        particles=row["particles"],
        micrographs=row["micrographs"],
        pending=row["pending"],
    )


class Journal:
    """The SQLite journal of one output folder.

    Parameters
    ----------
    path
        The database file (created with its folder when absent).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        if self.get_meta("schema") is None:
            self.set_meta("schema", SCHEMA_VERSION)

    def close(self) -> None:
        """Close the database (checkpointing the WAL)."""
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable transaction (nested use joins the outer one)."""
        if self._db.in_transaction:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ----------------------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        """A ``meta`` value."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        """Set a ``meta`` value."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ----------------------------------------------------------------------------- inputs
    def input(self, path: str) -> InputRecord | None:
        """The record of an input file."""
        row = self._db.execute("SELECT * FROM inputs WHERE path = ?", (storable(path),)).fetchone()
        if row is None:
            return None
        return InputRecord(
            row["path"],
            row["kind"],
            row["signature"],
            row["fingerprint"],
            row["state"],
            row["reason"],
            row["code"],
        )

    def save_input(
        self,
        path: str,
        kind: str,
        signature: str,
        fingerprint: str | None,
        state: str,
        reason: str | None = None,
        code: str | None = None,
    ) -> None:
        """Record an input's decided state (``complete`` or ``quarantined``)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (storable(path), kind, signature, fingerprint, state, reason, code, time.time()),
            )

    def quarantined_inputs(self) -> int:
        """How many inputs are quarantined."""
        row = self._db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'quarantined'")
        return int(row.fetchone()[0])

    # ----------------------------------------------------------------------------- units
    def unit(self, unit_id: int) -> UnitRecord:
        """A unit by id."""
        return _unit(self._db.execute("SELECT * FROM units WHERE id = ?", (unit_id,)).fetchone())

    def latest(self, stem: str) -> UnitRecord | None:
        """The newest unit of a stem."""
        row = self._db.execute(
            "SELECT * FROM units WHERE stem = ? ORDER BY version DESC LIMIT 1", (stem,)
        ).fetchone()
        return None if row is None else _unit(row)

    def current(self, stem: str) -> UnitRecord | None:
        """The committed unit of a stem."""
        row = self._db.execute(
            "SELECT units.* FROM current JOIN units ON units.id = current.unit "
            "WHERE current.stem = ?",
            (stem,),
        ).fetchone()
        return None if row is None else _unit(row)

    def current_units(self) -> list[UnitRecord]:
        """The committed unit of every stem, in commit order."""
        rows = self._db.execute(
            "SELECT units.* FROM current JOIN units ON units.id = current.unit "
            "ORDER BY units.updated"
        ).fetchall()
        return [_unit(row) for row in rows]

    def add_unit(self, stem: str, micrograph: str, key: str, inputs: dict[str, Any]) -> UnitRecord:
        """Create the next version of a stem; its older unfinished units become superseded."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM units WHERE stem = ?", (stem,)
            ).fetchone()
            db.execute(
                "UPDATE units SET state = 'superseded', updated = ? "
                "WHERE stem = ? AND state IN ('queued', 'running', 'failed')",
                (now, stem),
            )
            cursor = db.execute(
                "INSERT INTO units (stem, micrograph, key, version, state, inputs, created, "
                "updated) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (stem, micrograph, key, int(row[0]) + 1, json.dumps(inputs), now, now),
            )
            unit_id = int(cursor.lastrowid or 0)
        return self.unit(unit_id)

    def set_state(
        self,
        unit_id: int,
        state: str,
        *,
        error: str | None = None,
        code: str | None = None,
        attempt: bool = False,
    ) -> None:
        """Change a unit's state (``attempt``: count one more attempt)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE units SET state = ?, error = ?, code = ?, updated = ?, "
                "attempts = attempts + ? WHERE id = ?",
                (state, error, code, time.time(), int(attempt), unit_id),
            )

    def recover(self) -> int:
        """After a crash or a stop: units left ``running`` are ``queued`` again; returns how
        many."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE units SET state = 'queued', updated = ? WHERE state = 'running'",
                (time.time(),),
            )
            return cursor.rowcount

    def retry_failed(self, codes: Sequence[str]) -> int:
        """At start: failed units whose failure may be transient (``codes``: a worker crash,
        an I/O error such as a full disk, an internal error fixed by an upgrade) are
        ``queued`` again with their attempts reset; returns how many. Deterministic failures
        (a box larger than the micrograph) stay failed until an input or the chain changes."""
        if not codes:
            return 0
        marks = ", ".join("?" * len(codes))
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE units SET state = 'queued', attempts = 0, updated = ? "
                f"WHERE state = 'failed' AND code IN ({marks})",
                (time.time(), *codes),
            )
            return cursor.rowcount

    def stem_states(self) -> dict[str, str]:
        """The state of each stem's newest unit (``done`` when a version is committed and no
        newer unit is pending)."""
        rows = self._db.execute(
            "SELECT stem, state FROM units AS u WHERE version = "
            "(SELECT MAX(version) FROM units WHERE stem = u.stem)"
        ).fetchall()
        return {str(row["stem"]): str(row["state"]) for row in rows}

    def record_done(
        self,
        unit: UnitRecord,
        result: dict[str, Any],
        stars: Sequence[StarFileRecord],
        segments: Sequence[SegmentRecord],
        removed: Sequence[SegmentRecord],
    ) -> None:
        """Commit a unit: its state, its outputs in the cumulative files, all in one
        transaction (the files were written and flushed before)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE units SET state = 'done', result = ?, error = NULL, code = NULL, "
                "updated = ? WHERE id = ?",
                (json.dumps(result), time.time(), unit.id),
            )
            db.execute(
                "INSERT OR REPLACE INTO current (stem, unit) VALUES (?, ?)", (unit.stem, unit.id)
            )
            for old in removed:
                db.execute(
                    "DELETE FROM segments WHERE stream = ? AND stem = ?", (old.stream, old.stem)
                )
                db.execute(
                    "UPDATE segments SET offset = offset - ? WHERE stream = ? AND offset > ?",
                    (old.length, old.stream, old.offset),
                )
            for segment in segments:
                db.execute(
                    "INSERT OR REPLACE INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        segment.stream,
                        segment.stem,
                        segment.unit,
                        segment.offset,
                        segment.length,
                        segment.particles,
                    ),
                )
            for star in stars:
                db.execute(
                    "INSERT OR REPLACE INTO star_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        star.stream,
                        star.path,
                        star.header,
                        json.dumps(list(star.columns)),
                        json.dumps(list(star.optics)),
                        star.length,
                        star.particles,
                        star.micrographs,
                        star.pending,
                    ),
                )

    # ----------------------------------------------------------------------------- STAR files
    def star_files(self) -> dict[str, StarFileRecord]:
        """Every stream's cumulative STAR file record."""
        rows = self._db.execute("SELECT * FROM star_files").fetchall()
        return {str(row["stream"]): _star(row) for row in rows}

    def clear_pending(self, stream: str) -> None:
        """A rewritten STAR file is in place."""
        with self.transaction() as db:
            db.execute("UPDATE star_files SET pending = NULL WHERE stream = ?", (stream,))

    def replace_segments(self, star: StarFileRecord, segments: Sequence[SegmentRecord]) -> None:
        """Record a rebuilt stream file: its new length and all its segments."""
        with self.transaction() as db:
            db.execute("DELETE FROM segments WHERE stream = ?", (star.stream,))
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                [(s.stream, s.stem, s.unit, s.offset, s.length, s.particles) for s in segments],
            )
            db.execute(
                "UPDATE star_files SET length = ?, particles = ?, micrographs = ? WHERE stream = ?",
                (star.length, star.particles, star.micrographs, star.stream),
            )

    def segment(self, stream: str, stem: str) -> SegmentRecord | None:
        """Where a stem's rows lie in a stream's file."""
        row = self._db.execute(
            "SELECT * FROM segments WHERE stream = ? AND stem = ?", (stream, stem)
        ).fetchone()
        return None if row is None else SegmentRecord(*row)

    def segments(self, stream: str) -> list[SegmentRecord]:
        """Every segment of a stream, in file order."""
        rows = self._db.execute(
            "SELECT * FROM segments WHERE stream = ? ORDER BY offset", (stream,)
        ).fetchall()
        return [SegmentRecord(*row) for row in rows]
