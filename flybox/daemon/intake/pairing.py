"""Micrograph ⇄ coordinates ⇄ CTF, in any arrival order (DESIGN.md §2, FIELD.md §14.7).

Inputs are matched by the micrograph's *stem* (file name without extension): a coordinate file
``<stem><suffix>`` (the configured ``coordinate_suffix``, else the first of
:data:`flybox.pipeline.inputs.DEFAULT_COORD_SUFFIXES` that the name ends with) belongs to micrograph
``<stem>.mrc`` wherever each lives. CTF entries are matched like ``flybox extract`` does
(:mod:`flybox.pipeline.matching`): the exact path, else the unique file name, else the unique
stem.

:class:`Pairing` is pure bookkeeping (no I/O, no clock of its own): the service tells it what
became complete, and asks which stems are ready and which have waited too long.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from flybox.errors import DuplicateStemError
from flybox.pipeline.inputs import DEFAULT_COORD_SUFFIXES
from flybox.pipeline.matching import NameIndex, micrograph_stem
from flybox.types import CtfParams

__all__ = [
    "AUTOPICK",
    "CoordinatesInput",
    "MicrographInput",
    "Missing",
    "Pair",
    "Pairing",
]

Missing = Literal["coordinates", "ctf"]


@dataclass(frozen=True)
class MicrographInput:
    """A complete micrograph: where, what content, and since when (service clock)."""

    path: str
    fingerprint: str
    complete_at: float
    #: Its size in bytes (the job timeout grows with it).
    size: int = 0


@dataclass(frozen=True)
class CoordinatesInput:
    """A complete, parsed coordinate file (``picks`` is ``None`` once released: the worker
    then reads the file itself)."""

    path: str
    digest: str
    picks: pd.DataFrame | None = field(compare=False)
    complete_at: float


#: The ``path`` of the coordinates of a micrograph the service picks itself (``[picking]``).
AUTOPICK = ""


@dataclass(frozen=True)
class Pair:
    """Everything one unit of work needs, for one stem."""

    stem: str
    micrograph: MicrographInput
    coordinates: CoordinatesInput
    ctf: CtfParams | None


@dataclass
class _Entry:
    micrograph: MicrographInput | None = None
    coordinates: CoordinatesInput | None = None
    reported: set[Missing] = field(default_factory=set)


class Pairing:
    """Which inputs of each stem have arrived.

    Parameters
    ----------
    needs_ctf
        Whether a micrograph waits for its CTF (a CTF source is configured).
    coordinate_suffix
        The suffix after the micrograph stem in coordinate file names; ``None`` tries
        :data:`~flybox.pipeline.inputs.DEFAULT_COORD_SUFFIXES`.
    autopick
        Whether the service picks micrographs without coordinates (``[picking]``): such a
        micrograph pairs at once with coordinates whose path is :data:`AUTOPICK`. Picks
        corrected in the picker (:meth:`set_corrected`) win over external ones, which win
        over autopicking.
    """

    def __init__(
        self, *, needs_ctf: bool, coordinate_suffix: str | None = None, autopick: bool = False
    ) -> None:
        self.needs_ctf = needs_ctf
        self.autopick = autopick
        self._corrected: dict[str, CoordinatesInput] = {}
        suffixes = (coordinate_suffix,) if coordinate_suffix else DEFAULT_COORD_SUFFIXES
        self._suffixes = sorted(suffixes, key=len, reverse=True)
        self._entries: dict[str, _Entry] = {}
        self._ctf_sources: dict[str, dict[str, CtfParams]] = {}
        self._ctf: NameIndex[CtfParams] = NameIndex({})

    # ----------------------------------------------------------------------------- names
    def coordinates_stem(self, path: str) -> str:
        """The micrograph stem a coordinate file belongs to."""
        base = os.path.basename(path)
        for suffix in self._suffixes:
            if base.endswith(suffix) and len(base) > len(suffix):
                return base[: -len(suffix)]
        return micrograph_stem(base)

    # ----------------------------------------------------------------------------- inputs
    def _entry(self, stem: str) -> _Entry:
        return self._entries.setdefault(stem, _Entry())

    def set_micrograph(self, item: MicrographInput) -> str:
        """A micrograph became complete (or changed); returns its stem.

        Raises
        ------
        DuplicateStemError
            When another micrograph file already has this stem.
        """
        stem = micrograph_stem(item.path)
        entry = self._entry(stem)
        if entry.micrograph is not None and entry.micrograph.path != item.path:
            raise DuplicateStemError(item.path, entry.micrograph.path)
        entry.micrograph = item
        return stem

    def remove_micrograph(self, path: str) -> str | None:
        """A micrograph disappeared or was quarantined; returns its stem when it was known."""
        stem = micrograph_stem(path)
        entry = self._entries.get(stem)
        if entry is None or entry.micrograph is None or entry.micrograph.path != path:
            return None
        entry.micrograph = None
        return stem

    def set_coordinates(self, item: CoordinatesInput) -> str:
        """A coordinate file became complete (or changed); returns its micrograph stem."""
        stem = self.coordinates_stem(item.path)
        self._entry(stem).coordinates = item
        return stem

    def release_picks(self, stem: str) -> None:
        """Forget a stem's parsed picks (its unit is committed): memory stays bounded over a
        long session; should the stem be processed again, the worker reads the file."""
        entry = self._entries.get(stem)
        if entry is not None and entry.coordinates is not None:
            entry.coordinates = dataclasses.replace(entry.coordinates, picks=None)
        if stem in self._corrected:
            self._corrected[stem] = dataclasses.replace(self._corrected[stem], picks=None)

    def set_corrected(self, stem: str, item: CoordinatesInput) -> None:
        """The stem's picks were corrected in the picker: they replace any other picks."""
        self._corrected[stem] = item

    def corrected(self, stem: str) -> CoordinatesInput | None:
        """The stem's corrected picks, if any."""
        return self._corrected.get(stem)

    def remove_coordinates(self, path: str) -> str | None:
        """A coordinate file disappeared or was quarantined; returns its stem when known."""
        stem = self.coordinates_stem(path)
        entry = self._entries.get(stem)
        if entry is None or entry.coordinates is None or entry.coordinates.path != path:
            return None
        entry.coordinates = None
        return stem

    def set_ctf_source(self, source: str, ctfs: Mapping[str, CtfParams]) -> set[str]:
        """A CTF file was (re)read; returns the stems whose CTF is now different.

        Several sources may contribute (a CTFFIND4 ``*.txt`` glob: one file per micrograph);
        a RELION micrographs STAR that grows is one source, re-read each time it changes.
        """
        before = {stem: self.ctf_for(stem) for stem in self._with_micrograph()}
        if ctfs:
            self._ctf_sources[source] = dict(ctfs)
        else:
            self._ctf_sources.pop(source, None)
        self._index_ctfs()
        return {stem for stem, old in before.items() if self.ctf_for(stem) != old}

    def _index_ctfs(self) -> None:
        merged: dict[str, CtfParams] = {}
        for ctfs in self._ctf_sources.values():
            merged.update(ctfs)
        self._ctf = NameIndex(merged)

    def ctf_for(self, stem: str) -> CtfParams | None:
        """The CTF of a stem's micrograph (``None``: unknown, or ambiguous)."""
        entry = self._entries.get(stem)
        if entry is None or entry.micrograph is None:
            return None
        return self._ctf.lookup(entry.micrograph.path)

    # ----------------------------------------------------------------------------- queries
    def _with_micrograph(self) -> Iterable[str]:
        return [stem for stem, entry in self._entries.items() if entry.micrograph is not None]

    def micrograph(self, stem: str) -> MicrographInput | None:
        """The stem's complete micrograph, if any."""
        entry = self._entries.get(stem)
        return None if entry is None else entry.micrograph

    def missing(self, stem: str) -> Missing | None:
        """What a stem with a micrograph still waits for (``None``: nothing)."""
        entry = self._entries.get(stem)
        if entry is None or entry.micrograph is None:
            return None
        if entry.coordinates is None and not self.autopick and stem not in self._corrected:
            return "coordinates"
        if self.needs_ctf and self.ctf_for(stem) is None:
            return "ctf"
        return None

    def pair(self, stem: str) -> Pair | None:
        """The stem's inputs when all have arrived."""
        entry = self._entries.get(stem)
        if entry is None or entry.micrograph is None:
            return None
        coordinates = self._corrected.get(stem) or entry.coordinates
        if coordinates is None and self.autopick:
            coordinates = CoordinatesInput(AUTOPICK, AUTOPICK, None, entry.micrograph.complete_at)
        if coordinates is None:
            return None
        ctf = self.ctf_for(stem)
        if self.needs_ctf and ctf is None:
            return None
        entry.reported.clear()
        return Pair(stem, entry.micrograph, coordinates, ctf)

    def overdue(self, now: float, timeout: float) -> list[tuple[MicrographInput, Missing, float]]:
        """Micrographs that have waited longer than ``timeout`` for an input, each reported once
        per missing input: ``(micrograph, what is missing, seconds waited)``."""
        late = []
        for stem, entry in self._entries.items():
            item = entry.micrograph
            if item is None or now - item.complete_at < timeout:
                continue
            missing = self.missing(stem)
            if missing is not None and missing not in entry.reported:
                entry.reported.add(missing)
                late.append((item, missing, now - item.complete_at))
        return late
