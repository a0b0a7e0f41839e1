"""Service-side commit: publish a unit's files, extend the cumulative STAR files, journal it.

Order (a crash between any two steps leaves a state that a restart repairs):

1. the worker's temporary stacks and per-micrograph STAR files are flushed and renamed into
   place (:func:`flybox.pipeline.job.commit_job`);
2. each stream's ``OUT/<stream>.star`` gets the micrograph's rows **appended** at the
   committed length recorded in the journal (one ``write`` + ``fsync``; the cost does not
   depend on how many particles the file already has);
3. one journal transaction marks the unit done and records each file's new length and where
   the rows lie (:class:`~flybox.daemon.work.journal.SegmentRecord`).

On restart (:meth:`Committer.recover`) every file is cut back to its journal length, so rows of
a commit that did not reach step 3 disappear, and the unit is done again. The file is a valid
RELION 3.1 STAR file at every moment: the header (``data_optics`` + the ``data_particles`` loop
header) is written once, rows follow.

Two rare cases rewrite the whole file instead (cost proportional to its size, streamed in
1 MiB pieces): a **new version** of a micrograph (its old rows are cut out and the new rows go
to the end) and a **new optics group** (a micrograph whose pixel size, voltage… differ from
every group so far; its rows get the next group number). A rewrite goes to a temporary file,
which the journal names (``pending``) in the same transaction as step 3, and is renamed into
place afterwards (again on restart if the crash came first).

Rows whose columns differ from the file's (the first micrograph fixes them) are conformed:
missing columns are written as ``nan``, extra ones left out of the cumulative file (they stay
in the micrograph's own STAR file), with one warning per stream and column.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flybox.daemon.work.journal import Journal, SegmentRecord, StarFileRecord, UnitRecord
from flybox.io.atomic import fsync_directory, temp_path_for
from flybox.io.star import format_star_block
from flybox.pipeline.job import JobResult, StreamOutput, commit_job
from flybox.pipeline.layout import optics_table, stream_folder, stream_star_name
from flybox.types import OpticsGroup

__all__ = ["CommitOutcome", "Committer", "StreamUpdate", "remove_temporaries", "rows_bytes"]

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20
_NAMING = ("rlnOpticsGroup", "rlnOpticsGroupName")


@dataclass(frozen=True)
class StreamUpdate:
    """A stream's cumulative STAR file after a commit."""

    stream: str
    path: str
    particles: int
    micrographs: int
    rewritten: bool


@dataclass(frozen=True)
class CommitOutcome:
    """What a commit changed: the streams whose cumulative file was updated."""

    streams: dict[str, StreamUpdate]
    seconds: float


@dataclass
class _Change:
    before: StarFileRecord | None
    after: StarFileRecord
    body: bytes
    header_changed: bool
    old: SegmentRecord | None
    segment: SegmentRecord | None

    @property
    def rewrite(self) -> bool:
        return self.before is None or self.header_changed or self.old is not None


def rows_bytes(rows: pd.DataFrame) -> bytes:
    """The data lines of a ``data_particles`` loop for ``rows`` (no header)."""
    full = format_star_block("particles", rows).encode()
    head = format_star_block("particles", rows.iloc[:0]).encode()[:-1]
    if not full.startswith(head):  # pragma: no cover - format_star_block's layout
        raise RuntimeError("unexpected STAR layout")
    return full[len(head) : -1]


