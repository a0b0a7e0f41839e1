"""Checks that catch the settings that silently lose particles (issue 10).

A pixel size given in the configuration or on the command line overrides the MRC header and the
CTF table; when it disagrees with them by more than :data:`PIXEL_SIZE_TOLERANCE`, coordinates
are rescaled by the wrong factor and most particles are lost or misplaced. Picks that fall
outside their micrograph en masse (more than :data:`OUTSIDE_FRACTION`) have the same cause.
These functions return the one-line warning (or ``None``); callers log it, once.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd

__all__ = [
    "OUTSIDE_FRACTION",
    "PIXEL_SIZE_TOLERANCE",
    "missing_input_warning",
    "outside_picks_warning",
    "pixel_size_warning",
]

#: Relative disagreement between a given pixel size and the header's or CTF table's that is
#: reported.
PIXEL_SIZE_TOLERANCE = 0.01

#: Fraction of a micrograph's picks outside it above which a warning names the likely cause.
OUTSIDE_FRACTION = 0.5


def pixel_size_warning(
    given_a: float | None, reference_a: float | None, given_by: str, reference: str
) -> str | None:
    """A warning when a given pixel size disagrees with another source by more than 1 %.

    Parameters
    ----------
    given_a
        The pixel size that is used (Å), e.g. ``[micrograph] pixel_size``.
    reference_a
        What another source says (Å): the MRC header, the CTF table.
    given_by, reference
        How to name both in the message (``"micrograph.pixel_size"``, ``"the MRC header of
        X"``).
    """
    if not given_a or not reference_a:
        return None
    if abs(given_a - reference_a) <= PIXEL_SIZE_TOLERANCE * reference_a:
        return None
    return (
        f"{given_by} = {given_a:g} Å disagrees with {reference} ({reference_a:g} Å) by "
        f"{abs(given_a / reference_a - 1):.0%}; coordinates and the optics table use "
        f"{given_a:g} Å (remove the override to use {reference_a:g} Å)"
    )


def outside_picks_warning(
    picks: pd.DataFrame, shape: tuple[int, int], micrograph: str, picking_pixel_size_a: float | None
) -> str | None:
    """A warning when more than half of a micrograph's picks lie outside it.

    Parameters
    ----------
    picks
        Picks in micrograph pixels (``rlnCoordinateX/Y``), after any rescaling.
    shape
        ``(ny, nx)`` of the micrograph.
    micrograph
        Its path, for the message.
    picking_pixel_size_a
        The picking pixel size in use, if any (the likely cause).
    """
    if len(picks) == 0 or "rlnCoordinateX" not in picks:
        return None
    x = picks["rlnCoordinateX"].to_numpy(dtype=float)
    y = picks["rlnCoordinateY"].to_numpy(dtype=float)
    ny, nx = shape
    outside = int(np.count_nonzero((x < 0) | (y < 0) | (x >= nx) | (y >= ny)))
    if outside <= OUTSIDE_FRACTION * len(picks):
        return None
    cause = (
        f"the picking pixel size ({picking_pixel_size_a:g} Å) is probably wrong"
        if picking_pixel_size_a
        else "the coordinates probably refer to a binned micrograph: set the picking pixel size"
    )
    return f"{micrograph}: {outside} of {len(picks)} picks fall outside the micrograph; {cause}"


def _folder_of(pattern: str) -> str:
    """The longest leading folder of a glob pattern without wildcards."""
    parts = pattern.split(os.sep)
    fixed: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def missing_input_warning(key: str, pattern: str) -> str | None:
    """A warning when a watched pattern's folder (or a plain file name) does not exist."""
    if not glob.has_magic(pattern):
        if os.path.exists(pattern):
            return None
        return f"{key}: {pattern} does not exist (yet)"
    folder = _folder_of(pattern)
    if os.path.isdir(folder):
        return None
    return f"{key}: folder {folder} does not exist (yet); nothing can match {pattern}"
