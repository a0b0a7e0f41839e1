"""Is an input file completely written? (DESIGN.md §2, FIELD.md §10.2)

Acquisition software writes files in place, in pieces, sometimes with pauses. A micrograph is
accepted when its MRC header is valid, the size the header announces equals the file size, and
the file has not changed for ``settle_seconds``; a text file (coordinates, CTF) when it has not
changed for ``settle_seconds`` and then parses. Files that stay wrong are quarantined with the
reason:

======================================  ==========================================  ==============
state of the file                       decision                                    code
======================================  ==========================================  ==============
shorter than the header says            quarantine after ``incomplete_timeout``     truncated_mrc
                                        without change
shorter than a header (< 1024 bytes)    same                                        truncated_mrc
header invalid (MAP id, mode, sizes)    quarantine once stable for ``settle``       invalid_mrc
larger than the header says             quarantine once stable for ``settle``       oversized_mrc
cannot be read (permissions)            quarantine once stable for ``settle``       unreadable
not a regular file (FIFO, device; also  quarantine at once (never opened: a read    not_regular_file
through a symbolic link)                could block forever)
text that does not parse                quarantine after ``incomplete_timeout``     (caller's)
                                        without change
======================================  ==========================================  ==============

A change of the file (size, mtime, inode or ctime: a ``chmod`` counts) resets the clock; a
decided file (complete or quarantined) that changes is evaluated again. This module does no I/O
apart from :func:`probe`, and takes the time as an argument, so that the state machine is
tested with a fake clock.
"""

from __future__ import annotations

import enum
import errno
import os
import stat as stat_module
from dataclasses import dataclass
from typing import Literal, NamedTuple

from flybox.io.mrc import MrcCompleteness, check_complete

__all__ = [
    "Completeness",
    "Decision",
    "FileState",
    "InputKind",
    "Probe",
    "Signature",
    "Verdict",
    "probe",
    "signature_of",
]

InputKind = Literal["micrograph", "coordinates", "ctf"]


class Signature(NamedTuple):
    """What identifies one state of a file on disk (any change of it is a change of the file)."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    def text(self) -> str:
        """A compact form for the journal."""
        return f"{self.size}:{self.mtime_ns}:{self.inode}:{self.ctime_ns}"


def signature_of(stat: os.stat_result) -> Signature:
    """The :class:`Signature` of a ``stat`` result."""
    return Signature(stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)


@dataclass(frozen=True)
class Probe:
    """One look at a file.

    Attributes
    ----------
    signature
        Its signature; ``None`` when the file is gone.
    error
        Why it could not be looked at (other than being gone).
    mrc
        For micrographs: the header/size check.
    """

    signature: Signature | None
    error: str | None = None
    mrc: MrcCompleteness | None = None


def probe(path: str, kind: InputKind) -> Probe:
    """Look at a file: ``stat``, and for a micrograph its 1024-byte header (blocking I/O)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return Probe(None)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return Probe(None)
        return Probe(None, error=f"cannot read: {exc.strerror or exc}")
    signature = signature_of(stat)
    if not stat_module.S_ISREG(stat.st_mode):  # a FIFO or device would block every read
        return Probe(signature, error=f"not a regular file ({_file_type(stat.st_mode)})")
    if kind != "micrograph":
        return Probe(signature)
    return Probe(signature, mrc=check_complete(path))


def _file_type(mode: int) -> str:
    for test, name in (
        (stat_module.S_ISFIFO, "FIFO"),
        (stat_module.S_ISCHR, "character device"),
        (stat_module.S_ISBLK, "block device"),
        (stat_module.S_ISSOCK, "socket"),
        (stat_module.S_ISDIR, "folder"),
    ):
        if test(mode):
            return name
    return "special file"


class Verdict(enum.Enum):
    """What to do with a file now."""

    PENDING = "pending"
    """Not yet: look again later."""
    PARSE = "parse"
    """A text file has settled: parse it, then call :meth:`FileState.parsed` or
    :meth:`FileState.parse_failed`."""
    COMPLETE = "complete"
    QUARANTINE = "quarantine"
    GONE = "gone"


