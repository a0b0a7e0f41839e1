"""Export a picking session's kept picks as RELION STAR, EMAN ``.box`` or Xmipp ``.pos``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from flybox.errors import InputError
from flybox.io.atomic import atomic_write
from flybox.io.coords import read_coordinates, write_coordinates_star
from flybox.pick.store import PICKS_SUFFIX, SESSION_FILE

__all__ = ["export_session", "write_eman_box", "write_xmipp_pos"]

X, Y, FOM = "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"


def write_eman_box(path: Path, table: pd.DataFrame, box_size: int) -> None:
    """EMAN ``.box``: lower-left corner (centre − box/2, rounded) and the box size, per line."""
    lines = []
    for x, y in table[[X, Y]].to_numpy(dtype=np.float64):
        lines.append(
            f"{round(x - box_size / 2)}\t{round(y - box_size / 2)}\t{box_size}\t{box_size}\n"
        )
    with atomic_write(path, "w") as fh:
        fh.write("".join(lines))


def write_xmipp_pos(path: Path, table: pd.DataFrame, state: str = "Manual") -> None:
    """Xmipp ``.pos`` (XMIPP_STAR_1): centres, ``_cost`` the score (1 when none), enabled."""
    scores = table[FOM].to_numpy(dtype=np.float64) if FOM in table.columns else None
    rows = []
    for i, (x, y) in enumerate(table[[X, Y]].to_numpy(dtype=np.float64)):
        cost = 1.0 if scores is None or scores[i] < 0 else scores[i]
        rows.append(f" {round(x):6d} {round(y):6d} {cost:10.6f} {1:3d}\n")
    text = (
        "# XMIPP_STAR_1 * \n#\ndata_header\nloop_\n _pickingMicrographState\n"
        f"{state}\ndata_particles\nloop_\n _xcoor\n _ycoor\n _cost\n _enabled\n" + "".join(rows)
    )
    with atomic_write(path, "w") as fh:
        fh.write(text)


def export_session(folder: Path, fmt: Literal["star", "box", "pos"], out: Path) -> int:
    """Write ``out/<stem>.star|.box|.pos`` for every micrograph with a picks file.

    Returns
    -------
    int
        How many files were written.

    Raises
    ------
    InputError
        No picking session in ``folder``, or a picks file that does not parse.
    """
    session_path = folder / SESSION_FILE
    try:
        session = json.loads(session_path.read_text())
        particle_size = float(session["particle_size"])
    except FileNotFoundError:
        raise InputError(session_path, "no picking session here") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(session_path, f"not a picking session ({exc})") from exc
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in sorted(folder.glob(f"*{PICKS_SUFFIX}")):
        stem = path.name[: -len(PICKS_SUFFIX)]
        table = read_coordinates(path)
        if fmt == "star":
            write_coordinates_star(out / f"{stem}.star", table)
        elif fmt == "box":
            write_eman_box(out / f"{stem}.box", table, round(particle_size))
        else:
            write_xmipp_pos(out / f"{stem}.pos", table)
        written += 1
    return written
