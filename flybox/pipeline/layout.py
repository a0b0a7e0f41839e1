"""Output layout and STAR content (DESIGN.md §6, ALGORITHMS.md §15).

::

    OUT/particles.star                   RELION 3.1+ (data_optics + data_particles)
    OUT/particles_small.star             one file per stream
    OUT/Particles/<mic>.mrcs             one stack per micrograph per stream
    OUT/Particles/<mic>.star             that micrograph's rows
    OUT/ParticlesSmall/<mic>.mrcs

Every path written into a STAR file (``rlnImageName`` = ``NNNNNN@<path of the stack>``,
1-based, and ``rlnMicrographName``) is relative to the **project folder**, as RELION resolves
them: the working directory, or ``--project-dir`` / ``[session] project_dir``
(:func:`project_path`). Paths outside the project folder are written absolute. Reading accepts
both conventions found in the field: relative to the project folder, or to the STAR file's own
folder (:func:`resolve_star_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flybox.io.atomic import atomic_write
from flybox.io.star import format_star_block
from flybox.processors.base import check_stream_name
from flybox.types import CTF_STAR_COLUMNS, CtfParams, OpticsGroup

__all__ = [
    "ParticleSet",
    "optics_table",
    "particle_rows",
    "project_folder",
    "project_path",
    "resolve_star_path",
    "stream_folder",
    "stream_paths",
    "stream_star_name",
]

#: Leading columns of a particle row, in this order when present.
_LEADING = ("rlnCoordinateX", "rlnCoordinateY")
_AFTER_PICKS = ("rlnImageName", "rlnMicrographName", "rlnOpticsGroup")


def project_folder(project_dir: str | os.PathLike[str] | None = None) -> Path:
    """The project folder: ``project_dir`` when given, else the working directory (absolute)."""
    return Path(os.path.abspath(project_dir if project_dir is not None else os.getcwd()))


def project_path(
    path: str | os.PathLike[str], project_dir: str | os.PathLike[str] | None = None
) -> str:
    """How ``path`` is written into a STAR file: relative to the project folder when inside it
    (``Extract/job005/Particles/mic.mrcs``), absolute otherwise.

    Parameters
    ----------
    path
        A file path, absolute or relative to the working directory.
    project_dir
        The project folder (default: the working directory).
    """
    project = project_folder(project_dir)
    absolute = Path(os.path.abspath(path))
    if absolute == project or project in absolute.parents:
        return absolute.relative_to(project).as_posix()
    return absolute.as_posix()


def resolve_star_path(
    name: str,
    star_file: str | os.PathLike[str],
    project_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Find a file named in a STAR file: absolute, relative to the project folder (RELION's
    convention), or relative to the STAR file's folder (files moved with their STAR file).

    Returns
    -------
    Path or None
        The first candidate that exists, ``None`` when none does.
    """
    if os.path.isabs(name):
        candidates = [Path(name)]
    else:
        candidates = [project_folder(project_dir) / name, Path(star_file).parent / name]
    return next((c for c in candidates if c.exists()), None)


def stream_star_name(stream: str) -> str:
    """File name of a stream's cumulative STAR file (``particles.star``, …)."""
    stream_folder(stream)
    return f"{stream}.star"


def stream_paths(
    output_dir: str | os.PathLike[str], stream: str, stem: str
) -> tuple[str, str, str]:
    """Paths of one micrograph's outputs in one stream.

    Returns
    -------
    stack, star, relative_stack
        Absolute-or-as-given stack path, per-micrograph STAR path, and the stack path relative
        to ``output_dir`` (the journal's name for it; STAR files use :func:`project_path`).
    """
    folder = stream_folder(stream)
    relative = f"{folder}/{stem}.mrcs"
    base = Path(output_dir) / folder
    return str(base / f"{stem}.mrcs"), str(base / f"{stem}.star"), relative


def particle_rows(
    table: pd.DataFrame,
    stack_name: str,
    optics_group: int,
    ctf: CtfParams | None,
    micrograph_name: str | None = None,
) -> pd.DataFrame:
    """STAR rows for the particles of one stack, in output column order.

    Coordinates first, then the picker's columns, ``rlnImageName`` (``NNNNNN@stack_name``,
    1-based), micrograph name (``micrograph_name`` when given, else the table's), optics
    group, the CTF columns (unless the rows already carry per-particle CTF values), and
    flybox's own ``flybox*`` columns last. Give both names as :func:`project_path` writes them.
    """
    n = len(table)
    present = list(table.columns)
    flybox_columns = [c for c in present if c.startswith("flybox")]
    skipped = {*_LEADING, *_AFTER_PICKS, *flybox_columns}
    columns: dict[str, object] = {c: table[c].to_numpy() for c in _LEADING if c in table}
    columns.update({c: table[c].to_numpy() for c in present if c not in skipped})
    columns["rlnImageName"] = np.array(
        [f"{i:06d}@{stack_name}" for i in range(1, n + 1)], dtype=object
    )
    if micrograph_name is not None:
        columns["rlnMicrographName"] = np.full(n, micrograph_name, dtype=object)
    elif "rlnMicrographName" in table:
        columns["rlnMicrographName"] = table["rlnMicrographName"].to_numpy(dtype=object)
    columns["rlnOpticsGroup"] = np.full(n, optics_group, dtype=np.int64)
    if ctf is not None and not any(c in table.columns for c in CTF_STAR_COLUMNS):
        for column, value in ctf.star_values().items():
            columns[column] = np.full(n, value, dtype=np.float64)
    columns.update({c: table[c].to_numpy() for c in flybox_columns})
    return pd.DataFrame(columns, index=pd.RangeIndex(n), copy=False)


