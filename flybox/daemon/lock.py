"""One service per output folder: an exclusive lock on ``OUTPUT/.flybox/lock``.

Two services writing one output folder would each append to the cumulative STAR files and
journal from their own view and lose particles. The first service takes an exclusive
``flock`` on ``OUTPUT/.flybox/lock`` for its whole life (the kernel releases it when the
process dies, however it dies, so a stale lock never blocks a restart) and writes who holds
it (pid, host, start time) into the file. A second start is refused with one line naming the
holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from flybox.errors import ConfigError

__all__ = ["OutputLock", "OutputLockedError"]


class OutputLockedError(ConfigError):
    """Another process holds the output folder's lock (the service refuses to start)."""


class OutputLock:
    """The exclusive lock on an output folder; a context manager (blocking, quick).

    Parameters
    ----------
    output_dir
        The output folder (``.flybox/lock`` is created in it).
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".flybox" / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputLockedError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputLockedError(
                "session.output",
                f"{self.path.parent.parent} is in use by another flybox service ({holder}); "
                "one output folder takes one service",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent); the file stays (it names the last holder)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _describe(content: bytes) -> str:
    try:
        holder = json.loads(content.decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
