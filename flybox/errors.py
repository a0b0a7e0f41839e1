"""The one exception tree of flybox.

Exceptions are grouped by how the caller recovers::

    FlyboxError                      anything flybox raises on purpose
    ├── InputError                   a bad input file: quarantine it, go on with the rest
    │   ├── IncompleteFileError      still being written or truncated (wait, then quarantine)
    │   ├── MrcFormatError           unreadable MRC header/data, unsupported mode
    │   ├── StarFormatError          unparsable STAR file or missing columns
    │   ├── CoordinateFormatError    unreadable or malformed particle coordinates
    │   └── CtfFormatError           unreadable CTF parameters
    ├── ConfigError                  bad configuration: refuse to start, name the key path
    │   └── PluginError              a processor plugin that fails to load or validate
    ├── ProcessingError              valid inputs that the requested processing cannot use
    │                                (box larger than the micrograph, CTF missing for a flip)
    └── TransientIOError             a passing file-system problem: retry later

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
    "FlyboxError",
    "IncompleteFileError",
    "InputError",
    "MrcFormatError",
    "PluginError",
    "ProcessingError",
    "StarFormatError",
    "TransientIOError",
    "config_errors",
]


class FlyboxError(Exception):
    """Base class of every error flybox raises on purpose."""


class InputError(FlyboxError):
    """An input file is unusable; the file is quarantined and processing continues.

    Parameters
    ----------
    path
        The offending file.
    problem
        What is wrong with it, in a few words (no trailing period).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when the error crosses a process boundary (worker → service).
        return (type(self), (self.path, self.problem))


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


class ProcessingError(FlyboxError):
    """Valid inputs that the requested processing cannot use.

    Parameters
    ----------
    subject
        What the problem is about (usually a micrograph path).
    problem
        Why processing is impossible.
    """

    def __init__(self, subject: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(subject)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem))


class TransientIOError(FlyboxError):
    """A passing file-system problem (NFS hiccup, full disk); the operation is retried."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem))


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