@dataclass(frozen=True)
class Decision:
    """A verdict and, for a quarantine, the reason and its short code."""

    verdict: Verdict
    reason: str | None = None
    code: str | None = None


@dataclass
class FileState:
    """What the service knows about one input file."""

    path: str
    kind: InputKind
    signature: Signature | None = None
    changed_at: float = 0.0
    decided: Decision | None = None
    parse_error: tuple[str, str] | None = None
    changes: int = 0

    @property
    def pending(self) -> bool:
        """Whether the file still has to be watched for completion."""
        return self.decided is None

    def observe(self, signature: Signature | None, now: float) -> bool:
        """Record a signature; returns whether the file changed (a decision is then undone)."""
        if signature == self.signature:
            return False
        self.signature = signature
        self.changed_at = now
        self.decided = None
        self.parse_error = None
        self.changes += 1
        return True

    def parsed(self) -> Decision:
        """A settled text file parsed: it is complete."""
        self.decided = Decision(Verdict.COMPLETE)
        return self.decided

    def parse_failed(self, reason: str, code: str) -> None:
        """A settled text file did not parse; it is retried when it changes, and quarantined if
        it does not change for ``incomplete_timeout_seconds``."""
        self.parse_error = (reason, code)


class Completeness:
    """The completeness rules (module docstring), with their two time limits.

    Parameters
    ----------
    settle_seconds
        How long a file must stay unchanged before it is used.
    incomplete_timeout_seconds
        How long an incomplete or unparsable file may stay unchanged before it is quarantined.
    """

    def __init__(self, settle_seconds: float, incomplete_timeout_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self.incomplete_timeout_seconds = max(incomplete_timeout_seconds, settle_seconds)

    def assess(self, state: FileState, look: Probe, now: float) -> Decision:
        """Update ``state`` with a new look at the file and decide.

        Parameters
        ----------
        state
            The file's state (updated in place; a decision is stored in ``state.decided``).
        look
            What :func:`probe` saw.
        now
            The current time in seconds (any monotonic clock).
        """
        if look.signature is None and look.error is None:
            state.observe(None, now)
            return Decision(Verdict.GONE)
        if look.signature is not None:
            state.observe(look.signature, now)
        if state.decided is not None:
            return state.decided
        stable = now - state.changed_at
        settled = stable >= self.settle_seconds
        timed_out = stable >= self.incomplete_timeout_seconds
        if look.error is not None:
            if look.error.startswith("not a regular file"):
                return self._decide(state, True, look.error, "not_regular_file")
            return self._decide(
                state, settled, look.error.replace("cannot read", "unreadable"), "unreadable"
            )
        if state.kind != "micrograph":
            if state.parse_error is not None:
                reason, code = state.parse_error
                return self._decide(state, timed_out, reason, code)
            return Decision(Verdict.PARSE) if settled else Decision(Verdict.PENDING)
        return self._assess_mrc(state, look.mrc, settled, timed_out)

    def _assess_mrc(
        self, state: FileState, mrc: MrcCompleteness | None, settled: bool, timed_out: bool
    ) -> Decision:
        if mrc is None:
            return Decision(Verdict.PENDING)
        if mrc.complete:
            if settled:
                state.decided = Decision(Verdict.COMPLETE)
                return state.decided
            return Decision(Verdict.PENDING)
        problem = mrc.problem or "not a complete MRC file"
        if mrc.info is None:
            if problem.startswith("cannot read"):
                reason = problem.replace("cannot read", "unreadable", 1)
                return self._decide(state, settled, reason, "unreadable")
            if problem.startswith("only "):
                return self._decide(state, timed_out, f"truncated: {problem}", "truncated_mrc")
            return self._decide(state, settled, f"invalid MRC header: {problem}", "invalid_mrc")
        if mrc.actual_bytes < mrc.expected_bytes:
            return self._decide(state, timed_out, problem, "truncated_mrc")
        return self._decide(state, settled, problem, "oversized_mrc")

    @staticmethod
    def _decide(state: FileState, due: bool, reason: str, code: str) -> Decision:
        if not due:
            return Decision(Verdict.PENDING)
        state.decided = Decision(Verdict.QUARANTINE, reason, code)
        return state.decided
