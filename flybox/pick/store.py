"""The picking session on disk: picks, discarded picks and ``picking.json``, saved as they
happen (atomic writes) and read back by a restarted picker on the same folder.

Files in the session folder (Contract, issue 11):

- ``<stem>_manualpick.star``: the picks kept (``rlnCoordinateX``, ``rlnCoordinateY``,
  ``rlnAutopickFigureOfMerit`` (−1 for manual picks, as RELION writes unscored picks),
  ``flyboxPickOrigin`` manual|auto);
- ``<stem>_discarded.star``: the discarded picks, same columns;
- ``picking.json``: the session summary and each micrograph's state.

A picks file that does not parse is reported for its micrograph, which becomes read-only: the
file is never overwritten. The store is thread-safe (one lock); callers in an event loop call
it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from flybox.errors import ConfigError, FlyboxError, InputError
from flybox.io.atomic import atomic_write
from flybox.io.coords import read_coordinates
from flybox.io.mrc import read_header
from flybox.io.star import write_star
from flybox.pick.learner import MIN_MANUAL_PICKS

__all__ = [
    "DISCARDED_SUFFIX",
    "PICKS_SUFFIX",
    "SESSION_FILE",
    "MicrographRecord",
    "Pick",
    "PickStore",
    "ReadOnlyPicksError",
    "StalePicksError",
]

Origin = Literal["manual", "auto"]
State = Literal["not_visited", "proposed", "picked", "corrected"]
STATES: tuple[State, ...] = ("not_visited", "proposed", "picked", "corrected")
PICKS_SUFFIX = "_manualpick.star"
DISCARDED_SUFFIX = "_discarded.star"
SESSION_FILE = "picking.json"
SESSION_VERSION = 1
ORIGIN_COLUMN = "flyboxPickOrigin"
X, Y, FOM = "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"


class StalePicksError(FlyboxError):
    """A save based on an older version of the picks (``If-Match`` does not match)."""


class ReadOnlyPicksError(FlyboxError):
    """The micrograph's picks file did not parse: it is kept as it is, never overwritten."""


@dataclass(frozen=True)
class Pick:
    """One pick in micrograph pixels; ``score`` is the learner's probability (auto picks)."""

    x: float
    y: float
    origin: Origin = "manual"
    score: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "origin": self.origin, "score": self.score}


@dataclass
class MicrographRecord:
    """What the session knows about one micrograph."""

    name: str
    path: Path
    picks: list[Pick] = field(default_factory=list)
    discarded: list[Pick] = field(default_factory=list)
    state: State = "not_visited"
    error: str | None = None
    picks_error: str | None = None
    shape: tuple[int, int] | None = None

    @property
    def etag(self) -> str:
        """Version of the picks: a hash of their content and the state."""
        body = json.dumps(
            [[p.as_json() for p in self.picks], [p.as_json() for p in self.discarded], self.state],
            sort_keys=True,
        )
        return '"' + hashlib.sha1(body.encode()).hexdigest()[:20] + '"'

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "picks": len(self.picks),
            "discarded": len(self.discarded),
            "state": self.state,
            "error": self.error or self.picks_error,
            "shape": list(self.shape) if self.shape else None,
        }


def _picks_table(picks: Sequence[Pick]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            X: np.array([p.x for p in picks], dtype=np.float64),
            Y: np.array([p.y for p in picks], dtype=np.float64),
            FOM: np.array([-1.0 if p.score is None else p.score for p in picks]),
            ORIGIN_COLUMN: pd.Series([p.origin for p in picks], dtype=object),
        }
    )


def _read_picks(path: Path, default_origin: Origin) -> list[Pick]:
    table = read_coordinates(path)
    xs, ys = table[X].to_numpy(), table[Y].to_numpy()
    scores = table[FOM].to_numpy() if FOM in table.columns else np.full(len(table), -1.0)
    origins = (
        table[ORIGIN_COLUMN].astype(str).tolist()
        if ORIGIN_COLUMN in table.columns
        else [default_origin] * len(table)
    )
    picks = []
    for x, y, score, origin in zip(xs, ys, scores, origins, strict=True):
        if origin not in ("manual", "auto"):
            raise InputError(path, f"unknown pick origin {origin!r}")
        kept = float(score) if origin == "auto" and 0.0 <= score <= 1.0 else None
        picks.append(Pick(float(x), float(y), origin, kept))  # type: ignore[arg-type]
    return picks


