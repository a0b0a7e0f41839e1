"""Running units: the bounded ready queue, submission, commit and the per-micrograph events.

The journal holds the real queue (every ``queued`` unit); in memory the runner keeps the
stems that are ready, in arrival order, and submits while fewer than ``2 × workers`` units
are in flight, so that workers never wait for the service and memory never grows with a
backlog (the watcher keeps discovering meanwhile). When a unit's result comes back it is
committed on the journal thread (:class:`~flybox.daemon.work.commit.Committer`), unless newer
inputs superseded it meanwhile (its temporary files are then discarded).

Outcomes, classified by the exception tree (:mod:`flybox.errors`): bad input found by the
worker (:class:`~flybox.errors.InputError`) → the input is quarantined; a worker that died
(:class:`~flybox.errors.WorkerLostError`) or an I/O error
(:class:`~flybox.errors.TransientIOError`; an ``OSError`` from a job or a commit becomes one
where it is caught, here) → retried up to ``[executor] max_attempts`` times, then ``failed``;
a processing error (e.g. box larger than the micrograph) → ``failed`` at once. None of them
stops the service.

A full disk (``ENOSPC``/``EDQUOT`` from a worker, a commit or the journal, SQLite's "disk is
full") is nobody's fault and costs no attempt: the unit goes back to the ready queue, the
runner stops submitting, says so (a log line, an ``alert`` event with rule ``disk_full``,
``disk_full`` in the status) and probes the output folder with backoff (1 s doubling to
30 s); when a probe write succeeds it resumes by itself. A commit that fails halfway is cut
back to the journal's committed length at once (no cut row stays in a STAR file).

Seams: intake puts stems whose unit is queued on the :class:`ReadyQueue`; the runner reports
back through the callbacks it is given (``on_quarantine``, ``release_picks``) and shares only
:class:`~flybox.daemon.state.SessionState` and the :class:`~flybox.daemon.state.JournalThread`.
The runner is an async context manager owning its schedule loop and one task per unit in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from flybox.config import FlyboxConfig
from flybox.daemon.intake.complete import InputKind
from flybox.daemon.intake.pairing import AUTOPICK, Pair
from flybox.daemon.intake.quarantine import shown
from flybox.daemon.state import Heartbeats, JournalThread, SessionState, StemState, is_disk_full
from flybox.daemon.telemetry.events import (
    AlertEvent,
    EventBus,
    FailureEvent,
    MicrographEvent,
    OutputSetEvent,
    Quality,
    WarningEvent,
    warning_code,
)
from flybox.daemon.work.commit import CommitOutcome, Committer
from flybox.daemon.work.executor import Executor
from flybox.daemon.work.journal import UnitRecord
from flybox.errors import (
    FlyboxError,
    InputError,
    JobTimeoutError,
    ProcessingError,
    TransientIOError,
    WorkerLostError,
)
from flybox.pipeline.job import JobResult, JobWarnings, MicrographJob, Picker, discard_job
from flybox.types import OpticsGroup

__all__ = ["QuarantineCallback", "ReadyQueue", "UnitRunner", "quality_of"]

#: ``on_quarantine(path, kind, reason, code)``: set an input aside (intake's quarantine).
QuarantineCallback = Callable[[str, InputKind, str, str], Awaitable[None]]

log = logging.getLogger(__name__)

#: Backoff of the free-space probe while the disk is full (first, longest; seconds).
SPACE_PROBE_SECONDS = (1.0, 30.0)
#: Bytes the probe writes (and removes) in the output folder.
SPACE_PROBE_BYTES = 1 << 20
#: ``[executor] job_timeout_seconds`` is the timeout per this many bytes of micrograph.
JOB_TIMEOUT_BYTES = 256 << 20


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def quality_of(result: JobResult, pair: Pair) -> Quality:
    """The quality figures of a committed micrograph (from the first stream's rows)."""
    first = next(iter(result.streams.values()), None)
    rows = first.rows if first is not None else None
    variance = border = None
    median = result.stats.get("local_variance_median")
    if rows is not None and len(rows):
        if "flyboxLocalVariance" in rows:
            variance = float(rows["flyboxLocalVariance"].mean())
            if median is None:
                median = float(rows["flyboxLocalVariance"].median())
        if "flyboxBorderFraction" in rows:
            border = float(rows["flyboxBorderFraction"].mean())
    return Quality(
        local_variance_mean=_finite(variance),
        local_variance_median=_finite(median),
        gini=_finite(result.stats.get("gini")),
        defocus_a=_finite(pair.ctf.mean_defocus_a) if pair.ctf is not None else None,
        border_fraction_mean=_finite(border),
        pick_score_mean=_finite(result.stats.get("pick_score_mean")),
    )


def pick_origins(result: JobResult) -> dict[str, int]:
    """Picks by origin (``auto``, ``manual``, ``external``) of a picking session's unit."""
    return {
        origin: int(result.stats[f"picks_{origin}"])
        for origin in ("auto", "manual", "external")
        if result.stats.get(f"picks_{origin}")
    }


class ReadyQueue:
    """Stems whose unit is queued, oldest first, each once: intake puts, the runner takes."""

    def __init__(self) -> None:
        self._stems: dict[str, None] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._stems)

    def put(self, stem: str) -> None:
        """A stem's unit is queued: run it when a slot is free."""
        self._stems[stem] = None
        self._wake.set()

    def pop(self) -> str:
        """The oldest ready stem (the queue must not be empty)."""
        stem = next(iter(self._stems))
        del self._stems[stem]
        return stem

    def clear(self) -> None:
        """Forget every ready stem (their units stay queued in the journal)."""
        self._stems.clear()

    def wake(self) -> None:
        """Something changed for the taker (a slot became free)."""
        self._wake.set()

    async def changed(self) -> None:
        """Wait until a stem was put or :meth:`wake` was called."""
        await self._wake.wait()
        self._wake.clear()


