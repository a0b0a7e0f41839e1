"""Boxes that reach past the micrograph edge: which pixels are outside, and RELION's fill.

See ALGORITHMS.md §3 (border handling): outside pixels take the values of the nearest
inside pixel row/column (RELION's ``--extract`` edge fill), after which statistics are taken.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["apply_edge_fill", "partial_windows"]

FloatArray = npt.NDArray[np.float32]


def partial_windows(windows: npt.NDArray[np.int64], box: int) -> npt.NDArray[np.intp]:
    """Indices of the rows of ``windows`` (``[y0, y1, x0, x1)``) that do not cover the box."""
    full = (
        (windows[:, 0] == 0)
        & (windows[:, 1] == box)
        & (windows[:, 2] == 0)
        & (windows[:, 3] == box)
    )
    return np.flatnonzero(~full)


def apply_edge_fill(images: FloatArray, windows: npt.NDArray[np.int64]) -> FloatArray:
    """Replace pixels outside each particle's valid window by the nearest inside pixel.

    Equivalent to index clamping, ``box[r, c] = box[clip(r, y0, y1-1), clip(c, x0, x1-1)]``,
    which is what RELION's column-then-row fill produces (ALGORITHMS.md §3).

    Parameters
    ----------
    images
        ``(n, b, b)`` images; a new array is returned.
    windows
        ``(n, 4)`` valid windows ``[y0, y1, x0, x1)``; a full window ``[0, b, 0, b)`` leaves
        an image unchanged.
    """
    out = np.array(images, dtype=np.float32, copy=True)
    b = images.shape[-1]
    for k in partial_windows(windows, b):
        y0, y1, x0, x1 = (int(v) for v in windows[k])
        box = out[k]
        # Columns first, then rows (which then carry the filled columns), as RELION does.
        box[y0:y1, :x0] = box[y0:y1, x0 : x0 + 1]
        box[y0:y1, x1:] = box[y0:y1, x1 - 1 : x1]
        box[:y0] = box[y0]
        box[y1:] = box[y1 - 1]
    return out
