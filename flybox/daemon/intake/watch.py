"""Which input files exist, and which changed (DESIGN.md §2, FIELD.md §10.1).

Two sources, because neither is enough alone:

* a **reconciliation scan** (``os.scandir``, recursive, glob matching) is the truth: it lists
  every matching file with its signature, every ``rescan_seconds`` — or, in ``mode = "poll"``
  (NFS/SMB, where inotify does not see other hosts' writes), every ``poll_seconds``;
* in ``mode = "auto"``, **inotify events** (watchdog observer threads) are hints that make the
  service look at a file at once instead of at the next scan.

Temporary names are never inputs: names starting with ``.``, ending in ``.tmp``, or containing
``downloading`` (Falcon/EPU transfers), and dot folders are not entered.

Globs: ``*`` and ``?`` match within one path component, ``[...]`` a character class, and a
``**`` component any number of folders (also none), as :func:`glob.glob` with
``recursive=True``. Relative patterns are taken from the current folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from flybox.daemon.intake.complete import InputKind, Signature, signature_of

__all__ = ["WatchPattern", "WatchUpdate", "Watcher", "compile_pattern", "is_temporary", "scan"]

log = logging.getLogger(__name__)

_MAGIC = re.compile(r"[*?\[]")
#: inotify event types that can mean new content (reads by our own workers are ignored).
_CONTENT_EVENTS = {"created", "modified", "moved", "deleted", "closed"}


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary name that is never an input."""
    return name.startswith(".") or name.endswith(".tmp") or "downloading" in name.lower()


@dataclass(frozen=True)
class WatchPattern:
    """A compiled glob.

    Attributes
    ----------
    kind
        What the matching files are (``micrograph``, ``coordinates``, ``ctf``).
    pattern
        The absolute glob.
    root
        The folder before the first component with a wildcard (where scanning starts).
    regex
        Matches paths relative to ``root``.
    max_depth
        Components below ``root`` a match can have (``None`` with ``**``).
    """

    kind: InputKind
    pattern: str
    root: str
    regex: re.Pattern[str]
    max_depth: int | None

    def matches(self, path: str) -> bool:
        """Whether an absolute path matches (temporary names never do)."""
        if is_temporary(os.path.basename(path)):
            return False
        prefix = self.root.rstrip("/") + "/"
        if not path.startswith(prefix):
            return False
        return self.regex.fullmatch(path[len(prefix) :]) is not None


