"""Crash-safe file writing: temporary name in the same folder, fsync, rename.

A file written through this module is either absent or complete under its final name; a crash
or an exception leaves at most a dot-prefixed ``*.tmp`` file, which folder watchers ignore
(DESIGN.md §2, STYLE.md practice 9).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_directory", "rename_into_place", "temp_path_for"]

#: errno values with which some file systems refuse to fsync a directory; harmless to skip.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES}


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """Return a fresh temporary name beside ``path``.

    The name is ``.{name}.{random}.tmp`` in the same folder, so that a rename onto ``path`` stays
    on one file system and folder watchers skip the file (dot-prefixed, ``.tmp`` suffix).

    Parameters
    ----------
    path
        The final path the temporary file will be renamed to.

    Returns
    -------
    Path
        A path that does not collide with other writers (48 random bits).
    """
    final = Path(path)
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, creations) to stable storage.

    Parameters
    ----------
    path
        The folder. File systems that cannot fsync a folder are silently skipped.
    """
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(os.fspath(path), flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def rename_into_place(temp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Commit a completely written temporary file under its final name.

    Flushes ``temp`` to disk, renames it onto ``final`` (atomically replacing any old file) and
    flushes the folder entry, so that after a crash ``final`` is either the old or the new file.

    Parameters
    ----------
    temp
        The finished file, normally named by :func:`temp_path_for`.
    final
        Its final path; must be on the same file system as ``temp``.
    """
    temp_path, final_path = Path(temp), Path(final)
    fd = os.open(temp_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp_path, final_path)
    fsync_directory(final_path.parent)
    if temp_path.parent.resolve() != final_path.parent.resolve():
        fsync_directory(temp_path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` only when the block succeeds.

    On a normal exit the file is flushed, fsynced, renamed onto ``path`` and the folder is
    fsynced. On an exception the temporary file is removed and the exception propagates;
    ``path`` is untouched.

    Parameters
    ----------
    path
        Final path of the file.
    mode
        ``"wb"`` (binary, the default) or ``"w"`` (text).
    encoding
        Text encoding for ``mode="w"``; newlines are always written as ``\\n``.

    Yields
    ------
    IO
        The open temporary file.

    Examples
    --------
    >>> with atomic_write("out.star", "w") as fh:  # doctest: +SKIP
    ...     fh.write(text)
    """
    if mode not in {"wb", "w"}:
        raise ValueError(f"atomic_write supports modes 'wb' and 'w', not {mode!r}")
    final = Path(path)
    temp = temp_path_for(final)
    # O_EXCL: never clobber another writer's temp file; 0o666 lets the umask decide permissions.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if mode == "wb":
            fh: IO[Any] = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding=encoding, newline="\n")
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(final.parent)