class UnitRunner:
    """Submits ready units to the executor and commits their results (module docstring).

    Parameters
    ----------
    executor
        Where jobs run.
    committer
        Commits results (on the journal thread).
    ready
        The stems to run, put there by intake.
    config
        The configuration (``[[chain]]``, ``[micrograph]``, ``[output]``, ``[executor]``).
    output_dir
        The output folder.
    state
        The stems and status counts shared with intake.
    journal
        The journal and its thread.
    events
        Where micrograph, output-set and failure events go.
    on_quarantine
        Sets an input aside (a worker found it bad).
    release_picks
        Called with a stem whose unit is done: its picks need not be kept.
    project_dir
        The RELION project folder: paths in STAR files are relative to it.
    job_warnings
        Reports each distinct warning of a worker (pixel size, picks outside) once.
    picker
        ``[picking]``: the autopick step for a model version.
    """

    def __init__(
        self,
        executor: Executor,
        committer: Committer,
        ready: ReadyQueue,
        *,
        config: FlyboxConfig,
        session: str,
        output_dir: Path,
        state: SessionState,
        journal: JournalThread,
        events: EventBus,
        on_quarantine: QuarantineCallback,
        release_picks: Callable[[str], None],
        project_dir: Path | None = None,
        job_warnings: JobWarnings | None = None,
        picker: Callable[[int], Picker] | None = None,
        heartbeats: Heartbeats | None = None,
    ) -> None:
        self.executor = executor
        self._picker = picker
        self.heartbeats = heartbeats or Heartbeats()
        self._disk = state.disk
        self._paused: dict[str, None] = {}
        self.committer = committer
        self.project_dir = project_dir if project_dir is not None else Path.cwd()
        self.job_warnings = job_warnings if job_warnings is not None else JobWarnings()
        self.config = config
        self.session = session
        self.output_dir = output_dir
        self.limit = 2 * max(executor.workers, 1)
        self._ready = ready
        self._state = state
        self._progress = state.progress
        self._journal = journal
        self._events = events
        self._on_quarantine = on_quarantine
        self._release_picks = release_picks
        self._running: dict[int, asyncio.Task[None]] = {}
        self._committing: set[int] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._schedule: asyncio.Task[None] | None = None
        self._space: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Units submitted and not yet finished."""
        return len(self._running)

    async def __aenter__(self) -> UnitRunner:
        async with contextlib.AsyncExitStack() as stack:
            self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._schedule = self._tasks.create_task(self._schedule_loop(), name="work-schedule")
            self._space = self._tasks.create_task(self._space_loop(), name="work-space")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.drain(0.0, None)
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._tasks = None

    async def _schedule_loop(self) -> None:
        """Submit ready units while fewer than :attr:`limit` are in flight."""
        self.heartbeats.register("work")  # [session] stall_seconds
        idle = min(5.0, self.heartbeats.stall_seconds / 4)
        while True:
            self.heartbeats.beat("work")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):  # an idle loop beats too
                    await self._ready.changed()
            while self._ready and len(self._running) < self.limit and not self._disk.full:
                stem = self._ready.pop()
                entry = self._state.stems.get(stem)
                if entry is None or entry.unit is None or entry.pair is None:
                    continue
                if entry.unit.state != "queued" or entry.unit.id in self._running:
                    continue
                assert self._tasks is not None
                self._running[entry.unit.id] = self._tasks.create_task(
                    self._run(entry, entry.unit, entry.pair), name=f"unit-{stem}"
                )

    async def drain(self, timeout: float, force: asyncio.Event | None) -> None:
        """Stop submitting; give in-flight units ``timeout`` seconds (less once ``force`` is
        set) to finish and commit; hand the others back (they stay queued)."""
        if self._schedule is not None:
            self._schedule.cancel()
        if self._space is not None:
            self._space.cancel()
        self.heartbeats.unregister("work")
        self._ready.clear()
        if self._running:
            log.info("draining: up to %.0f s for %d micrographs in flight", timeout, self.in_flight)
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            if force is not None and force.is_set():
                break
            await asyncio.wait(list(self._running.values()), timeout=0.2)
        for unit_id, task in list(self._running.items()):
            if unit_id not in self._committing:
                task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()))

    def _job(self, pair: Pair, group: OpticsGroup, unit: UnitRecord) -> MicrographJob:
        config = self.config
        picker = None
        if self._picker is not None:
            # In a picking session every unit has the step (it also marks pick origins).
            version = unit.inputs.get("autopick_model") if unit is not None else None
            picker = self._picker(version if isinstance(version, int) else 0)
        coordinates = pair.coordinates.path if pair.coordinates.picks is None else None
        return MicrographJob(
            unit=f"{unit.key[:16]}-{unit.attempts}",
            micrograph=pair.micrograph.path,
            name=pair.micrograph.path,
            output_dir=str(self.output_dir),
            chain=self.config.build_chain().spec,
            picks=pair.coordinates.picks,
            coordinates=None if coordinates == AUTOPICK else coordinates,
            ctf=pair.ctf,
            optics=group,
            pixel_size_a=config.micrograph.pixel_size,
            picking_pixel_size_a=config.micrograph.picking_pixel_size,
            float16=config.output.float16,
            project_dir=str(self.project_dir),
            stem=pair.stem,
            picker=picker,
        )

    def _optics(self, pair: Pair) -> OpticsGroup:
        return OpticsGroup.from_ctf(pair.ctf, self.config.micrograph.pixel_size)

    async def _run(self, entry: StemState, unit: UnitRecord, pair: Pair) -> None:
        journal = self._journal
        running = replace(unit, state="running", attempts=unit.attempts + 1)
        entry.unit = running
        self._state.set_phase(unit.stem, "running")
        submitted = time.monotonic()
        group = self._optics(pair)
        try:
            try:
                await journal.call(journal.journal.set_state, unit.id, "running", attempt=True)
                result = await self._submit(self._job(pair, group, running), pair)
            except asyncio.CancelledError:
                if entry.unit is running:
                    entry.unit = replace(running, state="queued")
                    self._state.set_phase(unit.stem, "queued")
                raise
            except Exception as exc:
                if is_disk_full(exc):
                    await self._pause(entry, unit, exc)
                    return
                if isinstance(exc, OSError):  # where a job's OSError joins the tree
                    error = TransientIOError.from_os_error(exc, pair.micrograph.path)
                    await self._failed(entry, running, pair, error)
                    return
                await self._failed(entry, running, pair, exc)
                return
            processed = time.monotonic()
            for message in self.job_warnings.report(result):
                self._events.emit(
                    WarningEvent(session=self.session, message=message, code=warning_code(message))
                )
            if entry.unit is not running:  # newer inputs arrived meanwhile
                await asyncio.to_thread(discard_job, result)
                await journal.call(journal.journal.set_state, unit.id, "superseded")
                return
            self._committing.add(unit.id)
            try:
                outcome = await journal.call(self.committer.commit, running, result, group)
            except Exception as exc:
                await asyncio.to_thread(discard_job, result)
                if is_disk_full(exc):
                    await self._pause(entry, unit, exc)
                    return
                failure: Exception = exc
                if isinstance(exc, OSError):  # where a commit's OSError joins the tree
                    failure = TransientIOError.from_os_error(exc, pair.micrograph.path)
                await self._failed(entry, running, pair, failure)
                return
            finally:
                self._committing.discard(unit.id)
            self._committed(entry, running, pair, result, outcome, submitted, processed)
        except Exception as exc:  # one unit's trouble never ends the runner
            if is_disk_full(exc):
                await self._pause(entry, unit, exc)
            else:
                log.error("%s: internal error", pair.micrograph.path, exc_info=exc)
        finally:
            self._running.pop(unit.id, None)
            self._ready.wake()

    def job_timeout(self, pair: Pair) -> float:
        """Seconds a job may take: ``[executor] job_timeout_seconds`` per 256 MiB of
        micrograph, at least once."""
        scale = max(1.0, pair.micrograph.size / JOB_TIMEOUT_BYTES)
        return self.config.executor.job_timeout_seconds * scale

    async def _submit(self, job: MicrographJob, pair: Pair) -> JobResult:
        """Run ``job``; past its timeout, abandon it (the executor stops and replaces its
        worker) and raise :class:`~flybox.errors.JobTimeoutError`."""
        future = self.executor.submit(job)
        limit = self.job_timeout(pair)
        try:
            done, _ = await asyncio.wait({future}, timeout=limit)
        except asyncio.CancelledError:
            future.cancel()
            raise
        if not done:
            log.warning(
                "%s: no result after %.0f s (job_timeout_seconds); its worker is stopped and "
                "replaced",
                shown(pair.micrograph.path),
                limit,
            )
            self.executor.abandon(future)
            raise JobTimeoutError(
                f"no result within {limit:.0f} s (job_timeout_seconds); worker replaced"
            )
        return future.result()

    def _committed(
        self,
        entry: StemState,
        unit: UnitRecord,
        pair: Pair,
        result: JobResult,
        outcome: CommitOutcome,
        submitted: float,
        processed: float,
    ) -> None:
        now = time.monotonic()
        if entry.unit is unit:  # else a newer version is queued: the stem stays in progress
            entry.unit = replace(unit, state="done")
            entry.pair = None
            self._release_picks(unit.stem)
            self._state.set_phase(unit.stem, "done")
        self._progress.committed(result.particles, processed - submitted)
        for stream, update in outcome.streams.items():
            self._progress.particles[stream] = update.particles
        origin = entry.micrograph_at if unit.version == 1 else entry.touched_at
        origin = min(origin, entry.ready_at)
        particles = {s: o.count for s, o in result.streams.items()}
        latency = now - origin
        self._events.emit(
            MicrographEvent(
                session=self.session,
                name=unit.stem,
                path=pair.micrograph.path,
                version=unit.version,
                picks=result.picks,
                particles=particles,
                excluded_border=result.excluded,
                quality=quality_of(result, pair),
                latency_seconds=latency,
                pick_origins=pick_origins(result),
                model_version=unit.inputs.get("autopick_model")
                if pair.coordinates.path == AUTOPICK
                else None,
                stages={
                    "wait": entry.ready_at - origin,
                    "queue": submitted - entry.ready_at,
                    "process": processed - submitted,
                    "commit": outcome.seconds,
                },
            )
        )
        for update in outcome.streams.values():
            self._events.emit(
                OutputSetEvent(
                    session=self.session,
                    stream=update.stream,
                    path=update.path,
                    particles=update.particles,
                    micrographs=update.micrographs,
                )
            )
        log.info(
            "%s: committed version %d: %s; %d excluded at the border; latency %.2f s",
            unit.stem,
            unit.version,
            ", ".join(f"{s} {n}" for s, n in particles.items()),
            result.excluded,
            latency,
        )

    async def _pause(self, entry: StemState, unit: UnitRecord, error: BaseException) -> None:
        """The disk is full: hand the unit back (no attempt counted) and stop submitting until
        the space probe succeeds."""
        journal = self._journal
        with contextlib.suppress(Exception):  # the journal may be full too: recover() requeues
            await journal.call(journal.journal.set_state, unit.id, "queued")
        if entry.unit is not None and entry.unit.id == unit.id:
            entry.unit = replace(unit, state="queued")
            self._state.set_phase(unit.stem, "queued")
            self._paused[unit.stem] = None
        self._disk.report(error)

    def _announce_full(self) -> None:
        disk = self._disk
        disk.announced = True
        log.error(
            "%s: disk full (%s): committing stops; resuming by itself when space returns",
            self.output_dir,
            disk.problem,
        )
        self._events.emit(
            AlertEvent(
                session=self.session,
                rule="disk_full",
                active=True,
                message=f"{self.output_dir}: disk full; committing stopped ({disk.problem})",
            )
        )
        self._state.mark_dirty()

    def _probe_space(self) -> None:
        """Write, sync and remove a small file in the output folder, and write the journal
        (blocking; raises the ``OSError``/SQLite error while the disk is still full)."""
        probe = self.output_dir / ".flybox" / ".space-probe.tmp"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * SPACE_PROBE_BYTES)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
        self._journal.journal.set_meta("space_probe", str(time.time()))

    async def _space_loop(self) -> None:
        """While the disk is full: probe with backoff; resume when a probe succeeds."""
        first, longest = SPACE_PROBE_SECONDS
        while True:
            await self._disk.wake.wait()
            self._disk.wake.clear()
            if self._disk.full and not self._disk.announced:
                self._announce_full()
            delay = first
            while self._disk.full:
                await asyncio.sleep(delay)
                try:
                    await self._journal.call(self._probe_space)
                except Exception as exc:
                    if not is_disk_full(exc):
                        log.warning("%s: space probe failed: %s", self.output_dir, exc)
                    delay = min(delay * 2, longest)
                    continue
                self._resume()

    def _resume(self) -> None:
        disk = self._disk
        waited = time.monotonic() - disk.since
        disk.full = disk.announced = False
        log.info(
            "%s: space again after %.0f s; committing resumes (%d micrographs waiting)",
            self.output_dir,
            waited,
            len(self._paused),
        )
        self._events.emit(
            AlertEvent(
                session=self.session,
                rule="disk_full",
                active=False,
                message=f"{self.output_dir}: space again; committing resumed",
                value=waited,
            )
        )
        self._state.mark_dirty()
        paused, self._paused = self._paused, {}
        for stem in paused:
            self._ready.put(stem)
        self._ready.wake()

    async def _failed(
        self, entry: StemState, unit: UnitRecord, pair: Pair, error: BaseException
    ) -> None:
        try:
            await self._settle_failure(entry, unit, pair, error)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            await self._pause(entry, unit, exc)

    async def _settle_failure(
        self, entry: StemState, unit: UnitRecord, pair: Pair, error: BaseException
    ) -> None:
        journal = self._journal
        if isinstance(error, InputError):
            kind: InputKind = "coordinates" if error.path == pair.coordinates.path else "micrograph"
            code = "bad_coordinates" if kind == "coordinates" else "bad_micrograph"
            await journal.call(
                journal.journal.set_state, unit.id, "quarantined", error=str(error), code=code
            )
            await self._on_quarantine(error.path, kind, error.problem, code)
            if entry.unit is unit:
                entry.unit = replace(unit, state="quarantined")
                self._state.set_phase(unit.stem, "quarantined")
            return
        if isinstance(error, JobTimeoutError):
            code, reason = "job_timeout", str(error)
        elif isinstance(error, WorkerLostError):
            code, reason = "worker_crash", str(error)
        elif isinstance(error, TransientIOError):
            code, reason = "io_error", error.problem
        elif isinstance(error, ProcessingError | FlyboxError):
            code, reason = "processing", getattr(error, "problem", str(error))
        else:
            code, reason = "internal", f"{type(error).__name__}: {error}"
            log.error("%s: internal error", pair.micrograph.path, exc_info=error)
        retry = code in ("worker_crash", "job_timeout", "io_error")
        if retry and unit.attempts < self.config.executor.max_attempts:
            log.warning(
                "%s: attempt %d failed (%s); trying again",
                pair.micrograph.path,
                unit.attempts,
                reason,
            )
            await journal.call(
                journal.journal.set_state, unit.id, "queued", error=reason, code=code
            )
            if entry.unit is unit:
                entry.unit = replace(unit, state="queued")
                self._state.set_phase(unit.stem, "queued")
                self._ready.put(unit.stem)
            return
        await journal.call(journal.journal.set_state, unit.id, "failed", error=reason, code=code)
        if entry.unit is unit:
            entry.unit = replace(unit, state="failed")
            self._state.set_phase(unit.stem, "failed")
        log.error("%s: failed: %s", pair.micrograph.path, reason)
        self._events.emit(
            FailureEvent(
                session=self.session,
                path=pair.micrograph.path,
                reason=reason,
                attempts=unit.attempts,
                code=code,
            )
        )
