"""Particle coordinates from the common pickers, as particle centres (ALGORITHMS.md §14).

Every reader returns one row per pick with ``rlnCoordinateX`` / ``rlnCoordinateY``: float64
centres in pixels of the picked image, in the MRC array frame (x = column, y = row, 0-based, no
y flip unless the format needs one), plus ``rlnAutopickFigureOfMerit`` when the format carries a
score. Malformed input raises one :class:`~flybox.errors.CoordinateFormatError` naming the file
and, for text formats, the line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from flybox.errors import CoordinateFormatError, StarFormatError
from flybox.io.star import read_relion_star, read_star, write_star
from flybox.types import CTF_STAR_COLUMNS

__all__ = [
    "PICK_COLUMNS",
    "CoordFormat",
    "detect_format",
    "is_number",
    "pick_columns",
    "read_coordinates",
    "write_coordinates_star",
]

PathLike = str | os.PathLike[str]
CoordFormat = Literal[
    "relion_star", "eman_box", "cryolo_cbox", "xmipp_pos", "topaz", "cryosparc_cs", "text"
]

X, Y, FOM, MIC = "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnMicrographName"
_BY_EXTENSION: dict[str, CoordFormat] = {
    ".star": "relion_star",
    ".box": "eman_box",
    ".cbox": "cryolo_cbox",
    ".pos": "xmipp_pos",
    ".cs": "cryosparc_cs",
}
#: crYOLO columns kept (when not all missing) under flybox's picker-prefixed names.
_CBOX_EXTRA = {
    "CoordinateZ": "rlnCoordinateZ",
    "EstWidth": "cryoloEstWidth",
    "EstHeight": "cryoloEstHeight",
    "NumBoxes": "cryoloNumBoxes",
    "Angle": "cryoloAngle",
    "filamentid": "cryoloFilamentId",
}


#: RELION columns of a picks table that describe the pick itself and go into the particle
#: STAR file (position, score, class, angles, helical tube, per-particle CTF and origin).
#: Any other ``rln*`` column of a picks file (``rlnCtfImage``, ``rlnImageName``…) names
#: something of the picker's project and is not copied (see :func:`pick_columns`).
PICK_COLUMNS = frozenset(
    {
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnCoordinateZ",
        "rlnAutopickFigureOfMerit",
        "rlnClassNumber",
        "rlnAnglePsi",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnHelicalTubeID",
        "rlnHelicalTrackLength",
        "rlnHelicalTrackLengthAngst",
        *CTF_STAR_COLUMNS,
        "rlnCtfMaxResolution",
        "rlnCtfFigureOfMerit",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnMicrographName",
    }
)


def pick_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` without the ``rln*`` columns that are not in :data:`PICK_COLUMNS` (other
    columns, such as crYOLO's and Xmipp's under flybox's names, stay)."""
    extra = [c for c in table.columns if str(c).startswith("rln") and c not in PICK_COLUMNS]
    if not extra:
        return table
    kept = table.drop(columns=extra)
    kept.attrs.update(table.attrs)
    return kept


def detect_format(path: PathLike) -> CoordFormat:
    """Guess the coordinate format of ``path`` from its extension and, for text, its header.

    Parameters
    ----------
    path
        A coordinate file.

    Returns
    -------
    CoordFormat
        ``.star`` → ``relion_star``, ``.box`` → ``eman_box``, ``.cbox`` → ``cryolo_cbox``,
        ``.pos`` → ``xmipp_pos``, ``.cs`` → ``cryosparc_cs``; any other file is ``topaz`` when
        its first line names ``image_name`` and ``x_coord``, else ``text``.
    """
    suffix = Path(path).suffix.lower()
    if suffix in _BY_EXTENSION:
        return _BY_EXTENSION[suffix]
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().split()
    except OSError:
        return "text"
    return "topaz" if {"image_name", "x_coord"} <= set(first) else "text"


