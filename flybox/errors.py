"""The one exception tree of flybox.

Exceptions are grouped by how the caller recovers::

    FlyboxError                      anything flybox raises on purpose
    ├── InputError                   a bad input file: quarantine it, go on with the rest
    │   ├── IncompleteFileError      still being written or truncated (wait, then quarantine)
    │   ├── MrcFormatError           unreadable MRC header/data, unsupported mode
    │   ├── StarFormatError          unparsable STAR file or missing columns
    │   ├── CoordinateFormatError    unreadable or malformed particle coordinates
    │   ├── CtfFormatError           unreadable CTF parameters
    │   ├── TextParseError           a settled text input (picks, CTF table) does not parse
    │   │                            (``code`` says which; wait for a rewrite, then quarantine)
    │   └── DuplicateStemError       a second micrograph file with a stem already taken
    │                                (their outputs would collide)
    ├── ConfigError                  bad configuration: refuse to start, name the key path
    │   └── PluginError              a processor plugin that fails to load or validate
    ├── ProcessingError              valid inputs that the requested processing cannot use
    │                                (box larger than the micrograph, CTF missing for a flip)
    └── TransientError               a passing problem: retry (a bounded number of times)
        ├── TransientIOError         a passing file-system problem (full disk, NFS hiccup);
        │   │                        an ``OSError`` becomes one where it is caught
        │   └── FileChangedError     a file changed while it was read: look again later
        └── WorkerLostError          the process running a job died (killed, out of memory)

Every exception carries what it is about (``path``, ``key`` or ``plugin``) as an attribute,
and ``str(exc)`` is the one line a user sees, naming that thing first.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "ConfigError",
    "CoordinateFormatError",
    "CtfFormatError",
    "DuplicateStemError",
    "FileChangedError",
    "FlyboxError",
    "IncompleteFileError",
    "InputError",
    "MrcFormatError",
    "PluginError",
    "ProcessingError",
    "StarFormatError",
    "TextParseError",
    "TransientError",
    "TransientIOError",
    "WorkerLostError",
    "config_errors",
]


class FlyboxError(Exception):
    """Base class of every error flybox raises on purpose."""


class _FileError(FlyboxError):
    """An error about one file (or micrograph): ``path`` and ``problem`` as attributes, the
    message ``"<path>: <problem>"``; both survive pickling (worker → service)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem))


class InputError(_FileError):
    """An input file is unusable; the file is quarantined and processing continues.

    Parameters
    ----------
    path
        The offending file.
    problem
        What is wrong with it, in a few words (no trailing period).
    """


class IncompleteFileError(InputError):
    """The file is shorter than its header says: still being written, or truncated."""


class MrcFormatError(InputError):
    """The MRC file cannot be read (bad header, unsupported mode, wrong size)."""


class StarFormatError(InputError):
    """The STAR file cannot be parsed or lacks required columns."""


class CoordinateFormatError(InputError):
    """The coordinate file cannot be read as any supported picking format."""


class CtfFormatError(InputError):
    """The CTF parameters cannot be read."""


class TextParseError(InputError):
    """A settled text input (coordinates, CTF table) does not parse.

    Parameters
    ----------
    path
        The text file.
    problem
        What is wrong with it (the quarantine reason if it stays so).
    code
        The machine-readable quarantine code (``bad_coordinates``, ``bad_ctf``).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, code: str) -> None:
        self.code = code
        super().__init__(path, problem)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem, self.code))


class DuplicateStemError(InputError):
    """Two different micrograph files share a stem: their outputs would collide.

    Parameters
    ----------
    path
        The micrograph that came second (it is quarantined).
    other
        The micrograph that already has the stem.
    """

    def __init__(self, path: str | os.PathLike[str], other: str | os.PathLike[str]) -> None:
        self.other = os.fspath(other)
        super().__init__(path, f"same file name as {self.other}: outputs would collide")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.other))


class ConfigError(FlyboxError):
    """The configuration is invalid; the service refuses to start.

    Parameters
    ----------
    key
        Dotted key path of the offending setting, e.g. ``chain[2].box``.
    problem
        Why it is refused.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.problem))


class PluginError(ConfigError):
    """A processor plugin could not be loaded or does not satisfy the processor contract."""

    def __init__(self, plugin: str, problem: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin}", problem)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.plugin, self.problem))


class ProcessingError(_FileError):
    """Valid inputs that the requested processing cannot use.

    Parameters
    ----------
    path
        What the problem is about (usually a micrograph path).
    problem
        Why processing is impossible.
    """


class TransientError(FlyboxError):
    """A passing problem: the operation is tried again (a bounded number of times)."""


class TransientIOError(_FileError, TransientError):
    """A passing file-system problem (NFS hiccup, full disk); the operation is retried.

    Parameters
    ----------
    path
        The file or folder concerned (or what was being processed when it happened).
    problem
        What went wrong.
    """

    @classmethod
    def from_os_error(cls, error: OSError, path: str | os.PathLike[str]) -> TransientIOError:
        """The tree's form of an ``OSError`` caught at a boundary: about ``error.filename``
        when it has one (else ``path``); ``problem`` keeps the error's type and text."""
        filename = error.filename if isinstance(error.filename, str) else None
        return cls(filename or path, f"{type(error).__name__}: {error}")


class FileChangedError(TransientIOError):
    """A file changed while it was read; look at it again later."""

    def __init__(
        self, path: str | os.PathLike[str], problem: str = "changed while it was read"
    ) -> None:
        super().__init__(path, problem)


class WorkerLostError(TransientError):
    """The process running a job died (killed, out of memory, crashed in native code).

    Parameters
    ----------
    problem
        What is known about it (the one line a user sees).
    """

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problem,))


class JobTimeoutError(WorkerLostError):
    """A job gave no result within its timeout (``[executor] job_timeout_seconds``): its
    worker was stopped and replaced (a read or write on a hung file system never returns)."""


def config_errors(exc: Any, prefix: str = "", *, option_style: bool = False) -> list[ConfigError]:
    """The one translation of a pydantic ``ValidationError`` into :class:`ConfigError` s with
    key paths (configuration files, chain steps and command-line options alike).

    Parameters
    ----------
    exc
        A ``pydantic.ValidationError`` (anything with ``errors()``; pydantic is not imported
        here, so that ``flybox.errors`` stays cheap to import).
    prefix
        Key path of the validated object (``"chain[2]"``: keys become ``chain[2].box``).
    option_style
        Keys as command-line options: ``--fill-value`` for the field ``fill_value``.

    Returns
    -------
    list of ConfigError
        One per problem, in pydantic's order; a validator's own ``ConfigError`` is kept as is.
    """
    problems: list[ConfigError] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            problems.append(cause)
            continue
        location = tuple(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if option_style:
            names = [str(part).replace("_", "-") for part in location if not isinstance(part, int)]
            key = "--" + names[0] if names else prefix
        else:
            key = prefix
            for part in location:
                key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
        problems.append(ConfigError(key, message))
    return problems
