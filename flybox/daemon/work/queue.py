"""Running units: the bounded ready queue, submission, commit and the per-micrograph events.

The journal holds the real queue (every ``queued`` unit); in memory the runner keeps the
stems that are ready, in arrival order, and submits while fewer than ``2 × workers`` units
are in flight, so that workers never wait for the service and memory never grows with a
backlog (the watcher keeps discovering meanwhile). When a unit's result comes back it is
committed on the journal thread (:class:`~flybox.daemon.work.commit.Committer`), unless newer
inputs superseded it meanwhile (its temporary files are then discarded).

Outcomes: bad input found by the worker → the input is quarantined; a worker that died or an
I/O error → retried up to ``[executor] max_attempts`` times, then ``failed``; a processing
error (e.g. box larger than the micrograph) → ``failed`` at once. None of them stops the
service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from flybox.daemon.intake.complete import InputKind
from flybox.daemon.intake.pairing import Pair
from flybox.daemon.telemetry.events import FailureEvent, MicrographEvent, OutputSetEvent, Quality
from flybox.daemon.work.executor import Executor, WorkerLostError
from flybox.errors import FlyboxError, InputError, ProcessingError
from flybox.pipeline.job import JobResult, MicrographJob, discard_job
from flybox.types import OpticsGroup

if TYPE_CHECKING:
    from flybox.daemon.service import Service, StemState
    from flybox.daemon.work.commit import CommitOutcome
    from flybox.daemon.work.journal import UnitRecord

__all__ = ["UnitRunner", "quality_of"]

log = logging.getLogger(__name__)


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
    )


class UnitRunner:
    """Submits ready units to the executor and commits their results.

    Parameters
    ----------
    service
        The service (its journal, committer, progress and bus).
    executor
        Where jobs run.
    """

    def __init__(self, service: Service, executor: Executor) -> None:
        self.service = service
        self.executor = executor
        self.limit = 2 * max(executor.workers, 1)
        self._ready: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._committing: set[int] = set()

    @property
    def in_flight(self) -> int:
        """Units submitted and not yet finished."""
        return len(self._running)

    def enqueue(self, stem: str) -> None:
        """A stem's unit is queued: run it when a slot is free."""
        self._ready[stem] = None
        self._wake.set()

    async def schedule_loop(self) -> None:
        """Submit ready units while fewer than :attr:`limit` are in flight."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready and len(self._running) < self.limit:
                stem = next(iter(self._ready))
                del self._ready[stem]
                entry = self.service.stems.get(stem)
                if entry is None or entry.unit is None or entry.pair is None:
                    continue
                if entry.unit.state != "queued" or entry.unit.id in self._running:
                    continue
                tasks = self.service.task_group
                assert tasks is not None
                self._running[entry.unit.id] = tasks.create_task(
                    self._run(entry, entry.unit, entry.pair), name=f"unit-{stem}"
                )

    async def drain(self, timeout: float, force: asyncio.Event) -> None:
        """Stop submitting; give in-flight units ``timeout`` seconds (less once ``force`` is
        set) to finish and commit; hand the others back (they stay queued)."""
        self._ready.clear()
        if self._running:
            log.info("draining: up to %.0f s for %d micrographs in flight", timeout, self.in_flight)
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline and not force.is_set():
            await asyncio.wait(list(self._running.values()), timeout=0.2)
        for unit_id, task in list(self._running.items()):
            if unit_id not in self._committing:
                task.cancel()
        if self._running:
            await asyncio.wait(list(self._running.values()))

    def _job(self, pair: Pair, group: OpticsGroup) -> MicrographJob:
        config = self.service.config
        return MicrographJob(
            micrograph=pair.micrograph.path,
            name=pair.micrograph.path,
            output_dir=str(self.service.output_dir),
            chain=self.service.chain.spec,
            picks=pair.coordinates.picks,
            coordinates=pair.coordinates.path if pair.coordinates.picks is None else None,
            ctf=pair.ctf,
            optics=group,
            pixel_size_a=config.micrograph.pixel_size,
            picking_pixel_size_a=config.micrograph.picking_pixel_size,
            float16=config.output.float16,
            project_dir=str(self.service.project_dir),
            stem=pair.stem,
        )

    def _optics(self, pair: Pair) -> OpticsGroup:
        return OpticsGroup.from_ctf(pair.ctf, self.service.config.micrograph.pixel_size)

    async def _run(self, entry: StemState, unit: UnitRecord, pair: Pair) -> None:
        service = self.service
        journal = service.journal
        assert journal is not None
        running = replace(unit, state="running", attempts=unit.attempts + 1)
        entry.unit = running
        service.set_phase(unit.stem, "running")
        submitted = time.monotonic()
        group = self._optics(pair)
        try:
            try:
                await service.journal_call(journal.set_state, unit.id, "running", attempt=True)
                result = await self.executor.submit(self._job(pair, group))
            except asyncio.CancelledError:
                if entry.unit is running:
                    entry.unit = replace(running, state="queued")
                    service.set_phase(unit.stem, "queued")
                raise
            except Exception as exc:
                await self._failed(entry, running, pair, exc)
                return
            processed = time.monotonic()
            service.job_warnings.report(result)
            if entry.unit is not running:  # newer inputs arrived meanwhile
                await asyncio.to_thread(discard_job, result)
                await service.journal_call(journal.set_state, unit.id, "superseded")
                return
            self._committing.add(unit.id)
            try:
                outcome = await service.journal_call(
                    service.committer.commit, running, result, group
                )
            except OSError as exc:
                await asyncio.to_thread(discard_job, result)
                await self._failed(entry, running, pair, exc)
                return
            finally:
                self._committing.discard(unit.id)
            self._committed(entry, running, pair, result, outcome, submitted, processed)
        finally:
            self._running.pop(unit.id, None)
            self._wake.set()

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
        service = self.service
        now = time.monotonic()
        if entry.unit is unit:  # else a newer version is queued: the stem stays in progress
            entry.unit = replace(unit, state="done")
            entry.pair = None
            service.intake.pairing.release_picks(unit.stem)
            service.set_phase(unit.stem, "done")
        service.progress.committed(result.particles, processed - submitted)
        for stream, update in outcome.streams.items():
            service.progress.particles[stream] = update.particles
        origin = entry.micrograph_at if unit.version == 1 else entry.touched_at
        origin = min(origin, entry.ready_at)
        particles = {s: o.count for s, o in result.streams.items()}
        latency = now - origin
        service.bus.publish(
            MicrographEvent(
                session=service.session,
                name=unit.stem,
                path=pair.micrograph.path,
                version=unit.version,
                picks=result.picks,
                particles=particles,
                excluded_border=result.excluded,
                quality=quality_of(result, pair),
                latency_seconds=latency,
                stages={
                    "wait": entry.ready_at - origin,
                    "queue": submitted - entry.ready_at,
                    "process": processed - submitted,
                    "commit": outcome.seconds,
                },
            )
        )
        for update in outcome.streams.values():
            service.bus.publish(
                OutputSetEvent(
                    session=service.session,
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

    async def _failed(
        self, entry: StemState, unit: UnitRecord, pair: Pair, error: BaseException
    ) -> None:
        service = self.service
        journal = service.journal
        assert journal is not None
        if isinstance(error, InputError):
            kind: InputKind = "coordinates" if error.path == pair.coordinates.path else "micrograph"
            code = "bad_coordinates" if kind == "coordinates" else "bad_micrograph"
            await service.journal_call(
                journal.set_state, unit.id, "quarantined", error=str(error), code=code
            )
            await service.intake.quarantine(error.path, kind, error.problem, code)
            if entry.unit is unit:
                entry.unit = replace(unit, state="quarantined")
                service.set_phase(unit.stem, "quarantined")
            return
        if isinstance(error, WorkerLostError):
            code, reason = "worker_crash", str(error)
        elif isinstance(error, OSError):
            code, reason = "io_error", f"{type(error).__name__}: {error}"
        elif isinstance(error, ProcessingError | FlyboxError):
            code, reason = "processing", getattr(error, "problem", str(error))
        else:
            code, reason = "internal", f"{type(error).__name__}: {error}"
            log.error("%s: internal error", pair.micrograph.path, exc_info=error)
        retry = code in ("worker_crash", "io_error")
        if retry and unit.attempts < service.config.executor.max_attempts:
            log.warning(
                "%s: attempt %d failed (%s); trying again",
                pair.micrograph.path,
                unit.attempts,
                reason,
            )
            await service.journal_call(
                journal.set_state, unit.id, "queued", error=reason, code=code
            )
            if entry.unit is unit:
                entry.unit = replace(unit, state="queued")
                service.set_phase(unit.stem, "queued")
                self.enqueue(unit.stem)
            return
        await service.journal_call(journal.set_state, unit.id, "failed", error=reason, code=code)
        if entry.unit is unit:
            entry.unit = replace(unit, state="failed")
            service.set_phase(unit.stem, "failed")
        log.error("%s: failed: %s", pair.micrograph.path, reason)
        service.bus.publish(
            FailureEvent(
                session=service.session,
                path=pair.micrograph.path,
                reason=reason,
                attempts=unit.attempts,
                code=code,
            )
        )