def optics_table(
    groups: Sequence[OpticsGroup], image_pixel_size_a: float, image_size: int
) -> pd.DataFrame:
    """``data_optics`` rows for particles extracted from micrographs of ``groups``.

    RELION 3.1 layout (ALGORITHMS.md §15): group name and number, original pixel size,
    voltage, Cs, Q0 (when known), extra columns of the input optics table, then
    ``rlnImagePixelSize``, ``rlnImageSize``, ``rlnImageDimensionality`` = 2 and
    ``rlnCtfDataAreCtfPremultiplied`` = 0. ``rlnMicrographPixelSize`` is dropped, as
    ``relion_preprocess`` does for a fresh extraction.
    """
    records = []
    for group in groups:
        record: dict[str, object] = {
            "rlnOpticsGroupName": group.name,
            "rlnOpticsGroup": group.number,
        }
        if group.original_pixel_size_a is not None:
            record["rlnMicrographOriginalPixelSize"] = group.original_pixel_size_a
        known: tuple[tuple[str, float | None], ...] = (
            ("rlnVoltage", group.voltage_kv),
            ("rlnSphericalAberration", group.cs_mm),
            ("rlnAmplitudeContrast", group.amplitude_contrast),
        )
        for column, number in known:
            if number is not None:
                record[column] = number
        for column, extra in group.extra.items():
            if column not in {"rlnMicrographPixelSize", "rlnImagePixelSize", "rlnImageSize"}:
                record[column] = extra
        record["rlnImagePixelSize"] = image_pixel_size_a
        record["rlnImageSize"] = image_size
        record["rlnImageDimensionality"] = 2
        record["rlnCtfDataAreCtfPremultiplied"] = 0
        records.append(record)
    return pd.DataFrame.from_records(records)


class ParticleSet:
    """The cumulative particle STAR file of one stream (``OUT/<stream>.star``).

    Micrographs' rows are collected as they are committed and the file is written in one go
    (batch extraction writes it once, at the end).
    """

    def __init__(self, output_dir: str | os.PathLike[str], stream: str) -> None:
        self.path = Path(output_dir) / stream_star_name(stream)
        self.stream = stream
        self._groups: dict[int, OpticsGroup] = {}
        self._pixel: dict[int, tuple[float, int]] = {}
        self._chunks: list[pd.DataFrame] = []
        self.count = 0

    def add(self, rows: pd.DataFrame, group: OpticsGroup, pixel_size_a: float, box: int) -> None:
        """Add one micrograph's rows (already carrying ``rlnOpticsGroup`` = ``group.number``)."""
        if len(rows) == 0:
            return
        known = self._pixel.get(group.number)
        if known is not None and (abs(known[0] - pixel_size_a) > 1e-6 or known[1] != box):
            raise ValueError(
                f"optics group {group.number}: pixel size {pixel_size_a:g} Å / box {box} differ "
                f"from earlier micrographs ({known[0]:g} Å / {known[1]})"
            )
        self._groups[group.number] = group
        self._pixel[group.number] = (pixel_size_a, box)
        self._chunks.append(rows)
        self.count += len(rows)

    def missing_optics(self) -> list[str]:
        """Optics columns RELION 3.1 needs to read the file at all (voltage, Cs, Q0) that are
        unknown for some group: with a glob of micrographs and no CTF table, nothing says."""
        needed = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
        table = self.optics()
        if table.empty:
            return []
        return [c for c in needed if c not in table or bool(table[c].isna().any())]

    def optics(self) -> pd.DataFrame:
        """The ``data_optics`` table of the set."""
        tables = [optics_table([self._groups[n]], *self._pixel[n]) for n in sorted(self._groups)]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()

    def particles(self) -> pd.DataFrame:
        """All rows added so far."""
        if not self._chunks:
            return pd.DataFrame()
        return pd.concat(self._chunks, ignore_index=True)

    def write(self) -> None:
        """Write ``OUT/<stream>.star`` atomically (nothing when the set is empty)."""
        if not self._chunks:
            return
        text = (
            format_star_block("optics", self.optics())
            + "\n"
            + format_star_block("particles", self.particles())
        )
        with atomic_write(self.path, "w") as handle:
            handle.write(text)


def stream_folder(stream: str) -> str:
    """Output folder of a stream (DESIGN.md §6): ``particles`` → ``Particles``,
    ``particles_small`` → ``ParticlesSmall``."""
    check_stream_name(stream)
    return "".join(part.capitalize() for part in stream.split("_"))
