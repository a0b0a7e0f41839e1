"""Intake: from watched files to queued units (DESIGN.md §2: watch → complete → pair → journal).

The watcher reports files; each undecided file is looked at on every tick (every
``settle_seconds / 4``, 50-250 ms) and judged by
:class:`~flybox.daemon.intake.complete.Completeness`.
A complete micrograph is fingerprinted (its content hash, cached in the journal by stat
signature), a settled text file parsed; bad inputs are quarantined (a record under
``OUTPUT/quarantine/``, an event, a log line, once per version of the file). Accepted inputs
go
to :class:`~flybox.daemon.intake.pairing.Pairing`; every stem whose inputs are all there gets
its unit
from the journal by key (:func:`~flybox.daemon.intake.reading.unit_key`): the existing one (done:
nothing to do; queued: run it), or a new version that supersedes unfinished older ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from flybox.daemon.intake.complete import (
    Completeness,
    Decision,
    FileState,
    InputKind,
    Probe,
    Verdict,
    probe,
)
from flybox.daemon.intake.pairing import (
    CoordinatesInput,
    DuplicateStemError,
    MicrographInput,
    Pairing,
)
from flybox.daemon.intake.reading import (
    FileChangedError,
    TextParseError,
    clear_quarantine,
    fingerprint_file,
    read_ctf_table,
    read_picks,
    unit_key,
    write_quarantine,
)
from flybox.daemon.intake.watch import Watcher, WatchUpdate
from flybox.daemon.telemetry.events import MissingCoordinatesEvent, QuarantineEvent
from flybox.daemon.work.journal import UnitRecord
from flybox.pipeline.matching import micrograph_stem

if TYPE_CHECKING:
    from flybox.daemon.service import Service

__all__ = ["Intake"]

log = logging.getLogger(__name__)


def _probe_all(items: list[tuple[str, InputKind]]) -> list[Probe]:
    return [probe(path, kind) for path, kind in items]


class Intake:
    """The service's input side (module docstring); runs on the event loop.

    Parameters
    ----------
    service
        The service (journal, progress, stems, runner, bus).
    """

    def __init__(self, service: Service) -> None:
        self.service = service
        watch = service.watch
        self.completeness = Completeness(watch.settle_seconds, watch.incomplete_timeout_seconds)
        self.pairing = Pairing(
            needs_ctf=watch.ctf is not None, coordinate_suffix=watch.coordinate_suffix
        )
        self.files: dict[str, FileState] = {}
        self._to_probe: set[str] = set()
        self._probe_wake = asyncio.Event()

    async def intake_loop(self, watcher: Watcher) -> None:
        """Follow the watcher's updates (runs until cancelled)."""
        while True:
            self.observe(await watcher.next_update())

    def observe(self, update: WatchUpdate) -> None:
        """Take in what the watcher saw: new files are tracked, changed ones looked at."""
        self.service.matched.see(update.listing or (), update.hints)
        if update.listing is not None:
            for path, (kind, signature) in update.listing.items():
                state = self.files.get(path)
                if state is None:
                    self._track(path, kind)
                elif state.signature != signature:
                    self._to_probe.add(path)
            self._to_probe.update(p for p in self.files if p not in update.listing)
        for path, kind in update.hints.items():
            if path in self.files:
                self._to_probe.add(path)
            else:
                self._track(path, kind)
        if self._to_probe:
            self._probe_wake.set()

    def _track(self, path: str, kind: InputKind) -> None:
        self.files[path] = FileState(path, kind, changed_at=time.monotonic())
        self._to_probe.add(path)
        if kind == "micrograph":
            self.service.progress.seen += 1

    async def tick_loop(self) -> None:
        """Look at files that are not decided yet, and report overdue pairs (until cancelled)."""
        interval = min(0.25, max(0.05, self.service.watch.settle_seconds / 4))
        overdue_checked = 0.0
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the wait ends, and the service could then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._probe_wake.wait()
            self._probe_wake.clear()
            if self._to_probe:
                await self._check_files()
            now = time.monotonic()
            if now - overdue_checked >= 1.0:
                overdue_checked = now
                self._report_overdue(now)

    def _report_overdue(self, now: float) -> None:
        late = self.pairing.overdue(now, self.service.watch.pairing_timeout_seconds)
        for item, missing, waited in late:
            log.warning("%s: no %s after %.0f s; still waiting", item.path, missing, waited)
            self.service.bus.publish(
                MissingCoordinatesEvent(
                    session=self.service.session,
                    path=item.path,
                    waited_seconds=waited,
                    missing=missing,
                )
            )

    async def _check_files(self) -> None:
        items = [(p, self.files[p].kind) for p in list(self._to_probe) if p in self.files]
        self._to_probe.difference_update(p for p in list(self._to_probe) if p not in self.files)
        looks = await asyncio.to_thread(_probe_all, items)
        now = time.monotonic()
        for (path, _), look in zip(items, looks, strict=True):
            state = self.files.get(path)
            if state is None:
                continue
            decision = self.completeness.assess(state, look, now)
            if decision.verdict is Verdict.PENDING:
                continue
            self._to_probe.discard(path)
            if decision.verdict is Verdict.GONE:
                self._forget(state)
            elif decision.verdict is Verdict.QUARANTINE:
                assert decision.reason is not None
                assert decision.code is not None
                await self.quarantine(path, state.kind, decision.reason, decision.code)
            elif state.kind == "micrograph":
                await self._accept_micrograph(state, now)
            else:
                await self._accept_text(state, now)

    # ----------------------------------------------------------------------------- intake
    def _forget(self, state: FileState) -> None:
        self.files.pop(state.path, None)
        if state.kind == "micrograph":
            self.service.progress.seen -= 1
            stem = self.pairing.remove_micrograph(state.path)
            if stem is not None and self.service.progress.phase(stem) in ("waiting", "quarantined"):
                self.service.set_phase(stem, None)
        elif state.kind == "coordinates":
            self.pairing.remove_coordinates(state.path)
        else:
            self.pairing.set_ctf_source(state.path, {})

    async def quarantine(self, path: str, kind: InputKind, reason: str, code: str) -> None:
        """Set an input aside: a record under ``OUTPUT/quarantine/``, an event, a log line
        (once per version of the file, also across restarts). The file is not touched; when
        it changes, it is evaluated again."""
        assert self.service.journal is not None
        state = self.files.get(path)
        if state is None:
            state = self.files[path] = FileState(path, kind, changed_at=time.monotonic())
        state.decided = Decision(Verdict.QUARANTINE, reason, code)
        self._to_probe.discard(path)
        signature = state.signature.text() if state.signature else ""
        record = await self.service.journal_call(self.service.journal.input, path)
        announce = not (record and record.state == "quarantined" and record.signature == signature)
        if announce:
            await asyncio.to_thread(
                write_quarantine, self.service.output_dir, path, kind, reason, code, signature
            )
            await self.service.journal_call(
                self.service.journal.save_input,
                path,
                kind,
                signature,
                None,
                "quarantined",
                reason,
                code,
            )
            log.warning("%s: quarantined: %s", path, reason)
            self.service.bus.publish(
                QuarantineEvent(
                    session=self.service.session, path=path, kind=kind, reason=reason, code=code
                )
            )
        stem: str | None = None
        if kind == "micrograph":
            stem = self.pairing.remove_micrograph(path)
            if stem is None and code != "duplicate_name":
                stem = micrograph_stem(path)
        elif kind == "coordinates":
            self.pairing.remove_coordinates(path)
            stem = self.pairing.coordinates_stem(path)
            if self.pairing.micrograph(stem) is None:
                stem = None
        else:
            await self.evaluate(self.pairing.set_ctf_source(path, {}))
        if stem is not None and self.service.progress.phase(stem) in (None, "waiting"):
            self.service.set_phase(stem, "quarantined")

    async def _accepted(self, state: FileState, fingerprint: str | None) -> None:
        """Journal an accepted input; remove its quarantine record if it had one."""
        assert self.service.journal is not None
        assert state.signature is not None
        signature = state.signature.text()
        record = await self.service.journal_call(self.service.journal.input, state.path)
        if record is not None and record.state == "quarantined":
            await asyncio.to_thread(clear_quarantine, self.service.output_dir, state.path)
            log.info("%s: rewritten and now complete; out of quarantine", state.path)
        if record is None or (record.signature, record.state) != (signature, "complete"):
            await self.service.journal_call(
                self.service.journal.save_input,
                state.path,
                state.kind,
                signature,
                fingerprint,
                "complete",
            )

    async def _accept_micrograph(self, state: FileState, now: float) -> None:
        assert self.service.journal is not None
        assert state.signature is not None
        record = await self.service.journal_call(self.service.journal.input, state.path)
        if record and record.signature == state.signature.text() and record.fingerprint:
            fingerprint = record.fingerprint
        else:
            try:
                fingerprint = await asyncio.to_thread(fingerprint_file, state.path)
            except FileChangedError:
                state.decided = None
                self._to_probe.add(state.path)
                return
            except OSError as exc:
                reason = f"unreadable: {exc.strerror or exc}"
                await self.quarantine(state.path, state.kind, reason, "unreadable")
                return
        await self._accepted(state, fingerprint)
        try:
            stem = self.pairing.set_micrograph(MicrographInput(state.path, fingerprint, now))
        except DuplicateStemError as exc:
            await self.quarantine(state.path, state.kind, str(exc), "duplicate_name")
            return
        self.service.progress.arrived()
        entry = self.service.stem(stem)
        entry.micrograph_at = entry.touched_at = now
        await self.evaluate({stem})

    async def _accept_text(self, state: FileState, now: float) -> None:
        try:
            if state.kind == "coordinates":
                digest, picks = await asyncio.to_thread(read_picks, state.path)
            else:
                ctfs = await asyncio.to_thread(read_ctf_table, state.path)
        except FileChangedError:
            state.decided = None
            self._to_probe.add(state.path)
            return
        except TextParseError as exc:
            state.parse_failed(exc.reason, exc.code)
            self._to_probe.add(state.path)
            return
        state.parsed()
        await self._accepted(state, None)
        if state.kind == "coordinates":
            stem = self.pairing.set_coordinates(CoordinatesInput(state.path, digest, picks, now))
            self.service.stem(stem).touched_at = now
            await self.evaluate({stem})
        else:
            await self.evaluate(self.pairing.set_ctf_source(state.path, ctfs))

    # ----------------------------------------------------------------------------- units
    def _resolve_units(
        self, requests: list[tuple[str, str, str, dict[str, Any]]]
    ) -> list[UnitRecord]:
        """Journal thread: the unit of each (stem, key): the existing one, or a new version."""
        assert self.service.journal is not None
        units = []
        for stem, micrograph, key, inputs in requests:
            latest = self.service.journal.latest(stem)
            if latest is not None and latest.key == key:
                units.append(latest)
                continue
            current = self.service.journal.current(stem)
            if current is not None and current.key == key:
                if latest is not None and latest.state in ("queued", "running", "failed"):
                    self.service.journal.set_state(latest.id, "superseded")
                units.append(current)
                continue
            units.append(self.service.journal.add_unit(stem, micrograph, key, inputs))
        return units

    async def evaluate(self, stems: set[str]) -> None:
        """Stems whose inputs changed: find or create their unit, queue it when needed."""
        requests = []
        for stem in sorted(stems):
            pair = self.pairing.pair(stem)
            entry = self.service.stem(stem)
            if pair is None:
                if self.pairing.missing(stem) and self.service.progress.phase(stem) in (
                    None,
                    "quarantined",
                ):
                    self.service.set_phase(stem, "waiting")
                continue
            key = unit_key(
                self.service.settings_hash,
                pair.micrograph.fingerprint,
                pair.coordinates.digest,
                pair.ctf,
            )
            if entry.unit is not None and entry.unit.key == key:
                if entry.unit.state in ("queued", "running"):
                    entry.pair = pair
                else:
                    self.pairing.release_picks(stem)
                continue
            entry.pair = pair
            inputs = {
                "micrograph": pair.micrograph.path,
                "fingerprint": pair.micrograph.fingerprint,
                "coordinates": pair.coordinates.path,
                "coordinates_digest": pair.coordinates.digest,
                "ctf": pair.ctf is not None,
            }
            requests.append((stem, pair.micrograph.path, key, inputs))
        if not requests:
            return
        units = await self.service.journal_call(self._resolve_units, requests)
        now = time.monotonic()
        assert self.service.runner is not None
        for unit in units:
            entry = self.service.stem(unit.stem)
            if entry.unit is not None and entry.unit.id == unit.id:
                continue
            entry.unit = unit
            entry.ready_at = now
            if unit.state == "queued":
                self.service.set_phase(unit.stem, "queued")
                self.service.runner.enqueue(unit.stem)
                continue
            entry.pair = None  # nothing to run: keep no picks in memory
            self.pairing.release_picks(unit.stem)
            if unit.state in ("done", "failed", "quarantined"):
                self.service.set_phase(unit.stem, unit.state)  # type: ignore[arg-type]