def _imported_picks(
    picks_source: Path | None, suffix: str | None
) -> tuple[dict[str, Path], dict[str, list[Pick]]]:
    """Files of a ``--picks`` folder by micrograph stem, or the picks of a cryoSPARC ``.cs``."""
    if picks_source is None:
        return {}, {}
    if picks_source.is_file():
        table = read_coordinates(picks_source)
        if "rlnMicrographName" not in table.columns:
            raise InputError(picks_source, "a picks file must name its micrographs")
        grouped: dict[str, list[Pick]] = {}
        for name, x, y in zip(table["rlnMicrographName"], table[X], table[Y], strict=True):
            grouped.setdefault(Path(str(name)).stem, []).append(Pick(float(x), float(y), "auto"))
        return {}, grouped
    if not picks_source.is_dir():
        raise InputError(picks_source, "no such picks folder")
    suffixes = [suffix] if suffix else ["_autopick.star", ".star", ".cbox", ".box", ".pos", ".txt"]
    found: dict[str, Path] = {}
    for path in sorted(picks_source.iterdir()):
        for s in suffixes:
            if path.name.endswith(s) and path.is_file():
                found.setdefault(path.name[: -len(s)], path)
                break
    return found, {}


class PickStore:
    """The session folder and every micrograph's picks.

    Parameters
    ----------
    micrographs
        Micrograph files; their stems name them and must be unique.
    folder
        The session folder (``-o``), created when missing.
    particle_size
        Diameter in micrograph pixels; ``None`` keeps the saved session's (required for a new
        session).
    picks
        A folder of existing picks (any format flybox reads), or a cryoSPARC ``.cs`` file, to
        start from on micrographs the session has not saved yet.
    picks_suffix
        File-name ending of those picks (default: the common ones).

    Raises
    ------
    ConfigError
        Duplicate micrograph names, no particle size for a new session.
    """

    def __init__(
        self,
        micrographs: Sequence[Path],
        folder: Path,
        *,
        particle_size: float | None = None,
        picks: Path | None = None,
        picks_suffix: str | None = None,
        allow_empty: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self._lock = threading.RLock()
        self.records: dict[str, MicrographRecord] = {}
        for path in micrographs:
            name = Path(path).stem
            if name in self.records:
                raise ConfigError(
                    "micrographs", f"two micrographs are named {name}: {self.records[name].path}"
                )
            self.records[name] = MicrographRecord(name=name, path=Path(path))
        if not self.records and not allow_empty:
            raise ConfigError("micrographs", "no micrographs given")
        self.folder.mkdir(parents=True, exist_ok=True)
        session = self._read_session()
        saved_size = session.get("particle_size")
        size = particle_size if particle_size is not None else saved_size
        if size is None or not (isinstance(size, int | float) and math.isfinite(size) and size > 0):
            raise ConfigError("particle-size", "give the particle diameter in pixels (> 0)")
        self.particle_size = float(size)
        self.threshold = float(session.get("threshold", 0.5))
        self.autopick_used = bool(session.get("autopick_used", False))
        self.last_micrograph: str | None = session.get("last_micrograph")
        self.model_version = int(session.get("model_version", 0))
        #: Where Autopick's model comes from: ``"session"`` (trained on this session's labels)
        #: or ``"service"`` (the streaming service's current model; no labels needed).
        self.model_source: Literal["session", "service"] = "session"
        #: ``picking.json`` is behind the records (:meth:`add_micrograph` with ``save=False``).
        self.dirty = False
        #: Times ``picking.json`` was written (a session's cost grows with this).
        self.session_writes = 0
        states = session.get("micrographs", {})
        self._saved_states: dict[str, Any] = dict(states)
        files, grouped = _imported_picks(picks, picks_suffix)
        for record in self.records.values():
            self._load_record(record, states.get(record.name, {}), files, grouped)
        self._save_session()

    def add_micrograph(self, path: Path, picks: Path | None = None, *, save: bool = True) -> None:
        """A micrograph joins the session (the service: once it is committed), starting from
        ``picks`` (automatic picks) unless the session saved picks of its own. A known
        micrograph that nobody reviewed takes the new picks (a new model picked it again).
        Proposals nobody reviewed (Autopick all) stay proposals when the micrograph joins
        again, after a restart too: they are never taken for the user's picks."""
        name = Path(path).stem
        with self._lock:
            known = self.records.get(name)
            if known is not None and known.state in ("picked", "corrected"):
                return
            saved = self._saved_states.get(name, {})
            # Proposals nobody reviewed (Autopick all, here or before a restart) stay
            # proposals: never read back as the user's picks, never training labels.
            proposed = (known is not None and known.state == "proposed") or (
                known is None and saved.get("state") == "proposed"
            )
            if proposed:
                saved = {}
                if picks is not None:  # a newer model's picks supersede the saved proposals
                    self.picks_path(name).unlink(missing_ok=True)
            record = MicrographRecord(name=name, path=Path(path))
            files = {name: picks} if picks is not None else {}
            self._load_record(record, saved, files, {}, proposals=proposed)
            self.records[name] = record
            if save:
                self._save_session()
            else:
                self.dirty = True

    # -- loading ---------------------------------------------------------------------------

    def _read_session(self) -> dict[str, Any]:
        path = self.folder / SESSION_FILE
        if not path.is_file():
            return {}
        try:
            session = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(path, f"not a picking session ({exc})") from exc
        if not isinstance(session, dict):
            raise InputError(path, "not a picking session")
        return session

    def _load_record(
        self,
        record: MicrographRecord,
        saved: dict[str, Any],
        files: dict[str, Path],
        grouped: dict[str, list[Pick]],
        *,
        proposals: bool = False,
    ) -> None:
        # ``proposals``: this micrograph's saved picks file holds unreviewed proposals.
        try:
            info = read_header(record.path)
            record.shape = (info.ny, info.nx)
        except (FlyboxError, OSError) as exc:
            record.error = str(exc)
        state = saved.get("state")
        if state in STATES:
            record.state = state
        picks_path = self.picks_path(record.name)
        discarded_path = self.folder / f"{record.name}{DISCARDED_SUFFIX}"
        try:
            if picks_path.is_file():
                record.picks = _read_picks(picks_path, "auto" if proposals else "manual")
                if record.state == "not_visited":
                    record.state = "proposed" if proposals else "picked"
            elif record.name in files or record.name in grouped:
                imported = (
                    _read_picks(files[record.name], "auto")
                    if record.name in files
                    else grouped[record.name]
                )
                record.picks = [replace(p, origin="auto") for p in imported]
                record.state = "proposed"
            if discarded_path.is_file():
                record.discarded = _read_picks(discarded_path, "auto")
        except FlyboxError as exc:
            record.picks_error = f"picks not loaded, file kept as it is: {exc}"

    # -- queries ---------------------------------------------------------------------------

    def picks_path(self, name: str) -> Path:
        return self.folder / f"{name}{PICKS_SUFFIX}"

    def get(self, name: str) -> MicrographRecord:
        """The record of micrograph ``name`` (``KeyError`` when there is none)."""
        return self.records[name]

    def names(self) -> list[str]:
        return list(self.records)

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.as_json() for r in self.records.values()]

    def summary(self) -> dict[str, Any]:
        """The session summary (also the top of ``picking.json``)."""
        with self._lock:
            picks = [p for r in self.records.values() for p in r.picks]
            manual = sum(p.origin == "manual" for p in picks)
            states = [r.state for r in self.records.values()]
            service = self.model_source == "service"
            return {
                "particle_size": self.particle_size,
                "micrograph_count": len(self.records),
                "manual": manual,
                "automatic": len(picks) - manual,
                "discarded": sum(len(r.discarded) for r in self.records.values()),
                "autopick_used": self.autopick_used,
                "last_micrograph": self.last_micrograph,
                "model_version": self.model_version,
                "model_source": self.model_source,
                "enough_labels": service or manual >= MIN_MANUAL_PICKS,
                "labels_needed": 0 if service else max(0, MIN_MANUAL_PICKS - manual),
                "threshold": self.threshold,
                "states": {s: states.count(s) for s in STATES},
            }

    def labels(self) -> list[tuple[MicrographRecord, list[Pick], list[Pick]]]:
        """Training labels: on micrographs the user has reviewed (picked or corrected), the
        picks as positives and the discarded proposals as negatives."""
        with self._lock:
            return [
                (r, list(r.picks), [p for p in r.discarded if p.origin == "auto"])
                for r in self.records.values()
                if r.state in ("picked", "corrected") and r.picks and r.error is None
            ]

    def labels_fingerprint(self) -> str:
        body = json.dumps(
            [
                (r.name, [(p.x, p.y) for p in pos], [(p.x, p.y) for p in neg])
                for r, pos, neg in self.labels()
            ]
            + [self.particle_size]
        )
        return hashlib.sha1(body.encode()).hexdigest()

    # -- changes ---------------------------------------------------------------------------

    def set_picks(
        self,
        name: str,
        picks: Iterable[Pick],
        discarded: Iterable[Pick],
        *,
        state: State | None = None,
        if_match: str | None = None,
    ) -> MicrographRecord:
        """Replace a micrograph's picks and save them at once.

        Parameters
        ----------
        state
            New state; by default ``picked`` (a save is a review), unless there is nothing.
        if_match
            The ETag the change is based on; a different current ETag raises
            :class:`StalePicksError` and changes nothing.
        """
        with self._lock:
            record = self.records[name]
            if record.picks_error is not None:
                raise ReadOnlyPicksError(record.picks_error)
            if if_match is not None and if_match not in (record.etag, "*"):
                raise StalePicksError(f"{name}: the picks changed since they were loaded")
            new_picks, new_discarded = list(picks), list(discarded)
            if state is None:
                state = "picked" if (new_picks or new_discarded) else record.state
            self._write_picks(name, new_picks, new_discarded)
            record.picks, record.discarded, record.state = new_picks, new_discarded, state
            self._save_session()
            return record

    def set_proposals(self, name: str, proposals: Iterable[Pick]) -> bool:
        """Store automatic proposals on a micrograph nobody has visited (Autopick all).

        Returns ``False`` (and changes nothing) when the micrograph was visited meanwhile.
        """
        with self._lock:
            record = self.records[name]
            if record.state != "not_visited" or record.picks_error is not None:
                return False
            picks = list(proposals)
            self._write_picks(name, picks, record.discarded)
            record.picks, record.state = picks, "proposed"
            self.autopick_used = True
            self._save_session()
            return True

    def update_session(
        self,
        *,
        particle_size: float | None = None,
        threshold: float | None = None,
        last_micrograph: str | None = None,
        autopick_used: bool | None = None,
        model_version: int | None = None,
    ) -> None:
        """Change session settings and save ``picking.json``."""
        with self._lock:
            if particle_size is not None:
                self.particle_size = float(particle_size)
            if threshold is not None:
                self.threshold = float(threshold)
            if last_micrograph is not None:
                self.records[last_micrograph]
                self.last_micrograph = last_micrograph
            if autopick_used is not None:
                self.autopick_used = autopick_used
            if model_version is not None:
                self.model_version = model_version
            self._save_session()

    def _write_picks(self, name: str, picks: list[Pick], discarded: list[Pick]) -> None:
        write_star(self.picks_path(name), {"": _picks_table(picks)})
        discarded_path = self.folder / f"{name}{DISCARDED_SUFFIX}"
        if discarded or discarded_path.exists():
            write_star(discarded_path, {"": _picks_table(discarded)})

    def flush(self) -> bool:
        """Write ``picking.json`` when it is behind the records; returns whether it wrote."""
        with self._lock:
            if not self.dirty:
                return False
            self._save_session()
            return True

    def _save_session(self) -> None:
        with self._lock:
            session = self.summary()
            session["format_version"] = SESSION_VERSION
            session["micrographs"] = {
                r.name: {"state": r.state, "path": os.fspath(r.path)} for r in self.records.values()
            }
            with atomic_write(self.folder / SESSION_FILE, "w") as fh:
                fh.write(json.dumps(session, indent=1) + "\n")
            self.dirty = False
            self.session_writes += 1