#: Bounds of a coordinate file (beyond them it is refused before parsing, so that one file
#: can neither take the memory nor the time of the service: cost stays linear in the size).
MAX_BYTES = 64 << 20
MAX_LINE_BYTES = 64 << 10
MAX_ROWS = 2_000_000
MAX_COLUMNS = 1_000


def check_text_bounds(path: PathLike) -> None:
    """Refuse a text coordinate file that is too large, binary or not UTF-8, has a line
    longer than :data:`MAX_LINE_BYTES`, more than :data:`MAX_ROWS` lines or more than
    :data:`MAX_COLUMNS` STAR labels (one linear pass over at most :data:`MAX_BYTES`).

    Raises
    ------
    CoordinateFormatError
        Naming the bound.
    """
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise CoordinateFormatError(
            path, f"{size} bytes: larger than {MAX_BYTES >> 20} MiB, not a coordinate file"
        )
    with open(path, "rb") as handle:
        data = handle.read()  # size checked above (a read(n) would allocate n)
    if b"\0" in data:
        raise CoordinateFormatError(path, "not a text file (NUL bytes)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CoordinateFormatError(
            path, f"not a text file (not UTF-8 at byte {exc.start})"
        ) from None
    lines = data.count(b"\n") + 1
    if lines > MAX_ROWS:
        raise CoordinateFormatError(path, f"{lines} lines: more than {MAX_ROWS}")
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > MAX_LINE_BYTES:
            number = data.count(b"\n", 0, start) + 1
            raise CoordinateFormatError(
                path, f"line {number}: {end - start} bytes, longer than {MAX_LINE_BYTES}"
            )
        start = end + 1
    labels = data.count(b"\n_") + data.startswith(b"_")
    if labels > MAX_COLUMNS:
        raise CoordinateFormatError(path, f"{labels} STAR labels: more than {MAX_COLUMNS}")


def _frame(x: Any, y: Any, **columns: Any) -> pd.DataFrame:
    table = pd.DataFrame({X: np.asarray(x, dtype=np.float64), Y: np.asarray(y, dtype=np.float64)})
    for name, values in columns.items():
        if values is not None:
            table[name] = values
    return table


