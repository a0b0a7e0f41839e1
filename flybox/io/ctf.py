"""CTF parameters from RELION STAR files, CTFFIND4 text output and cryoSPARC ``.cs`` arrays.

Everything is converted to :class:`~flybox.types.CtfParams` in RELION's units and conventions
(ALGORITHMS.md §7.1): defocus in Å (positive = underfocus), astigmatism angle and phase shift in
degrees, voltage in kV, Cs in mm.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from flybox.errors import CtfFormatError, StarFormatError
from flybox.io.coords import is_number
from flybox.io.star import optics_groups, read_relion_star
from flybox.types import CtfParams, OpticsGroup

__all__ = [
    "read_cs_ctf_per_row",
    "read_ctf",
    "read_micrographs_star",
]

PathLike = str | os.PathLike[str]

#: RELION micrograph columns that go into :attr:`CtfParams.extra` when present.
_EXTRA_COLUMNS = ("rlnCtfMaxResolution", "rlnCtfFigureOfMerit")
_DEFOCUS_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
_CTFFIND_HEADER = {
    "voltage_kv": re.compile(r"acceleration voltage:\s*([-+0-9.eE]+)"),
    "cs_mm": re.compile(r"spherical aberration:\s*([-+0-9.eE]+)"),
    "amplitude_contrast": re.compile(r"amplitude contrast:\s*([-+0-9.eE]+)"),
}
_CTFFIND_INPUT = re.compile(r"Input file:\s*(.*?)\s*;\s*Number of micrographs:\s*(\d+)")


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` for missing values."""
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def read_micrographs_star(
    path: PathLike,
) -> tuple[pd.DataFrame, dict[int, OpticsGroup], dict[str, CtfParams]]:
    """Read a RELION micrographs STAR (``micrographs.star`` or ``micrographs_ctf.star``).

    Parameters
    ----------
    path
        RELION 3.0, 3.1/4 or 5 micrographs STAR.

    Returns
    -------
    rows, optics, ctfs
        The ``data_micrographs`` rows (``rlnMicrographName``, ``rlnOpticsGroup``…), optics
        groups by number (empty when the file has no optics information), and the CTF of each
        micrograph that has ``rlnDefocusU/V/Angle`` (empty when the file has no CTF columns),
        keyed by ``rlnMicrographName`` as written. Voltage, Cs and Q0 come from the row's optics
        group (RELION 3.0 per-row values are turned into optics groups first).

    Raises
    ------
    CtfFormatError
        The file cannot be parsed or has no ``rlnMicrographName``.
    """
    try:
        table = read_relion_star(path, "micrographs")
    except StarFormatError as exc:
        raise CtfFormatError(path, exc.problem) from exc
    groups = optics_groups(table.optics) if table.optics is not None else {}
    rows = table.rows
    ctfs: dict[str, CtfParams] = {}
    if not all(c in rows.columns for c in _DEFOCUS_COLUMNS):
        return rows, groups, ctfs
    for index, record in enumerate(rows.to_dict("records"), start=1):
        try:
            ctf = _star_row_ctf(record, groups)
        except (TypeError, ValueError) as exc:
            raise CtfFormatError(path, f"row {index}: non-numeric CTF value ({exc})") from exc
        name = str(record["rlnMicrographName"])
        if ctf is not None and name not in ctfs:
            ctfs[name] = ctf
    return rows, groups, ctfs


def _star_row_ctf(record: dict[Any, Any], groups: Mapping[int, OpticsGroup]) -> CtfParams | None:
    """The CTF of one micrographs-STAR row, ``None`` when its defocus is missing."""
    u, v, angle = (_number(record[c]) for c in _DEFOCUS_COLUMNS)
    if u is None or v is None or angle is None:
        return None
    group_id = _number(record.get("rlnOpticsGroup"))
    group = groups.get(int(group_id)) if group_id is not None else None
    phase = _number(record.get("rlnPhaseShift"))
    bfactor = _number(record.get("rlnCtfBfactor"))
    scale = _number(record.get("rlnCtfScalefactor"))
    extra = {c: _number(record.get(c)) for c in _EXTRA_COLUMNS}
    return CtfParams(
        defocus_u_a=u,
        defocus_v_a=v,
        defocus_angle_deg=angle,
        voltage_kv=group.voltage_kv if group else None,
        cs_mm=group.cs_mm if group else None,
        amplitude_contrast=group.amplitude_contrast if group else None,
        phase_shift_deg=phase if phase is not None else 0.0,
        bfactor_a2=bfactor if bfactor is not None else 0.0,
        scale=scale if scale is not None else 1.0,
        extra={k: v for k, v in extra.items() if v is not None},
    )


