"""The state the daemon's stages share: stems, status counts, the journal thread, the ready
queue; and the exception tree's retry classes."""

from __future__ import annotations

import asyncio
import errno
import pickle
import threading
from pathlib import Path

import pytest

from flybox.daemon.state import JournalThread, SessionState
from flybox.daemon.telemetry.progress import Progress
from flybox.daemon.work.queue import ReadyQueue
from flybox.errors import (
    DuplicateStemError,
    FileChangedError,
    FlyboxError,
    InputError,
    TextParseError,
    TransientError,
    TransientIOError,
    WorkerLostError,
)


def test_set_phase_counts_the_stem_and_marks_a_status_due() -> None:
    state = SessionState(Progress("s", ["particles"], 1))
    assert not state.status_dirty
    state.set_phase("m1", "queued")
    assert state.status_dirty
    assert state.progress.phase("m1") == "queued"
    assert state.stem("m1") is state.stem("m1")
    assert list(state.stems) == ["m1"]


async def test_journal_calls_run_in_order_on_one_thread_and_the_journal_closes(
    tmp_path: Path,
) -> None:
    threads: list[str] = []
    path = tmp_path / ".flybox" / "journal.sqlite"
    path.parent.mkdir()
    async with JournalThread(path) as thread:
        for _ in range(3):
            await thread.call(lambda: threads.append(threading.current_thread().name))
        await thread.call(thread.journal.set_meta, "k", "v")
        assert await thread.call(thread.journal.get_meta, "k") == "v"
    assert len(set(threads)) == 1
    assert threads[0].startswith("flybox-journal")
    with pytest.raises(RuntimeError, match="not open"):
        thread.journal  # noqa: B018
    with pytest.raises(RuntimeError, match="not running"):
        await thread.call(print)


async def test_ready_queue_keeps_arrival_order_and_each_stem_once() -> None:
    ready = ReadyQueue()
    for stem in ("b", "a", "b", "c"):
        ready.put(stem)
    async with asyncio.timeout(1):
        await ready.changed()
    assert len(ready) == 3
    assert [ready.pop() for _ in range(3)] == ["b", "a", "c"]
    ready.put("d")
    ready.clear()
    assert len(ready) == 0


def test_retryable_errors_share_one_branch_of_the_tree() -> None:
    assert issubclass(TransientError, FlyboxError)
    for kind in (TransientIOError, FileChangedError, WorkerLostError):
        assert issubclass(kind, TransientError)
        assert not issubclass(kind, InputError)
    for kind in (TextParseError, DuplicateStemError):
        assert issubclass(kind, InputError)


def test_an_os_error_becomes_a_transient_io_error_keeping_its_text() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/out/m1.mrcs")
    error = TransientIOError.from_os_error(full, "/in/m1.mrc")
    assert error.path == "/out/m1.mrcs"
    assert error.problem == f"OSError: {full}"
    bare = TransientIOError.from_os_error(OSError("short read"), "/in/m1.mrc")
    assert (bare.path, bare.problem) == ("/in/m1.mrc", "OSError: short read")


@pytest.mark.parametrize(
    "error",
    [
        WorkerLostError("worker process died: boom"),
        TextParseError("/in/m1.star", "cannot read: x", "bad_coordinates"),
        DuplicateStemError("/b/m1.mrc", "/a/m1.mrc"),
        FileChangedError("/in/m1.mrc"),
        TransientIOError("/in/m1.mrc", "OSError: x"),
    ],
)
def test_errors_keep_their_attributes_across_processes(error: FlyboxError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_a_duplicate_stem_says_what_collides() -> None:
    error = DuplicateStemError("/b/m1.mrc", "/a/m1.mrc")
    assert error.problem == "same file name as /a/m1.mrc: outputs would collide"
    assert (error.path, error.other) == ("/b/m1.mrc", "/a/m1.mrc")