def _header(optics: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    return (
        format_star_block("optics", pd.DataFrame(list(optics)))
        + "\n"
        + format_star_block("particles", pd.DataFrame(columns=list(columns)))[:-1]
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _optics_row(group: OpticsGroup, pixel_size_a: float, box: int) -> dict[str, Any]:
    table = optics_table([group], pixel_size_a, box)
    return {str(k): _plain(v) for k, v in table.iloc[0].to_dict().items()}


def _same_optics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = set(a) - set(_NAMING)
    if keys != set(b) - set(_NAMING):
        return False
    for key in keys:
        x, y = a[key], b[key]
        if isinstance(x, float | int) and isinstance(y, float | int):
            if not math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def _copy_range(source: Any, target: Any, start: int, end: int) -> None:
    source.seek(start)
    remaining = end - start
    while remaining > 0:
        chunk = source.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise OSError(f"{source.name}: shorter than the journal says")
        target.write(chunk)
        remaining -= len(chunk)


def remove_temporaries(output_dir: Path, streams: Sequence[str]) -> int:
    """Remove temporary files (``.*.tmp``) left in the output folder and its stream folders by
    an interrupted run; returns how many. Only call when no worker is writing."""
    removed = 0
    for folder in [output_dir, *(output_dir / stream_folder(s) for s in streams)]:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


class Committer:
    """Commits units into the output folder (used from the service's journal thread only).

    Parameters
    ----------
    output_dir
        ``OUT``.
    journal
        The journal of ``OUT``.
    streams
        The chain's streams.
    """

    def __init__(self, output_dir: Path, journal: Journal, streams: Sequence[str]) -> None:
        self.output_dir = output_dir
        self.journal = journal
        self.streams = list(streams)
        self.files: dict[str, StarFileRecord] = {}
        self._warned: set[tuple[str, str]] = set()

    def path(self, record: StarFileRecord) -> Path:
        """Absolute path of a stream's file."""
        return self.output_dir / record.path

    # ----------------------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Bring every cumulative STAR file to the journal's committed state, and remove
        temporary files of an interrupted run."""
        self.files = self.journal.star_files()
        for stream, record in list(self.files.items()):
            path = self.path(record)
            if record.pending is not None:
                pending = self.output_dir / record.pending
                if pending.exists():
                    os.replace(pending, path)
                    fsync_directory(path.parent)
                self.journal.clear_pending(stream)
                record = self.files[stream] = replace(record, pending=None)
            size = path.stat().st_size if path.exists() else -1
            if size > record.length:
                log.info(
                    "%s: removing %d bytes of an unfinished commit", path, size - record.length
                )
                with open(path, "r+b") as handle:
                    handle.truncate(record.length)
                    os.fsync(handle.fileno())
            elif size < record.length:
                log.error(
                    "%s: %s than the journal's %d bytes; rebuilding it from the per-micrograph "
                    "STAR files",
                    path,
                    "missing" if size < 0 else f"{size} bytes, shorter",
                    record.length,
                )
                self.files[stream] = self._rebuild(record)
        for stream in self.streams:
            if stream not in self.files:
                (self.output_dir / stream_star_name(stream)).unlink(missing_ok=True)
        removed = remove_temporaries(self.output_dir, self.streams)
        if removed:
            log.info(
                "%s: removed %d temporary files of an interrupted run", self.output_dir, removed
            )

    def _rebuild(self, record: StarFileRecord) -> StarFileRecord:
        from flybox.errors import FlyboxError
        from flybox.io.star import read_relion_star

        path = self.path(record)
        folder = self.output_dir / stream_folder(record.stream)
        segments: list[SegmentRecord] = []
        temp = temp_path_for(path)
        offset = 0
        with open(temp, "wb") as out:
            out.write(record.header.encode())
            for segment in self.journal.segments(record.stream):
                try:
                    table = read_relion_star(folder / f"{segment.stem}.star", "particles")
                except (FlyboxError, OSError) as exc:
                    log.error("%s: rows of %s lost (%s)", path, segment.stem, exc)
                    continue
                rows, number = table.rows, 1
                if table.optics is not None and len(table.optics):
                    own = {str(k): _plain(v) for k, v in table.optics.iloc[0].to_dict().items()}
                    matches = (int(o["rlnOpticsGroup"]) for o in record.optics)
                    same = [
                        n
                        for n, o in zip(matches, record.optics, strict=True)
                        if _same_optics(o, own)
                    ]
                    number = same[0] if same else 1
                body = rows_bytes(self._conform(record, segment.stem, rows, number))
                out.write(body)
                segments.append(replace(segment, offset=offset, length=len(body)))
                offset += len(body)
            out.flush()
            os.fsync(out.fileno())
        rebuilt = replace(
            record,
            length=record.header_bytes + offset,
            particles=sum(s.particles for s in segments),
            micrographs=len(segments),
        )
        self.journal.replace_segments(rebuilt, segments)
        os.replace(temp, path)
        fsync_directory(path.parent)
        return rebuilt

    # ----------------------------------------------------------------------------- commit
    def _conform(
        self, record: StarFileRecord | None, stem: str, rows: pd.DataFrame, group: int
    ) -> pd.DataFrame:
        rows = rows.copy()
        rows["rlnOpticsGroup"] = np.full(len(rows), group, dtype=np.int64)
        if record is None or tuple(rows.columns) == record.columns:
            return rows
        for column in [c for c in rows.columns if c not in record.columns]:
            if (record.stream, column) not in self._warned:
                self._warned.add((record.stream, column))
                log.warning(
                    "%s: column %s is not in %s (fixed by its first micrograph); it stays in "
                    "the micrograph's own STAR file only",
                    stem,
                    column,
                    record.path,
                )
        for column in [c for c in record.columns if c not in rows.columns]:
            if (record.stream, column) not in self._warned:
                self._warned.add((record.stream, column))
                log.warning("%s: no %s column; written as nan in %s", stem, column, record.path)
            rows[column] = np.nan
        return rows[list(record.columns)]

    def _prepare(
        self, unit: UnitRecord, output: StreamOutput, group: OpticsGroup
    ) -> _Change | None:
        stream = output.stream
        before = self.files.get(stream)
        old = self.journal.segment(stream, unit.stem) if before is not None else None
        if output.count == 0 and old is None:
            return None
        optics = list(before.optics) if before is not None else []
        columns = before.columns if before is not None else tuple(output.rows.columns)
        header_changed = before is None
        body = b""
        if output.count:
            row = _optics_row(group, output.pixel_size_a, output.box)
            number = next((int(o["rlnOpticsGroup"]) for o in optics if _same_optics(o, row)), None)
            if number is None:
                number = len(optics) + 1
                row.update(rlnOpticsGroup=number, rlnOpticsGroupName=f"opticsGroup{number}")
                optics.append(row)
                header_changed = True
            body = rows_bytes(self._conform(before, unit.stem, output.rows, number))
        header = _header(optics, columns) if header_changed or before is None else before.header
        header_bytes = len(header.encode())
        rows_length = 0 if before is None else before.length - before.header_bytes
        if old is not None:
            rows_length -= old.length
        segment = None
        if body:
            segment = SegmentRecord(
                stream, unit.stem, unit.id, rows_length, len(body), output.count
            )
        after = StarFileRecord(
            stream=stream,
            path=stream_star_name(stream),
            header=header,
            columns=tuple(columns),
            optics=tuple(optics),
            length=header_bytes + rows_length + len(body),
            particles=(before.particles if before else 0)
            - (old.particles if old else 0)
            + output.count,
            micrographs=(before.micrographs if before else 0)
            - (1 if old else 0)
            + (1 if output.count else 0),
        )
        return _Change(before, after, body, header_changed, old, segment)

    def _write(self, change: _Change) -> None:
        path = self.output_dir / change.after.path
        if not change.rewrite:
            assert change.before is not None
            with open(path, "r+b") as handle:
                handle.seek(change.before.length)
                handle.write(change.body)
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
            return
        temp = temp_path_for(path)
        try:
            with open(temp, "wb") as out:
                out.write(change.after.header.encode())
                if change.before is not None:
                    with open(path, "rb") as source:
                        start = change.before.header_bytes
                        if change.old is not None:
                            _copy_range(source, out, start, start + change.old.offset)
                            start += change.old.offset + change.old.length
                        _copy_range(source, out, start, change.before.length)
                out.write(change.body)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        change.after = replace(change.after, pending=temp.name)

    def _undo(self, changes: Sequence[_Change]) -> None:
        """Take back the writes of a commit that did not reach the journal: appended files are
        cut to their committed length (truncating needs no space), rewritten copies removed."""
        for change in changes:
            path = self.output_dir / change.after.path
            try:
                if change.after.pending is not None:
                    (self.output_dir / change.after.pending).unlink(missing_ok=True)
                elif change.before is not None and not change.rewrite:
                    with open(path, "r+b") as handle:
                        handle.truncate(change.before.length)
                        os.fsync(handle.fileno())
            except OSError as exc:  # recover() cuts it at the next start
                log.error("%s: cannot cut back an unfinished commit: %s", path, exc)

    def _install(self, record: StarFileRecord) -> None:
        """Rename a rewritten file into place (the journal already names it ``pending``)."""
        assert record.pending is not None
        path = self.output_dir / record.path
        os.replace(self.output_dir / record.pending, path)
        fsync_directory(path.parent)
        self.journal.clear_pending(record.stream)
        self.files[record.stream] = replace(record, pending=None)

    def commit(self, unit: UnitRecord, result: JobResult, group: OpticsGroup) -> CommitOutcome:
        """Commit one unit (see the module docstring for the order of the steps).

        Parameters
        ----------
        unit
            The journal's unit.
        result
            What the worker returned (outputs under temporary names).
        group
            The micrograph's optics group (matched against the file's groups).
        """
        started = time.perf_counter()
        commit_job(result)
        for output in result.streams.values():
            if output.count == 0:  # a new version without particles here: no stale files
                Path(output.stack_final).unlink(missing_ok=True)
                Path(output.star_final).unlink(missing_ok=True)
        changes = [
            change
            for output in result.streams.values()
            if (change := self._prepare(unit, output, group)) is not None
        ]
        summary = {
            "picks": result.picks,
            "excluded": result.excluded,
            "particles": {s: o.count for s, o in result.streams.items()},
            "seconds": result.seconds,
        }
        try:
            for change in changes:
                self._write(change)
            self.journal.record_done(
                unit,
                summary,
                [c.after for c in changes],
                [c.segment for c in changes if c.segment is not None],
                [c.old for c in changes if c.old is not None],
            )
        except BaseException:
            self._undo(changes)  # a full disk, an I/O error: nothing of this commit stays
            raise
        for change in changes:
            self.files[change.after.stream] = change.after
            if change.after.pending is not None:
                self._install(change.after)
        updates = {
            c.after.stream: StreamUpdate(
                c.after.stream,
                str(self.output_dir / c.after.path),
                c.after.particles,
                c.after.micrographs,
                c.rewrite,
            )
            for c in changes
        }
        return CommitOutcome(updates, time.perf_counter() - started)