def _read_ctffind(path: PathLike) -> dict[str, CtfParams]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise CtfFormatError(path, "not a text file") from exc
    header = "\n".join(line for line in lines if line.startswith("#"))
    source = _CTFFIND_INPUT.search(header)
    if source is None:
        raise CtfFormatError(path, "no '# Input file: … ; Number of micrographs: …' header line")
    optics: dict[str, float | None] = {}
    for key, pattern in _CTFFIND_HEADER.items():
        found = pattern.search(header)
        optics[key] = float(found.group(1)) if found else None
    name, count = source.group(1), int(source.group(2))
    ctfs: dict[str, CtfParams] = {}
    for number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or line.startswith("#"):
            continue
        if len(tokens) < 7:
            raise CtfFormatError(path, f"line {number}: expected 7 columns, got {len(tokens)}")
        try:
            values = [float(t) for t in tokens[:7]]
        except ValueError:
            bad = next(t for t in tokens[:7] if not is_number(t))
            raise CtfFormatError(path, f"line {number}: expected a number, got {bad!r}") from None
        key = name if count == 1 else f"{int(values[0]):06d}@{name}"
        ctfs[key] = CtfParams(
            defocus_u_a=values[1],
            defocus_v_a=values[2],
            defocus_angle_deg=values[3],
            voltage_kv=optics["voltage_kv"],
            cs_mm=optics["cs_mm"],
            amplitude_contrast=optics["amplitude_contrast"],
            phase_shift_deg=math.degrees(values[4]),
            extra={"rlnCtfFigureOfMerit": values[5], "rlnCtfMaxResolution": values[6]},
        )
    if not ctfs:
        raise CtfFormatError(path, "no defocus rows")
    return ctfs


def _load_cs(path: PathLike) -> npt.NDArray[np.void]:
    try:
        array: npt.NDArray[np.void] = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CtfFormatError(path, f"not a cryoSPARC .cs array ({exc})") from exc
    names = array.dtype.names or ()
    for field in ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad"):
        if field not in names:
            raise CtfFormatError(path, f"no {field} field: the .cs file has no CTF")
    return array


