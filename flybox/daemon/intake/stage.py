"""Intake: from watched files to queued units (DESIGN.md §2: watch → complete → pair → journal).

The watcher reports files; each undecided file is looked at on every tick (every
``settle_seconds / 4``, 50-250 ms) and judged by
:class:`~flybox.daemon.intake.complete.Completeness`.
A complete micrograph is fingerprinted (its content hash, cached in the journal by stat
signature), a settled text file parsed; bad inputs are quarantined (a record under
``OUTPUT/quarantine/``, an event, a log line, once per version of the file). Accepted inputs
go to :class:`~flybox.daemon.intake.pairing.Pairing`; every stem whose inputs are all there
gets its unit from the journal by key (:func:`~flybox.daemon.work.units.unit_key`): the
existing one (done: nothing to do; queued: hand it forward), or a new version that supersedes
unfinished older ones.

Seams: intake hands a stem whose unit is queued forward through the ``enqueue`` callback it is
given (the work stage's ready queue), and shares only :class:`~flybox.daemon.state.SessionState`
and the :class:`~flybox.daemon.state.JournalThread`; the work stage calls back
:meth:`Intake.quarantine` (bad input found by a worker) and :meth:`Intake.release_picks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from flybox.config import WatchConfig
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
    AUTOPICK,
    CoordinatesInput,
    MicrographInput,
    Pairing,
)
from flybox.daemon.intake.quarantine import (
    clear_quarantine,
    name_problem,
    shown,
    write_quarantine,
)
from flybox.daemon.intake.reading import fingerprint_file, read_ctf_table, read_picks
from flybox.daemon.intake.watch import Watcher, WatchPattern, WatchUpdate
from flybox.daemon.state import Heartbeats, JournalThread, SessionState, is_disk_full
from flybox.daemon.telemetry.events import EventBus, MissingCoordinatesEvent, QuarantineEvent
from flybox.daemon.work.units import (
    UnitRequest,
    autopick_versions,
    resolve_units,
    unit_key,
)
from flybox.errors import DuplicateStemError, FileChangedError, InputError, TextParseError
from flybox.pipeline.matching import micrograph_stem

__all__ = ["AutopickSource", "Intake"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A read of one input (probe, fingerprint, parse) that takes longer is given up: the input
#: is quarantined (a hung network file system, a device) and intake goes on.
READ_TIMEOUT_SECONDS = 60.0
#: After a full disk stopped intake from journaling a file, look at it again this much later.
DISK_RETRY_SECONDS = 5.0
#: The intake loop is stalled when it has not come round for this long (at least; or
#: ``[session] stall_seconds``): one read may take up to the read timeout.
STALL_SECONDS = 2 * READ_TIMEOUT_SECONDS


async def _read(function: Callable[[str], T], path: str) -> T:
    """``function(path)`` in a thread, given up after :data:`READ_TIMEOUT_SECONDS`
    (``TimeoutError``; the thread finishes on its own)."""
    async with asyncio.timeout(READ_TIMEOUT_SECONDS):
        return await asyncio.to_thread(function, path)


class AutopickSource(Protocol):
    """The service's picker model, as intake needs it (``[picking]``)."""

    @property
    def version(self) -> int:
        """The current model version (for micrographs picked from now on)."""
        ...

    def digest(self, version: int) -> str:
        """What stands for the coordinates' hash in the key of a unit picked with
        ``version`` (:func:`~flybox.daemon.work.units.autopick_digest`)."""
        ...


