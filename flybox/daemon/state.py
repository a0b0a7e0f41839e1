"""What the service's stages share, passed to each one explicitly.

* :class:`SessionState`: the per-micrograph view (:class:`StemState`) and the status counts
  (:class:`~flybox.daemon.telemetry.progress.Progress`) that intake and work both update, and
  whether a status event is due;
* :class:`JournalThread`: the journal and the one thread that runs its calls and the commits,
  in order (SQLite connections stay on the thread that made them; commits never block the
  event loop).

Neither knows about the service or the stages: the stages are given these objects and the
callbacks they may call (see :mod:`flybox.daemon.service`, which wires them).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flybox.daemon.intake.pairing import Pair
from flybox.daemon.telemetry.progress import Phase, Progress
from flybox.daemon.work.journal import Journal, UnitRecord

__all__ = ["JournalThread", "SessionState", "StemState"]

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