def _decoded(values: npt.NDArray[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]


def read_cs_ctf_per_row(path: PathLike) -> pd.DataFrame:
    """Per-row CTF of a cryoSPARC ``.cs`` file, with RELION column names and units.

    Parameters
    ----------
    path
        A cryoSPARC particle or exposure ``.cs`` with ``ctf/*`` fields.

    Returns
    -------
    pandas.DataFrame
        ``rlnDefocusU``, ``rlnDefocusV`` (Å), ``rlnDefocusAngle``, ``rlnPhaseShift`` (degrees,
        converted from radians), ``rlnVoltage``, ``rlnSphericalAberration``,
        ``rlnAmplitudeContrast``, ``rlnCtfBfactor`` and ``rlnCtfScalefactor`` where the file has
        them, ``rlnMicrographName`` (``location/micrograph_path``) and ``rlnImageName``
        (``blob/idx + 1 @ blob/path``) where available.

    Raises
    ------
    CtfFormatError
        Not a ``.cs`` array, or no ``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad`` fields.
    """
    return _cs_table(_load_cs(path))


def _cs_table(array: npt.NDArray[np.void]) -> pd.DataFrame:
    names = array.dtype.names or ()

    def column(field: str) -> npt.NDArray[np.float64]:
        # float32 fields are read through their shortest decimal form (2.7, not 2.70000005)
        values = np.asarray(array[field])
        if values.dtype == np.float32:
            return values.astype(str).astype(np.float64)
        return values.astype(np.float64)

    table = pd.DataFrame(
        {
            "rlnDefocusU": column("ctf/df1_A"),
            "rlnDefocusV": column("ctf/df2_A"),
            "rlnDefocusAngle": np.degrees(column("ctf/df_angle_rad")),
        }
    )
    optional = {
        "ctf/phase_shift_rad": "rlnPhaseShift",
        "ctf/accel_kv": "rlnVoltage",
        "ctf/cs_mm": "rlnSphericalAberration",
        "ctf/amp_contrast": "rlnAmplitudeContrast",
        "ctf/bfactor": "rlnCtfBfactor",
        "ctf/scale": "rlnCtfScalefactor",
    }
    for field, label in optional.items():
        if field in names:
            values = column(field)
            table[label] = np.degrees(values) if field == "ctf/phase_shift_rad" else values
    if "location/micrograph_path" in names:
        table["rlnMicrographName"] = _decoded(array["location/micrograph_path"])
    if "blob/path" in names and "blob/idx" in names:
        index = np.asarray(array["blob/idx"], dtype=np.int64) + 1
        paths = _decoded(array["blob/path"])
        table["rlnImageName"] = [f"{i:06d}@{p}" for i, p in zip(index.tolist(), paths, strict=True)]
    return table


def _read_cs(path: PathLike) -> dict[str, CtfParams]:
    array = _load_cs(path)
    table = _cs_table(array)
    names = array.dtype.names or ()
    if "location/micrograph_path" in names:
        keys = table["rlnMicrographName"].tolist()
    elif "blob/path" in names:
        keys = _decoded(array["blob/path"])
    else:
        raise CtfFormatError(path, "no location/micrograph_path or blob/path field to key by")
    ctfs: dict[str, CtfParams] = {}
    for key, record in zip(keys, table.to_dict("records"), strict=True):
        if key in ctfs:
            continue  # particle-level files repeat the micrograph's CTF: keep the first row
        ctfs[key] = CtfParams(
            defocus_u_a=float(record["rlnDefocusU"]),
            defocus_v_a=float(record["rlnDefocusV"]),
            defocus_angle_deg=float(record["rlnDefocusAngle"]),
            voltage_kv=_number(record.get("rlnVoltage")),
            cs_mm=_number(record.get("rlnSphericalAberration")),
            amplitude_contrast=_number(record.get("rlnAmplitudeContrast")),
            phase_shift_deg=float(record.get("rlnPhaseShift", 0.0)),
            bfactor_a2=float(record.get("rlnCtfBfactor", 0.0)),
            scale=float(record.get("rlnCtfScalefactor", 1.0)),
        )
    return ctfs


def read_ctf(path: PathLike) -> dict[str, CtfParams]:
    """Read per-micrograph CTF parameters from any supported file.

    Parameters
    ----------
    path
        ``*.star``: RELION micrographs STAR with ``rlnDefocusU/V/Angle`` (voltage, Cs, Q0 from
        the optics group); ``*.cs``: cryoSPARC array with ``ctf/*`` fields (radians converted
        to degrees; keyed by ``location/micrograph_path``, else ``blob/path``, first row of each);
        anything else: CTFFIND4 diagnostic text output (phase shift converted from radians;
        cross correlation → ``rlnCtfFigureOfMerit`` and fit resolution →
        ``rlnCtfMaxResolution`` in ``extra``; keyed by the input file name, or
        ``NNNNNN@name`` for a multi-image input).

    Returns
    -------
    dict
        Micrograph name as written in the file → CTF.

    Raises
    ------
    CtfFormatError
        Unreadable or malformed file.
    """
    suffix = PurePath(os.fspath(path)).suffix.lower()
    try:
        if suffix == ".star":
            return read_micrographs_star(path)[2]
        if suffix == ".cs":
            return _read_cs(path)
        return _read_ctffind(path)
    except OSError as exc:
        raise CtfFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
