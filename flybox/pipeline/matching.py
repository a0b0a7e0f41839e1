"""The one rule that names a micrograph's partner (its CTF, its picks) in another file.

Used by ``flybox extract`` and by the service alike, so that both pair the same way. A key
matches a micrograph path by, in order:

1. the exact path string;
2. the file name, when exactly one key has it (several: ambiguous, no match; the stem is not
   tried, since two files of that name exist);
3. the stem (file name without its last extension), when exactly one key has it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Generic, Protocol, TypeVar

__all__ = ["NameIndex", "PatternMatches", "match_name", "micrograph_stem"]

T = TypeVar("T")


def micrograph_stem(path: str) -> str:
    """A micrograph's stem: its file name without the last extension (``a/b.c.mrc`` → ``b.c``)."""
    base = os.path.basename(path)
    return base.rsplit(".", 1)[0] if "." in base else base


class NameIndex(Generic[T]):
    """Values keyed by file path, looked up by the module's matching rule in constant time.

    Parameters
    ----------
    mapping
        Path (as written in the source file) → value.
    """

    def __init__(self, mapping: Mapping[str, T]) -> None:
        self._exact = dict(mapping)
        self._by_name: dict[str, list[T]] = {}
        self._by_stem: dict[str, list[T]] = {}
        for key, value in self._exact.items():
            self._by_name.setdefault(os.path.basename(key), []).append(value)
            self._by_stem.setdefault(micrograph_stem(key), []).append(value)

    def __len__(self) -> int:
        return len(self._exact)

    def lookup(self, path: str) -> T | None:
        """The value for the micrograph at ``path`` (``None``: no match, or ambiguous)."""
        if path in self._exact:
            return self._exact[path]
        by_name = self._by_name.get(os.path.basename(path), [])
        if by_name:
            return by_name[0] if len(by_name) == 1 else None
        by_stem = self._by_stem.get(micrograph_stem(path), [])
        return by_stem[0] if len(by_stem) == 1 else None


def match_name(mapping: Mapping[str, T], path: str) -> T | None:
    """One lookup by the module's rule (build a :class:`NameIndex` for many)."""
    return NameIndex(mapping).lookup(path)


class _Pattern(Protocol):
    @property
    def pattern(self) -> str: ...

    def matches(self, path: str) -> bool: ...


class PatternMatches:
    """Which watched patterns have matched a file yet (a typo in a ``[watch]`` glob otherwise
    shows only as a session that never starts)."""

    def __init__(self, patterns: Iterable[_Pattern]) -> None:
        self._waiting = list(patterns)

    def see(self, *groups: Iterable[str]) -> None:
        """Note files seen (any iterables of paths)."""
        for paths in groups:
            if not self._waiting:
                return
            for path in paths:
                self._waiting = [p for p in self._waiting if not p.matches(path)]
                if not self._waiting:
                    return

    @property
    def unmatched(self) -> list[str]:
        """The patterns that have matched nothing so far."""
        return [p.pattern for p in self._waiting]
