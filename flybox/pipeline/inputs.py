"""Finding and pairing batch inputs: micrographs, their coordinates, CTFs and re-centred picks.

Names are matched the way users expect across tools: the exact name first, then the file name,
then the stem (file name without extension). Coordinate files found by suffix are matched by
the micrograph's stem (``<stem><suffix>``), beside the micrographs, in a folder (also RELION's
``<dir>/<micrograph path without extension><suffix>`` layout), or by a glob.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd

from flybox.errors import InputError
from flybox.io.coords import read_coordinates
from flybox.io.ctf import read_micrographs_star
from flybox.pipeline.layout import resolve_star_path
from flybox.pipeline.matching import match_name, micrograph_stem
from flybox.types import CtfParams, OpticsGroup

__all__ = [
    "DEFAULT_COORD_SUFFIXES",
    "CoordinateSource",
    "MicrographEntry",
    "find_micrographs",
]

T = TypeVar("T")

_RELION_JOB = re.compile(r"job\d{3,}")

#: Suffixes tried beside each micrograph when ``--coord-suffix`` is not given.
DEFAULT_COORD_SUFFIXES = (
    "_autopick.star",
    ".star",
    ".box",
    ".cbox",
    ".pos",
    ".txt",
    ".coords",
)


@dataclass
class MicrographEntry:
    """One micrograph to process."""

    path: str
    name: str
    optics: OpticsGroup
    ctf: CtfParams | None = None


@dataclass
class MicrographSource:
    """The micrographs of a batch and what came with them."""

    entries: list[MicrographEntry]
    from_star: bool
    ctfs: dict[str, CtfParams] = field(default_factory=dict)


def find_micrographs(spec: str, project_dir: str | None = None) -> MicrographSource:
    """Micrographs from a glob or a RELION micrographs STAR file.

    Paths in a STAR file are relative to the project folder (``project_dir``, default: the
    working directory; RELION's convention) or, when not found there, to the STAR file's folder
    (:func:`flybox.pipeline.layout.resolve_star_path`).

    Raises
    ------
    InputError
        When nothing matches, or the STAR file is unreadable.
    """
    if spec.endswith(".star") and os.path.isfile(spec):
        rows, groups, ctfs = read_micrographs_star(spec)
        default = OpticsGroup()
        entries = []
        for _, row in rows.iterrows():
            name = str(row["rlnMicrographName"])
            found = resolve_star_path(name, spec, project_dir)
            path = str(found) if found is not None else name
            number = int(row["rlnOpticsGroup"]) if "rlnOpticsGroup" in rows else 1
            entries.append(MicrographEntry(path, name, groups.get(number, default), ctfs.get(name)))
        if not entries:
            raise InputError(spec, "the micrographs STAR file lists no micrographs")
        return MicrographSource(entries, from_star=True, ctfs=ctfs)
    paths = sorted(glob.glob(spec, recursive=True))
    paths = [p for p in paths if os.path.isfile(p) and not os.path.basename(p).startswith(".")]
    if not paths:
        raise InputError(spec, "no micrograph matches")
    return MicrographSource([MicrographEntry(p, p, OpticsGroup()) for p in paths], from_star=False)


@dataclass
class CoordinateSource:
    """Where each micrograph's picks come from.

    Either one file per micrograph (``files``) or picks already read from one file that
    covers several micrographs (``tables``, keyed by the micrograph name in that file).
    """

    files: dict[str, str] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    suffixes: tuple[str, ...] = DEFAULT_COORD_SUFFIXES

    @classmethod
    def from_spec(
        cls,
        coords: str | None,
        suffix: str | None,
        *,
        min_fom: float | None = None,
        cs_flip_y: bool = True,
    ) -> CoordinateSource:
        """Interpret ``--coords`` (glob, folder, multi-micrograph file or nothing)."""
        suffixes = (suffix,) if suffix else DEFAULT_COORD_SUFFIXES
        if coords is None:
            return cls(suffixes=suffixes)
        if os.path.isdir(coords):
            return cls(files={"": coords}, suffixes=suffixes)
        if os.path.isfile(coords) and not glob.has_magic(coords):
            picks = read_coordinates(coords, min_fom=min_fom, cs_flip_y=cs_flip_y)
            if "rlnMicrographName" in picks:
                tables = {
                    str(name): group.drop(columns="rlnMicrographName").reset_index(drop=True)
                    for name, group in picks.groupby("rlnMicrographName", sort=False)
                }
                return cls(tables=tables, suffixes=suffixes)
            return cls(files={"*": coords}, suffixes=suffixes)
        matches = sorted(glob.glob(coords, recursive=True))
        if not matches:
            raise InputError(coords, "no coordinate file matches")
        files = {}
        for match in matches:
            base = os.path.basename(match)
            key = (
                base[: -len(suffix)] if suffix and base.endswith(suffix) else micrograph_stem(base)
            )
            files[key] = match
        return cls(files=files, suffixes=suffixes)

    def for_micrograph(self, path: str, name: str) -> tuple[str | None, pd.DataFrame | None]:
        """The coordinate file or picks table for one micrograph (``(None, None)`` if none)."""
        if self.tables:
            table = match_name(self.tables, name)
            if table is None:
                table = match_name(self.tables, path)
            return None, table
        if "*" in self.files:
            return self.files["*"], None
        stem = micrograph_stem(path)
        if "" in self.files:
            folder = self.files[""]
            without_ext = os.path.splitext(name)[0]
            bases = [stem, without_ext]
            # RELION's AutoPick/jobNNN/ keeps the micrograph's path without its own job folder:
            # MotionCorr/job002/Movies/a.mrc → AutoPick/job004/Movies/a_autopick.star.
            parts = Path(without_ext).parts
            if len(parts) > 2 and _RELION_JOB.fullmatch(parts[1]):
                bases.append(str(Path(*parts[2:])))
            for suffix in self.suffixes:
                for candidate in (os.path.join(folder, base + suffix) for base in bases):
                    if os.path.isfile(candidate):
                        return candidate, None
            return None, None
        if self.files:
            return self.files.get(stem), None
        folder = os.path.dirname(path)
        for suffix in self.suffixes:
            candidate = os.path.join(folder, stem + suffix)
            if os.path.isfile(candidate) and candidate != path:
                return candidate, None
        return None, None
