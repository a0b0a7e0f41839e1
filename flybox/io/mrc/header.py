"""The MRC2014 main header (ALGORITHMS.md §16): its layout, and new headers for writers."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["HEADER_BYTES", "HEADER_DTYPE", "new_header", "set_stats"]

#: Size of the fixed MRC header in bytes.
HEADER_BYTES = 1024

#: MRC2014 main header, little-endian; ``newbyteorder('>')`` for big-endian files.
HEADER_DTYPE = np.dtype(
    [
        ("nx", "<i4"), ("ny", "<i4"), ("nz", "<i4"), ("mode", "<i4"),
        ("nxstart", "<i4"), ("nystart", "<i4"), ("nzstart", "<i4"),
        ("mx", "<i4"), ("my", "<i4"), ("mz", "<i4"),
        ("cella", "<f4", (3,)), ("cellb", "<f4", (3,)),
        ("mapc", "<i4"), ("mapr", "<i4"), ("maps", "<i4"),
        ("dmin", "<f4"), ("dmax", "<f4"), ("dmean", "<f4"),
        ("ispg", "<i4"), ("nsymbt", "<i4"),
        ("extra1", "V8"), ("exttyp", "S4"), ("nversion", "<i4"), ("extra2", "V84"),
        ("origin", "<f4", (3,)), ("map", "S4"), ("machst", "u1", (4,)),
        ("rms", "<f4"), ("nlabl", "<i4"), ("label", "S80", (10,)),
    ]
)  # fmt: skip
assert HEADER_DTYPE.itemsize == HEADER_BYTES


def new_header(
    mode: int,
    shape: tuple[int, int, int],
    grid: tuple[int, int, int],
    cell: tuple[float, float, float],
    ispg: int,
    stats: tuple[float, float, float, float],
) -> npt.NDArray[np.void]:
    header = np.zeros((), dtype=HEADER_DTYPE)
    header["nz"], header["ny"], header["nx"] = shape
    header["mode"] = mode
    header["mx"], header["my"], header["mz"] = grid
    header["cella"] = cell
    header["cellb"] = (90.0, 90.0, 90.0)
    header["mapc"], header["mapr"], header["maps"] = 1, 2, 3
    header["ispg"] = ispg
    header["nversion"] = 20140
    header["map"] = b"MAP "
    header["machst"] = (0x44, 0x44, 0, 0)
    header["nlabl"] = 1
    header["label"][0] = b"flybox"
    set_stats(header, stats)
    return header


def set_stats(header: npt.NDArray[np.void], stats: tuple[float, float, float, float]) -> None:
    header["dmin"], header["dmax"], header["dmean"], header["rms"] = stats
