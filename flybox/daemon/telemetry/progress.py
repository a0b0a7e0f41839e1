"""Counts, rates and backlog of a session: what a
:class:`~flybox.daemon.telemetry.events.StatusEvent`
says.

Each micrograph (stem) is in one phase: ``waiting`` (complete, waiting for coordinates or CTF),
``queued``, ``running``, ``done``, ``failed`` or ``quarantined``. Rates are over the last hour
(extrapolated while the service has run for less). The backlog is what is queued or running;
its processing time is the recent mean processing time × backlog / workers, and the catch-up
time is the backlog over the margin between capacity (workers / mean processing time) and the
arrival rate of the last ten minutes (``None`` when arrivals outpace the workers).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Literal

from flybox import __version__
from flybox.daemon.telemetry.events import (
    Backlog,
    Counts,
    ExecutorStatus,
    Rates,
    ServiceState,
    StatusEvent,
)

__all__ = ["Phase", "Progress"]

Phase = Literal["waiting", "queued", "running", "done", "failed", "quarantined"]

_HOUR = 3600.0
_ARRIVAL_WINDOW = 600.0


class Progress:
    """Session counters (used on the event loop only).

    Parameters
    ----------
    session
        The session name.
    streams
        The chain's streams (particle counts start at 0 for each).
    workers
        Parallel workers (for the backlog estimate).
    clock
        Monotonic clock in seconds.
    """

    def __init__(
        self,
        session: str,
        streams: Iterable[str],
        workers: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.workers = max(workers, 1)
        self.clock = clock
        self.started = clock()
        self.particles: dict[str, int] = dict.fromkeys(streams, 0)
        self.seen = 0
        self._phase: dict[str, Phase] = {}
        self._counts: collections.Counter[Phase] = collections.Counter()
        self._commits: collections.deque[tuple[float, int]] = collections.deque()
        self._arrivals: collections.deque[float] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=50)
        #: Where the work runs, read at each snapshot (set by the service once it has an
        #: executor).
        self.executor: Callable[[], ExecutorStatus] = ExecutorStatus

    def phase(self, stem: str) -> Phase | None:
        """A stem's phase."""
        return self._phase.get(stem)

    def set_phase(self, stem: str, phase: Phase | None) -> None:
        """Move a stem to a phase (``None``: forget it)."""
        old = self._phase.pop(stem, None)
        if old is not None:
            self._counts[old] -= 1
        if phase is not None:
            self._phase[stem] = phase
            self._counts[phase] += 1

    def count(self, phase: Phase) -> int:
        """How many stems are in a phase."""
        return self._counts[phase]

    def arrived(self) -> None:
        """A micrograph became complete."""
        self._arrivals.append(self.clock())

    def committed(self, particles: int, process_seconds: float) -> None:
        """A micrograph was committed with ``particles`` particles (per stream)."""
        self._commits.append((self.clock(), particles))
        self._durations.append(process_seconds)

    def _trim(self, now: float) -> None:
        while self._commits and now - self._commits[0][0] > _HOUR:
            self._commits.popleft()
        while self._arrivals and now - self._arrivals[0] > _ARRIVAL_WINDOW:
            self._arrivals.popleft()

    def rates(self) -> Rates:
        """Micrographs and particles per hour over the last hour."""
        now = self.clock()
        self._trim(now)
        window = max(min(now - self.started, _HOUR), 60.0)
        scale = _HOUR / window
        return Rates(
            micrographs_per_hour=len(self._commits) * scale,
            particles_per_hour=sum(p for _, p in self._commits) * scale,
        )

    def backlog(self) -> Backlog:
        """Queued + running micrographs and the time they should take."""
        now = self.clock()
        self._trim(now)
        pending = self._counts["queued"] + self._counts["running"]
        if not self._durations:
            return Backlog(
                micrographs=pending, seconds=0.0, catch_up_seconds=0.0 if not pending else None
            )
        mean = sum(self._durations) / len(self._durations)
        seconds = mean * pending / self.workers
        capacity = self.workers / mean if mean > 0 else float("inf")
        window = max(min(now - self.started, _ARRIVAL_WINDOW), 60.0)
        arrival = len(self._arrivals) / window
        if pending == 0:
            catch_up: float | None = 0.0
        elif capacity > arrival:
            catch_up = pending / (capacity - arrival)
        else:
            catch_up = None
        return Backlog(micrographs=pending, seconds=seconds, catch_up_seconds=catch_up)

    def snapshot(self, state: ServiceState) -> StatusEvent:
        """The status now."""
        return StatusEvent(
            session=self.session,
            state=state,
            counts=Counts(
                seen=self.seen,
                waiting=self._counts["waiting"],
                queued=self._counts["queued"],
                running=self._counts["running"],
                done=self._counts["done"],
                failed=self._counts["failed"],
                quarantined=self._counts["quarantined"],
            ),
            particles=dict(self.particles),
            rates=self.rates(),
            backlog=self.backlog(),
            version=__version__,
            executor=self.executor(),
        )

    def line(self) -> str:
        """A one-line summary (systemd STATUS, logs)."""
        parts = [
            f"{self._counts['done']} done",
            f"{self._counts['queued'] + self._counts['running']} in progress",
            f"{self._counts['waiting']} waiting",
        ]
        if self._counts["failed"]:
            parts.append(f"{self._counts['failed']} failed")
        if self._counts["quarantined"]:
            parts.append(f"{self._counts['quarantined']} quarantined")
        particles = ", ".join(f"{s} {n}" for s, n in self.particles.items())
        return "; ".join(parts) + (f"; particles: {particles}" if particles else "")