def _component(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        char = part[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            start = i + 1
            if part[start : start + 1] in ("!", "^"):
                start += 1
            if part[start : start + 1] == "]":
                start += 1
            end = part.find("]", start)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = part[i + 1 : end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def compile_pattern(kind: InputKind, pattern: str) -> WatchPattern:
    """Compile a glob (see the module docstring) for :func:`scan` and hint matching."""
    absolute = os.path.abspath(os.path.expanduser(pattern))
    parts = absolute.split("/")[1:]
    fixed: list[str] = []
    while parts[:-1] and not _MAGIC.search(parts[0]):
        fixed.append(parts.pop(0))
    root = "/" + "/".join(fixed)
    regex = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            regex.append(".*" if last else "(?:[^/]+/)*")
        else:
            regex.append(_component(part) + ("" if last else "/"))
    depth = None if "**" in parts else len(parts)
    return WatchPattern(kind, absolute, root, re.compile("".join(regex)), depth)


def _walk(
    folder: str,
    relative: str,
    depth: int,
    patterns: Sequence[WatchPattern],
    max_depth: int | None,
    found: dict[str, tuple[InputKind, Signature]],
    visited: set[tuple[int, int]],
) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        log.debug("cannot scan %s: %s", folder, exc.strerror or exc)
        return
    for entry in entries:
        name = entry.name
        if is_temporary(name):
            continue
        rel = relative + name
        try:
            if entry.is_dir():
                if max_depth is None or depth < max_depth:
                    stat = entry.stat()
                    key = (stat.st_dev, stat.st_ino)
                    if key not in visited:  # symbolic-link loops
                        visited.add(key)
                        _walk(entry.path, rel + "/", depth + 1, patterns, max_depth, found, visited)
                continue
            # Special files (FIFOs, devices, sockets) that match are listed too: intake
            # quarantines them without opening them (a read of a FIFO blocks).
            for pattern in patterns:
                if pattern.regex.fullmatch(rel) and entry.path not in found:
                    found[entry.path] = (pattern.kind, signature_of(entry.stat()))
                    break
        except OSError as exc:  # vanished or unreadable meanwhile
            log.debug("cannot stat %s: %s", entry.path, exc.strerror or exc)


def scan(patterns: Iterable[WatchPattern]) -> dict[str, tuple[InputKind, Signature]]:
    """Every file matching one of ``patterns`` (the first matching pattern gives the kind),
    with its signature. Blocking: run it in a thread. Folders that do not exist (yet) or cannot
    be read are skipped."""
    by_root: dict[str, list[WatchPattern]] = {}
    for pattern in patterns:
        by_root.setdefault(pattern.root, []).append(pattern)
    found: dict[str, tuple[InputKind, Signature]] = {}
    for root, group in by_root.items():
        depths = [p.max_depth for p in group]
        max_depth = None if None in depths else max(d for d in depths if d is not None)
        _walk(root, "", 1, group, max_depth, found, set())
    return found


@dataclass
class WatchUpdate:
    """What the watcher learnt since the last update.

    Attributes
    ----------
    listing
        A complete scan (path → kind, signature), when one finished.
    hints
        Paths that inotify says changed (path → kind); they may be gone already.
    """

    listing: dict[str, tuple[InputKind, Signature]] | None = None
    hints: dict[str, InputKind] = field(default_factory=dict)


def _stop_observer(observer: Any) -> None:
    observer.stop()
    observer.join(5.0)


class _Handler:
    """watchdog event handler: forwards matching paths to the event loop (observer thread)."""

    def __init__(self, watcher: Watcher, loop: asyncio.AbstractEventLoop) -> None:
        self._watcher = watcher
        self._loop = loop

    def dispatch(self, event: Any) -> None:
        if event.event_type not in _CONTENT_EVENTS:
            return
        paths = [event.src_path, getattr(event, "dest_path", "")]
        for raw in paths:
            path = os.fsdecode(raw) if raw else ""
            if not path:
                continue
            try:
                if event.is_directory:
                    self._loop.call_soon_threadsafe(self._watcher.request_scan)
                else:
                    self._loop.call_soon_threadsafe(self._watcher.hint, path)
            except RuntimeError:  # the loop is closed: the service is stopping
                return


class Watcher:
    """Scans (and in ``auto`` mode, inotify hints) for input files; an async context manager
    that owns its scanning task and the watchdog observer thread.

    Parameters
    ----------
    patterns
        What to watch.
    mode
        ``"auto"`` (inotify hints + scans every ``rescan_seconds``) or ``"poll"`` (scans every
        ``poll_seconds`` only).
    rescan_seconds, poll_seconds
        Scan intervals.
    """

    def __init__(
        self,
        patterns: Sequence[WatchPattern],
        *,
        mode: str = "auto",
        rescan_seconds: float = 30.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.patterns = list(patterns)
        self.mode = mode
        self.interval = rescan_seconds if mode == "auto" else min(poll_seconds, rescan_seconds)
        self.scans = 0
        self._listing: dict[str, tuple[InputKind, Signature]] | None = None
        self._hints: dict[str, InputKind] = {}
        self._wake = asyncio.Event()
        self._scan_now = asyncio.Event()
        self._observer: Any = None
        self._watched: set[str] = set()
        self._ancestors: set[str] = set()
        self._stack: contextlib.AsyncExitStack | None = None
        self._scanner: asyncio.Task[None] | None = None
        self._handler: _Handler | None = None

    async def __aenter__(self) -> Watcher:
        if self.mode == "auto":
            from watchdog.observers import Observer

            # watchdog warns from its own thread when a new subfolder's watch is registered
            # twice (harmless: the callback is replaced); keep it out of the service's log.
            warnings.filterwarnings(
                "ignore", message="Callback with id .* already exists", category=RuntimeWarning
            )
            self._handler = _Handler(self, asyncio.get_running_loop())
            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()
        async with contextlib.AsyncExitStack() as stack:
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._scanner = tasks.create_task(self._scan_loop(), name="watch-scan")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                if self._scanner is not None:
                    self._scanner.cancel()
                await stack.aclose()
        finally:
            if self._observer is not None:
                observer, self._observer = self._observer, None
                # stop() takes the observer's locks: never block the event loop on it.
                async with asyncio.timeout(10.0):
                    await asyncio.to_thread(_stop_observer, observer)

    def hint(self, path: str) -> None:
        """A file may have changed (called on the event loop)."""
        for pattern in self.patterns:
            if pattern.matches(path):
                self._hints[path] = pattern.kind
                self._wake.set()
                return

    def request_scan(self) -> None:
        """Scan again soon (a folder appeared or moved)."""
        self._scan_now.set()

    async def next_update(self) -> WatchUpdate:
        """Wait for and return what changed since the last call."""
        while self._listing is None and not self._hints:
            self._wake.clear()
            await self._wake.wait()
        update = WatchUpdate(self._listing, self._hints)
        self._listing, self._hints = None, {}
        return update

    async def _scan_loop(self) -> None:
        while True:
            self._scan_now.clear()
            # Watch first, then scan: a file or folder that appears in between is seen by
            # one of the two, never by neither.
            if self._observer is not None:
                await asyncio.to_thread(self._schedule_watches)
            listing = await asyncio.to_thread(scan, self.patterns)
            self.scans += 1
            self._listing = listing
            self._wake.set()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the wait ends (the watcher would then never stop).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._scan_now.wait()
            if self._scan_now.is_set():
                await asyncio.sleep(0.2)  # let a burst of folder events settle

    def _schedule_watches(self) -> None:
        """Watch every pattern root that exists. For a root that does not exist yet (the
        session folder is often created after the service starts), watch its nearest existing
        ancestor instead: the folder's creation then triggers a scan at once, which schedules
        the root itself, rather than waiting for the next periodic scan."""
        for pattern in self.patterns:
            root = pattern.root
            if root in self._watched:
                continue
            if os.path.isdir(root):
                recursive = pattern.max_depth is None or pattern.max_depth > 1
                self._watch(root, recursive)
                self._watched.add(root)
                continue
            ancestor = os.path.dirname(os.path.abspath(root))
            while (
                ancestor and not os.path.isdir(ancestor) and ancestor != os.path.dirname(ancestor)
            ):
                ancestor = os.path.dirname(ancestor)
            if ancestor and ancestor not in self._ancestors and os.path.isdir(ancestor):
                self._watch(ancestor, False)
                self._ancestors.add(ancestor)

    def _watch(self, folder: str, recursive: bool) -> None:
        assert self._observer is not None
        try:
            self._observer.schedule(self._handler, folder, recursive=recursive)
        except OSError as exc:  # inotify watch limit, permissions: scans still work
            log.warning("%s: cannot watch with inotify (%s); relying on scans", folder, exc)