class Intake:
    """The service's input side (module docstring); an async context manager that owns the
    watcher and two loops (``intake-follow-watcher``, ``intake-tick``) on the event loop.

    Parameters
    ----------
    watch
        The ``[watch]`` settings.
    patterns
        What to watch (micrographs, coordinates, CTF).
    session
        The session name (in events).
    output_dir
        The output folder (quarantine records go to its ``quarantine/``).
    settings_hash
        The hash of the processing settings (part of every unit key).
    state
        The stems and status counts shared with the work stage.
    journal
        The journal and its thread.
    events
        Where quarantine and missing-input events go.
    enqueue
        Called with a stem whose unit is queued: the seam to the work stage.
    on_seen
        Called with every listing and hints the watcher reports (which patterns matched).
    autopick
        The picker model when the service picks micrographs without coordinates.
    """

    def __init__(
        self,
        watch: WatchConfig,
        patterns: Sequence[WatchPattern],
        *,
        session: str,
        output_dir: Path,
        settings_hash: str,
        state: SessionState,
        journal: JournalThread,
        events: EventBus,
        enqueue: Callable[[str], None],
        on_seen: Callable[[Iterable[str], Iterable[str]], None] | None = None,
        autopick: AutopickSource | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.watch = watch
        self.heartbeats = heartbeats or Heartbeats()
        self._bad_names: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._disk_logged: set[str] = set()
        self.patterns = list(patterns)
        self.session = session
        self.output_dir = output_dir
        self.settings_hash = settings_hash
        self._state = state
        self._progress = state.progress
        self._journal = journal
        self._events = events
        self._enqueue = enqueue
        self._on_seen = on_seen
        self.completeness = Completeness(watch.settle_seconds, watch.incomplete_timeout_seconds)
        self.autopick = autopick
        #: The model version each autopicked stem is (to be) picked with.
        self.autopick_pins: dict[str, int] = {}
        self.pairing = Pairing(
            needs_ctf=watch.ctf is not None,
            coordinate_suffix=watch.coordinate_suffix,
            autopick=autopick is not None,
        )
        self.files: dict[str, FileState] = {}
        self._to_probe: set[str] = set()
        self._probe_wake = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> Intake:
        poll = min(max(self.watch.settle_seconds, 0.25), 2.0)
        async with contextlib.AsyncExitStack() as stack:
            watcher = await stack.enter_async_context(
                Watcher(
                    self.patterns,
                    mode=self.watch.mode,
                    rescan_seconds=self.watch.rescan_seconds,
                    poll_seconds=poll,
                )
            )
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._loops = {
                name: tasks.create_task(loop, name=name)
                for name, loop in (
                    ("intake-follow-watcher", self._follow(watcher)),
                    ("intake-tick", self._tick_loop()),
                )
            }
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking in files: cancel both loops, stop the watcher (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        for task in self._loops.values():
            task.cancel()
        await stack.aclose()

    def release_picks(self, stem: str) -> None:
        """The stem's unit is settled: keep none of its picks in memory."""
        self.pairing.release_picks(stem)

    async def _follow(self, watcher: Watcher) -> None:
        """Follow the watcher's updates (runs until cancelled)."""
        while True:
            self.observe(await watcher.next_update())

    def observe(self, update: WatchUpdate) -> None:
        """Take in what the watcher saw: new files are tracked, changed ones looked at."""
        if self._on_seen is not None:  # which watch patterns have matched a file yet
            self._on_seen(update.listing or (), update.hints)
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
        problem = name_problem(path)
        if problem is not None:  # quarantined up front: the name itself is the problem
            self._bad_names[path] = problem
        if kind == "micrograph":
            self._progress.seen += 1

    async def _tick_loop(self) -> None:
        """Look at files that are not decided yet, and report overdue pairs (until cancelled)."""
        interval = min(0.25, max(0.05, self.watch.settle_seconds / 4))
        overdue_checked = 0.0
        self.heartbeats.register("intake", max(STALL_SECONDS, self.heartbeats.stall_seconds))
        while True:
            self.heartbeats.beat("intake")
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the wait ends, and the service could then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._probe_wake.wait()
            self._probe_wake.clear()
            now = time.monotonic()
            for path, when in list(self._retry_at.items()):
                if when <= now:
                    del self._retry_at[path]
                    self._to_probe.add(path)
            if self._to_probe:
                await self._check_files()
            now = time.monotonic()
            if now - overdue_checked >= 1.0:
                overdue_checked = now
                self._report_overdue(now)

    def _report_overdue(self, now: float) -> None:
        late = self.pairing.overdue(now, self.watch.pairing_timeout_seconds)
        for item, missing, waited in late:
            log.warning("%s: no %s after %.0f s; still waiting", item.path, missing, waited)
            self._events.emit(
                MissingCoordinatesEvent(
                    session=self.session,
                    path=item.path,
                    waited_seconds=waited,
                    missing=missing,
                )
            )

    async def _check_files(self) -> None:
        items = [(p, self.files[p].kind) for p in list(self._to_probe) if p in self.files]
        self._to_probe.difference_update(p for p in list(self._to_probe) if p not in self.files)
        looks: list[Probe | None] = []
        for path, kind in items:
            # one at a time, with a deadline: one input that blocks (a hung mount) is that
            # input's problem, not intake's
            try:
                async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                    looks.append(await asyncio.to_thread(probe, path, kind))
            except TimeoutError:
                looks.append(None)
        now = time.monotonic()
        for (path, kind), look in zip(items, looks, strict=True):
            state = self.files.get(path)
            if state is None:
                continue
            if look is None:
                reason = f"no answer within {READ_TIMEOUT_SECONDS:.0f} s when read"
                await self._guarded(state, self.quarantine(path, kind, reason, "read_timeout"))
                continue
            await self._guarded(state, self._check_one(state, look, now))

    async def _guarded(self, state: FileState, work: Awaitable[None]) -> None:
        """Run one input's step; whatever goes wrong with it is that input's problem: a full
        disk → look again later; anything else → quarantine it with the reason."""
        try:
            await work
        except Exception as exc:
            path = state.path
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {READ_TIMEOUT_SECONDS:.0f} s when read"
                timeout = self.quarantine(path, state.kind, reason, "read_timeout")
                await self._guarded(state, timeout)
                return
            if is_disk_full(exc):
                self._state.disk.report(exc)  # the work stage probes and says so
                state.decided = None
                self._retry_at[path] = time.monotonic() + DISK_RETRY_SECONDS
                level = logging.DEBUG if path in self._disk_logged else logging.WARNING
                self._disk_logged.add(path)  # once per file: a long outage must not flood
                log.log(level, "%s: not taken in yet: disk full (%s)", shown(path), exc)
                return
            reason = f"internal error while reading it: {type(exc).__name__}: {exc}"
            log.error("%s: %s", shown(path), reason, exc_info=exc)
            try:
                await self.quarantine(path, state.kind, reason, "internal")
            except Exception as again:
                if not is_disk_full(again):
                    log.error("%s: cannot quarantine it: %s", shown(path), again)
                state.decided = None
                self._retry_at[path] = time.monotonic() + DISK_RETRY_SECONDS

    async def _check_one(self, state: FileState, look: Probe, now: float) -> None:
        path = state.path
        decision = self.completeness.assess(state, look, now)
        problem = self._bad_names.get(path)
        if decision.verdict is Verdict.PENDING and problem is None:
            return
        self._to_probe.discard(path)
        if decision.verdict is Verdict.GONE:
            self._forget(state)
        elif problem is not None:  # the name itself cannot be used: whatever the content
            await self.quarantine(path, state.kind, problem, "bad_name")
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
        self._bad_names.pop(state.path, None)
        self._retry_at.pop(state.path, None)
        if state.kind == "micrograph":
            self._progress.seen -= 1
            stem = self.pairing.remove_micrograph(state.path)
            if stem is not None and self._progress.phase(stem) in ("waiting", "quarantined"):
                self._state.set_phase(stem, None)
        elif state.kind == "coordinates":
            self.pairing.remove_coordinates(state.path)
        else:
            self.pairing.set_ctf_source(state.path, {})

    async def quarantine(self, path: str, kind: InputKind, reason: str, code: str) -> None:
        """Set an input aside: a record under ``OUTPUT/quarantine/``, an event, a log line
        (once per version of the file, also across restarts). The file is not touched; when
        it changes, it is evaluated again."""
        journal = self._journal
        state = self.files.get(path)
        if state is None:
            state = self.files[path] = FileState(path, kind, changed_at=time.monotonic())
        state.decided = Decision(Verdict.QUARANTINE, reason, code)
        self._to_probe.discard(path)
        signature = state.signature.text() if state.signature else ""
        record = await journal.call(journal.journal.input, path)
        announce = not (record and record.state == "quarantined" and record.signature == signature)
        if announce:
            await asyncio.to_thread(
                write_quarantine, self.output_dir, path, kind, reason, code, signature
            )
            await journal.call(
                journal.journal.save_input,
                path,
                kind,
                signature,
                None,
                "quarantined",
                reason,
                code,
            )
            log.warning("%s: quarantined: %s", shown(path), reason)
            self._events.emit(
                QuarantineEvent(
                    session=self.session, path=path, kind=kind, reason=reason, code=code
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
        if stem is not None and self._progress.phase(stem) in (None, "waiting"):
            self._state.set_phase(stem, "quarantined")

    async def _accepted(self, state: FileState, fingerprint: str | None) -> None:
        """Journal an accepted input; remove its quarantine record if it had one."""
        assert state.signature is not None
        journal = self._journal
        signature = state.signature.text()
        record = await journal.call(journal.journal.input, state.path)
        if record is not None and record.state == "quarantined":
            await asyncio.to_thread(clear_quarantine, self.output_dir, state.path)
            log.info("%s: rewritten and now complete; out of quarantine", shown(state.path))
        if record is None or (record.signature, record.state) != (signature, "complete"):
            await journal.call(
                journal.journal.save_input,
                state.path,
                state.kind,
                signature,
                fingerprint,
                "complete",
            )

    async def _still_quarantined(self, state: FileState) -> bool:
        """An input quarantined before (by intake or by a worker) and unchanged since stays
        quarantined: its record is kept, nothing is announced again (also after a restart)."""
        assert state.signature is not None
        journal = self._journal
        record = await journal.call(journal.journal.input, state.path)
        if record is None or record.state != "quarantined":
            return False
        if record.signature != state.signature.text():
            return False
        await self.quarantine(
            state.path, state.kind, record.reason or "quarantined", record.code or "quarantined"
        )
        return True

    async def _accept_micrograph(self, state: FileState, now: float) -> None:
        assert state.signature is not None
        if await self._still_quarantined(state):
            return
        journal = self._journal
        record = await journal.call(journal.journal.input, state.path)
        if record and record.signature == state.signature.text() and record.fingerprint:
            fingerprint = record.fingerprint
        else:
            try:
                fingerprint = await _read(fingerprint_file, state.path)
            except FileChangedError:
                state.decided = None
                self._to_probe.add(state.path)
                return
            except OSError as exc:
                reason = f"unreadable: {exc.strerror or exc}"
                await self.quarantine(state.path, state.kind, reason, "unreadable")
                return
            except InputError as exc:  # not a regular file (swapped in after the probe)
                await self.quarantine(state.path, state.kind, exc.problem, "not_regular_file")
                return
        await self._accepted(state, fingerprint)
        try:
            stem = self.pairing.set_micrograph(
                MicrographInput(state.path, fingerprint, now, state.signature.size)
            )
        except DuplicateStemError as exc:
            await self.quarantine(state.path, state.kind, exc.problem, "duplicate_name")
            return
        self._progress.arrived()
        entry = self._state.stem(stem)
        entry.micrograph_at = entry.touched_at = now
        await self.evaluate({stem})

    async def _accept_text(self, state: FileState, now: float) -> None:
        if await self._still_quarantined(state):
            return
        try:
            if state.kind == "coordinates":
                digest, picks = await _read(read_picks, state.path)
            else:
                ctfs = await _read(read_ctf_table, state.path)
        except FileChangedError:
            state.decided = None
            self._to_probe.add(state.path)
            return
        except TextParseError as exc:
            state.parse_failed(exc.problem, exc.code)
            self._to_probe.add(state.path)
            return
        state.parsed()
        await self._accepted(state, None)
        if state.kind == "coordinates":
            stem = self.pairing.set_coordinates(CoordinatesInput(state.path, digest, picks, now))
            self._state.stem(stem).touched_at = now
            await self.evaluate({stem})
        else:
            await self.evaluate(self.pairing.set_ctf_source(state.path, ctfs))

    # ----------------------------------------------------------------------------- picking
    async def set_corrected(self, stem: str, item: CoordinatesInput) -> None:
        """Picks corrected in the picker replace the stem's picks: a new version of its unit
        (when the picks differ from those of its current one)."""
        self.pairing.set_corrected(stem, item)
        self._state.stem(stem).touched_at = time.monotonic()
        await self.evaluate({stem})

    async def repick(self, stems: Sequence[str], version: int) -> None:
        """Pick ``stems`` again with model ``version`` (a new version of each autopicked one)."""
        for stem in stems:
            self.autopick_pins[stem] = version
            self._state.stem(stem).touched_at = time.monotonic()
        await self.evaluate(set(stems))

    async def _pin_autopick_versions(self, stems: Sequence[str]) -> None:
        """Fix the model version of autopicked stems seen for the first time: the one their
        newest unit was picked with, else the current one."""
        assert self.autopick is not None
        todo = []
        for stem in stems:
            pair = self.pairing.pair(stem)
            autopicked = pair is not None and pair.coordinates.path == AUTOPICK
            if pair is not None and autopicked and stem not in self.autopick_pins:
                todo.append((stem, pair.micrograph.fingerprint))
        if not todo:
            return
        journal = self._journal
        found = await journal.call(autopick_versions, journal.journal, todo)
        for stem, _ in todo:
            self.autopick_pins[stem] = found.get(stem, self.autopick.version)

    # ----------------------------------------------------------------------------- units
    async def evaluate(self, stems: set[str]) -> None:
        """Stems whose inputs changed: find or create their unit, queue it when needed."""
        requests: list[UnitRequest] = []
        if self.autopick is not None:
            await self._pin_autopick_versions(sorted(stems))
        for stem in sorted(stems):
            pair = self.pairing.pair(stem)
            entry = self._state.stem(stem)
            if pair is None:
                if self.pairing.missing(stem) and self._progress.phase(stem) in (
                    None,
                    "quarantined",
                ):
                    self._state.set_phase(stem, "waiting")
                continue
            digest = pair.coordinates.digest
            model: int | None = None
            if pair.coordinates.path == AUTOPICK and self.autopick is not None:
                model = self.autopick_pins.get(stem, self.autopick.version)
                digest = self.autopick.digest(model)
            key = unit_key(self.settings_hash, pair.micrograph.fingerprint, digest, pair.ctf)
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
            if model is not None:
                inputs["autopick_model"] = model
            requests.append((stem, pair.micrograph.path, key, inputs))
        if not requests:
            return
        journal = self._journal
        units = await journal.call(resolve_units, journal.journal, requests)
        now = time.monotonic()
        for unit in units:
            entry = self._state.stem(unit.stem)
            if entry.unit is not None and entry.unit.id == unit.id:
                continue
            entry.unit = unit
            entry.ready_at = now
            if unit.state == "queued":
                self._state.set_phase(unit.stem, "queued")
                self._enqueue(unit.stem)
                continue
            entry.pair = None  # nothing to run: keep no picks in memory
            self.pairing.release_picks(unit.stem)
            if unit.state in ("done", "failed", "quarantined"):
                self._state.set_phase(unit.stem, unit.state)  # type: ignore[arg-type]