def _numeric_lines(
    path: PathLike, counts: tuple[int, ...], *, allow_header: bool
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Parse a whitespace/comma separated table of numbers with ``#`` comments, line by line.

    Rows have one of ``counts`` columns and are padded with NaN to the widest; with
    ``allow_header`` a non-numeric first line is skipped as a header.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise CoordinateFormatError(path, "not a text file") from exc
    width = max(counts)
    expected = " or ".join(str(c) for c in counts)
    rows: list[list[float]] = []
    seen_header = not allow_header
    for number, line in enumerate(lines, start=1):
        tokens = line.split("#", 1)[0].replace(",", " ").split()
        if not tokens:
            continue
        if len(tokens) not in counts:
            raise CoordinateFormatError(
                path, f"line {number}: expected {expected} columns, got {len(tokens)}"
            )
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            if not rows and not seen_header:
                seen_header = True
                continue
            bad = next(t for t in tokens if not is_number(t))
            raise CoordinateFormatError(
                path, f"line {number}: expected {expected} numeric columns, got {bad!r}"
            ) from None
        rows.append(values + [np.nan] * (width - len(values)))
    return np.array(rows, dtype=np.float64).reshape(len(rows), width)


def is_number(token: str) -> bool:
    """Whether a text token is a number as Python reads it (``1e3``, ``-0.5``, ``nan``)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def _read_eman_box(path: PathLike) -> pd.DataFrame:
    values = _numeric_lines(path, (4, 5), allow_header=False)
    sizes = values[:, 2:4]
    table = _frame(values[:, 0] + sizes[:, 0] / 2, values[:, 1] + sizes[:, 1] / 2)
    if values.shape[0] and not np.isnan(values[:, 4]).all():
        table[FOM] = values[:, 4]
    if values.shape[0]:
        table.attrs["box_size"] = float(np.median(sizes[:, 0]))
    return table


def _read_text(path: PathLike) -> pd.DataFrame:
    values = _numeric_lines(path, (2, 3), allow_header=True)
    table = _frame(values[:, 0], values[:, 1])
    if values.shape[0] and not np.isnan(values[:, 2]).all():
        table[FOM] = values[:, 2]
    return table


def _read_topaz(path: PathLike) -> pd.DataFrame:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.rstrip("\n") for line in fh]
    except UnicodeDecodeError as exc:
        raise CoordinateFormatError(path, "not a text file") from exc
    body = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not body:
        return _frame([], [], **{MIC: pd.Series([], dtype=str)})
    header = body[0][1].split()
    if not {"image_name", "x_coord", "y_coord"} <= set(header):
        raise CoordinateFormatError(
            path, "line 1: expected a Topaz header image_name x_coord y_coord"
        )
    index = {name: i for i, name in enumerate(header)}
    names, xs, ys, scores = [], [], [], []
    for number, line in body[1:]:
        tokens = line.split("\t") if "\t" in line else line.split()
        if len(tokens) != len(header):
            raise CoordinateFormatError(
                path, f"line {number}: expected {len(header)} columns, got {len(tokens)}"
            )
        try:
            xs.append(float(tokens[index["x_coord"]]))
            ys.append(float(tokens[index["y_coord"]]))
            if "score" in index:
                scores.append(float(tokens[index["score"]]))
        except ValueError:
            bad = next(t for t in tokens[1:] if not is_number(t))
            raise CoordinateFormatError(
                path, f"line {number}: expected numeric x_coord/y_coord/score, got {bad!r}"
            ) from None
        names.append(tokens[index["image_name"]])
    return _frame(xs, ys, **{FOM: scores if "score" in index else None, MIC: names})


def _star_blocks(path: PathLike) -> dict[str, Any]:
    if os.path.getsize(path) == 0:
        return {}
    try:
        blocks = read_star(path)
    except StarFormatError as exc:
        raise CoordinateFormatError(path, exc.problem) from exc
    if not blocks:
        with open(path, "rb") as handle:
            text = handle.read()
        if any(line.strip() and not line.lstrip().startswith(b"#") for line in text.split(b"\n")):
            raise CoordinateFormatError(path, "no data_ block: not a STAR file")
    return blocks


def _numeric_column(path: PathLike, table: pd.DataFrame, column: str) -> np.ndarray[Any, Any]:
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    raw = table[column]
    bad = np.isnan(values) & raw.notna().to_numpy() & (raw.astype(str) != "<NA>").to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CoordinateFormatError(
            path, f"row {row + 1}: non-numeric _{column} value {raw.iloc[row]!r}"
        )
    return values


def _read_cbox(path: PathLike) -> pd.DataFrame:
    blocks = _star_blocks(path)
    table = blocks.get("cryolo")
    if table is None:
        if blocks:
            raise CoordinateFormatError(path, "no data_cryolo block: not a crYOLO .cbox file")
        return _frame([], [])
    if not isinstance(table, pd.DataFrame):
        raise CoordinateFormatError(path, "data_cryolo is not a loop")
    for column in ("CoordinateX", "CoordinateY", "Width"):
        if column not in table.columns:
            raise CoordinateFormatError(path, f"data_cryolo has no _{column} column")
    width = _numeric_column(path, table, "Width")
    height = _numeric_column(path, table, "Height") if "Height" in table.columns else width
    x = _numeric_column(path, table, "CoordinateX") + width / 2
    y = _numeric_column(path, table, "CoordinateY") + height / 2
    out = _frame(x, y)
    if "Confidence" in table.columns:
        confidence = _numeric_column(path, table, "Confidence")
        if not np.isnan(confidence).all():
            out[FOM] = confidence
    for column, name in _CBOX_EXTRA.items():
        if column in table.columns:
            values = _numeric_column(path, table, column)
            if not np.isnan(values).all():
                out[name] = values
    if len(out):
        out.attrs["box_size"] = float(np.nanmedian(width))
    return out


def _read_xmipp_pos(path: PathLike) -> pd.DataFrame:
    blocks = _star_blocks(path)
    tables = [
        blocks[name]
        for name in ("particles", "particles_auto")
        if isinstance(blocks.get(name), pd.DataFrame)
    ]
    if not tables:
        if any(isinstance(b, pd.DataFrame) and "xcoor" in b for b in blocks.values()):
            tables = [b for b in blocks.values() if isinstance(b, pd.DataFrame) and "xcoor" in b]
        elif blocks:
            raise CoordinateFormatError(path, "no data_particles block: not an Xmipp .pos file")
        else:
            return _frame([], [])
    table = pd.concat(tables, ignore_index=True)
    for column in ("xcoor", "ycoor"):
        if column not in table.columns:
            raise CoordinateFormatError(path, f"particle block has no _{column} column")
    if "enabled" in table.columns:
        table = table[_numeric_column(path, table, "enabled") != -1].reset_index(drop=True)
    out = _frame(_numeric_column(path, table, "xcoor"), _numeric_column(path, table, "ycoor"))
    if "cost" in table.columns:
        out[FOM] = _numeric_column(path, table, "cost")
    for column in ("scoreByVariance", "scoreByGiniCoeff"):
        if column in table.columns:
            out[f"xmipp{column[0].upper()}{column[1:]}"] = _numeric_column(path, table, column)
    return out


def _read_relion_star(path: PathLike) -> pd.DataFrame:
    if os.path.getsize(path) == 0:
        return _frame([], [])
    try:
        rows = read_relion_star(path, "coordinates").rows
    except StarFormatError as exc:
        raise CoordinateFormatError(path, exc.problem) from exc
    out = _frame(_numeric_column(path, rows, X), _numeric_column(path, rows, Y))
    for column in rows.columns:
        if column not in (X, Y):
            out[column] = rows[column].to_numpy()
    if FOM in out.columns:
        out[FOM] = _numeric_column(path, rows, FOM)
    return out


def _read_cryosparc(path: PathLike, *, flip_y: bool) -> pd.DataFrame:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CoordinateFormatError(path, f"not a cryoSPARC .cs array ({exc})") from exc
    names = array.dtype.names or ()
    for field in ("location/center_x_frac", "location/center_y_frac", "location/micrograph_shape"):
        if field not in names:
            raise CoordinateFormatError(path, f"no {field} field: not a picks .cs")
    shape = np.asarray(array["location/micrograph_shape"], dtype=np.float64).reshape(-1, 2)
    fx = np.asarray(array["location/center_x_frac"], dtype=np.float64)
    fy = np.asarray(array["location/center_y_frac"], dtype=np.float64)
    y = (1.0 - fy) * shape[:, 0] if flip_y else fy * shape[:, 0]
    out = _frame(fx * shape[:, 1], y)
    if "pick_stats/ncc_score" in names:
        out[FOM] = np.asarray(array["pick_stats/ncc_score"], dtype=np.float64)
    if "location/micrograph_path" in names:
        raw = array["location/micrograph_path"].tolist()
        out[MIC] = pd.Series(
            [v.decode() if isinstance(v, bytes) else str(v) for v in raw], dtype=str
        )
    return out


def read_coordinates(
    path: PathLike,
    *,
    fmt: CoordFormat | None = None,
    min_fom: float | None = None,
    cs_flip_y: bool = True,
) -> pd.DataFrame:
    """Read particle picks as centres in pixels of the picked image.

    Parameters
    ----------
    path
        Coordinate file.
    fmt
        Its format; detected with :func:`detect_format` when ``None``.
    min_fom
        Keep only picks with figure of merit strictly greater than this (RELION's
        ``--minimum_pick_fom``); ignored when the file has no score.
    cs_flip_y
        cryoSPARC only: ``y = (1 − center_y_frac)·ny`` (pyem's default, right for MotionCor2 /
        RELION micrographs) instead of ``y = center_y_frac·ny``.

    Returns
    -------
    pandas.DataFrame
        ``rlnCoordinateX``, ``rlnCoordinateY`` (float64 centres, array frame), optional
        ``rlnAutopickFigureOfMerit`` and ``rlnMicrographName`` (formats that list several
        micrographs), and other columns of the format (RELION names where they exist).
        ``attrs["box_size"]`` is the picking box in pixels when the format has one (EMAN width;
        crYOLO median width).

        Conventions: EMAN ``.box`` and crYOLO ``.cbox`` store the lower-left corner, so the
        centre is corner + size/2, no y flip; Xmipp ``.pos`` stores centres and drops
        ``_enabled = -1``; Topaz and plain text store centres; cryoSPARC stores fractions of the
        micrograph shape ``[ny, nx]``. A 0-byte text file holds zero picks.

    Raises
    ------
    CoordinateFormatError
        Unreadable or malformed file (one line naming the file and, where known, the line).
    """
    chosen = fmt or detect_format(path)
    if chosen not in get_args(CoordFormat):
        raise ValueError(f"unknown coordinate format {chosen!r}")
    try:
        if chosen == "cryosparc_cs":
            size = os.path.getsize(path)
            if size > MAX_BYTES:
                raise CoordinateFormatError(
                    path, f"{size} bytes: larger than {MAX_BYTES >> 20} MiB"
                )
        else:
            check_text_bounds(path)
        if chosen == "eman_box":
            table = _read_eman_box(path)
        elif chosen == "text":
            table = _read_text(path)
        elif chosen == "topaz":
            table = _read_topaz(path)
        elif chosen == "cryolo_cbox":
            table = _read_cbox(path)
        elif chosen == "xmipp_pos":
            table = _read_xmipp_pos(path)
        elif chosen == "cryosparc_cs":
            table = _read_cryosparc(path, flip_y=cs_flip_y)
        else:
            table = _read_relion_star(path)
    except OSError as exc:
        raise CoordinateFormatError(path, f"cannot read: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        # a malformed file that a parser below did not anticipate: still the file's problem
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CoordinateFormatError(path, f"malformed: {reason}") from exc
    if X not in table.columns or Y not in table.columns:
        raise CoordinateFormatError(path, "no x/y coordinate columns")
    bad = ~np.isfinite(table[[X, Y]].to_numpy()).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        x, y = table[X].iloc[row], table[Y].iloc[row]
        raise CoordinateFormatError(path, f"pick {row + 1}: non-finite coordinate ({x}, {y})")
    if min_fom is not None and FOM in table.columns:
        attrs = dict(table.attrs)
        table = table[table[FOM].to_numpy() > min_fom].reset_index(drop=True)
        table.attrs.update(attrs)
    return table


def write_coordinates_star(path: PathLike, table: pd.DataFrame) -> None:
    """Write picks as a RELION coordinate STAR file (``data_`` block), atomically.

    Parameters
    ----------
    path
        Final path (conventionally ``<micrograph stem>_autopick.star``).
    table
        ``rlnCoordinateX``, ``rlnCoordinateY`` in pixels, optionally
        ``rlnAutopickFigureOfMerit``, ``rlnClassNumber`` and ``rlnAnglePsi``.
    """
    columns = [c for c in (X, Y, FOM, "rlnClassNumber", "rlnAnglePsi") if c in table.columns]
    if X not in columns or Y not in columns:
        raise ValueError("coordinates need rlnCoordinateX and rlnCoordinateY columns")
    out = table[columns].reset_index(drop=True)
    out[[X, Y]] = out[[X, Y]].astype(np.float64)
    write_star(path, {"": out})
