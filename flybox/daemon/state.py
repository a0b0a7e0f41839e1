"""What the service's stages share, passed to each one explicitly.

* :class:`SessionState`: the per-micrograph view (:class:`StemState`) and the status counts
  (:class:`~flybox.daemon.telemetry.progress.Progress`) that intake and work both update, and
  whether a status event is due;
* :class:`JournalThread`: the journal and the one thread that runs its calls and the commits,
  in order (SQLite connections stay on the thread that made them; commits never block the
  event loop);
* :class:`Heartbeats`: each long-running loop (intake, work, journal/commit) beats once per
  turn; a loop whose last beat is too old is *stalled* (``/healthz`` says which);
* :class:`DiskSpace`: whether the output's file system is full (commits wait, with backoff,
  and resume by themselves when a write succeeds again).

Neither knows about the service or the stages: the stages are given these objects and the
callbacks they may call (see :mod:`flybox.daemon.service`, which wires them).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flybox.daemon.intake.pairing import Pair
from flybox.daemon.telemetry.progress import Phase, Progress
from flybox.daemon.work.journal import Journal, UnitRecord

__all__ = [
    "DiskSpace",
    "Heartbeats",
    "JournalThread",
    "SessionState",
    "StemState",
    "is_disk_full",
]

T = TypeVar("T")


@dataclass
class StemState:
    """The service's view of one micrograph (stem)."""

    stem: str
    unit: UnitRecord | None = None
    pair: Pair | None = None
    micrograph_at: float = 0.0
    touched_at: float = 0.0
    ready_at: float = 0.0


class SessionState:
    """The stems and status counts of one session, shared by intake and work.

    Parameters
    ----------
    progress
        The status counts (phases, rates, particles).
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.stems: dict[str, StemState] = {}
        #: Whether the output's file system is full (the work stage pauses commits).
        self.disk = DiskSpace()
        #: A change not yet in a status event (the service's status loop emits one soon).
        self.status_dirty = False

    def stem(self, stem: str) -> StemState:
        """The state of a stem (created on first use)."""
        return self.stems.setdefault(stem, StemState(stem))

    def mark_dirty(self) -> None:
        """Something changed: a status event is due within a second."""
        self.status_dirty = True

    def set_phase(self, stem: str, phase: Phase | None) -> None:
        """Move a stem to a phase (status counts)."""
        self.progress.set_phase(stem, phase)
        self.mark_dirty()


class JournalThread:
    """The journal, opened and used on one thread of its own; an async context manager.

    Parameters
    ----------
    path
        The journal's SQLite file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread: ThreadPoolExecutor | None = None
        self._journal: Journal | None = None

    @property
    def journal(self) -> Journal:
        """The open journal (call its methods through :meth:`call`)."""
        if self._journal is None:
            raise RuntimeError("the journal is not open")
        return self._journal

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``function(*args, **kwargs)`` on the journal thread (calls run in order)."""
        if self._thread is None:
            raise RuntimeError("the journal thread is not running")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, functools.partial(function, *args, **kwargs)
        )

    async def __aenter__(self) -> JournalThread:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="flybox-journal")
        try:
            self._journal = await self.call(Journal, self.path)
        except BaseException:
            self._close_thread()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        journal, self._journal = self._journal, None
        try:
            if journal is not None:
                journal.close()
        finally:
            self._close_thread()

    def _close_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=True)


class Heartbeats:
    """The last beat of each long-running loop, and which of them are stalled.

    Each loop calls :meth:`beat` once per turn (a loop that waits for work waits with a
    timeout, so an idle loop beats too). A loop that has not beaten for its ``stall_after``
    seconds is stuck (a read that never returns, a hung file system).
    """

    def __init__(self, stall_seconds: float = 120.0) -> None:
        #: A loop is stalled after this long without a beat (unless it registers its own).
        self.stall_seconds = stall_seconds
        self._last: dict[str, float] = {}
        self._limits: dict[str, float] = {}

    def register(self, name: str, stall_after: float | None = None) -> None:
        """Start watching a loop (counts as a beat now); stalled after ``stall_after``
        seconds without a beat (default :attr:`stall_seconds`)."""
        self._limits[name] = self.stall_seconds if stall_after is None else stall_after
        self._last[name] = time.monotonic()

    def unregister(self, name: str) -> None:
        """Stop watching a loop (it ended on purpose)."""
        self._limits.pop(name, None)
        self._last.pop(name, None)

    def beat(self, name: str) -> None:
        """The loop ``name`` made progress."""
        self._last[name] = time.monotonic()

    def stalled(self, now: float | None = None) -> dict[str, float]:
        """The stalled loops and how long since each beat (seconds), by name."""
        now = time.monotonic() if now is None else now
        return {
            name: now - self._last[name]
            for name, limit in sorted(self._limits.items())
            if now - self._last[name] > limit
        }

    def health(self) -> tuple[bool, str]:
        """``(healthy, one line)`` for ``/healthz``."""
        stalled = self.stalled()
        if not stalled:
            return True, "ok"
        return False, "stalled: " + ", ".join(
            f"{name} (no progress for {age:.0f} s)" for name, age in stalled.items()
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether an error means the file system (or a quota) is full: ``ENOSPC``/``EDQUOT``,
    or SQLite's "database or disk is full"."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(error, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(error)
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and is_disk_full(cause)


class DiskSpace:
    """Whether the output's file system is full (set by the work stage, read by status).

    Attributes
    ----------
    full
        Writes fail for lack of space; commits wait.
    problem
        The last error, in words.
    since
        When it became full (monotonic seconds).
    """

    def __init__(self) -> None:
        self.full = False
        self.problem = ""
        self.since = 0.0
        self.episodes = 0
        #: Whether this episode was announced (log line, alert event).
        self.announced = False
        #: Set when the disk became full (the work stage's space probe waits on it).
        self.wake = asyncio.Event()

    def report(self, error: BaseException) -> None:
        """A write failed for lack of space (any stage): commits wait until a probe passes."""
        self.problem = f"{type(error).__name__}: {error}"
        if not self.full:
            self.full = True
            self.since = time.monotonic()
            self.episodes += 1
        self.wake.set()
