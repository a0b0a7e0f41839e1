"""MRC/MRCS reading (ALGORITHMS.md §16).

The header parser is our own (numpy on the first 1024 bytes) so that checking a file that is
still being written costs one small read. Data are memory-mapped where possible. Writers are
crash-safe: :class:`StackWriter` writes to an exact (temporary) path chosen by the caller, and
:func:`write_stack` / :func:`write_volume` go through :mod:`flybox.io.atomic`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flybox.errors import IncompleteFileError, MrcFormatError
from flybox.io.mrc.header import HEADER_BYTES, HEADER_DTYPE

__all__ = [
    "MrcCompleteness",
    "MrcInfo",
    "check_complete",
    "read_header",
    "read_micrograph",
    "read_stack",
    "read_volume",
]

PathLike = str | os.PathLike[str]

#: Supported modes → little-endian element type.
_MODE_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("i1"),
    1: np.dtype("<i2"),
    2: np.dtype("<f4"),
    6: np.dtype("<u2"),
    12: np.dtype("<f2"),
}
_MODE_NAMES = {3: "complex int16", 4: "complex", 101: "4-bit packed"}
_LITTLE_MACHST = (0x44, 0x41)
_BIG_MACHST = 0x11


@dataclass(frozen=True)
class MrcInfo:
    """What an MRC header says about a file.

    Attributes
    ----------
    path
        The file.
    nx, ny, nz
        Columns, rows and sections (images in a stack).
    mode
        MRC data mode (0, 1, 2, 6 or 12).
    dtype
        Native-order element type of the arrays the readers return.
    voxel_size_a
        (x, y, z) voxel size in Å: ``cella / (mx, my, mz)``; 0.0 where unset.
    origin_a
        Header origin in Å.
    ispg
        Space group (0 for image stacks, 1 for volumes, 401 for volume stacks).
    nsymbt
        Bytes of extended header (symmetry records, FEI metadata) before the data.
    exttyp
        Extended header type (``"FEI1"``, ``"FEI2"``, ``"CCP4"``…), ``""`` when absent.
    data_offset
        Byte offset of the first voxel.
    expected_size
        Size in bytes that a complete file has.
    nstart, grid, cell_a, cell_angles_deg, axis_order
        ``nxstart..``, ``mx, my, mz``, ``cella``, ``cellb`` and ``mapc, mapr, maps``.
    stats
        ``(dmin, dmax, dmean, rms)`` as stored in the header.
    nversion
        MRC format version (20140 for MRC2014; 0 in older files).
    labels
        The ``nlabl`` text labels.
    byte_order
        ``"<"`` or ``">"``: byte order of the file.
    raw_header
        The 1024 header bytes, for writing derived files with the same metadata.
    """

    path: str
    nx: int
    ny: int
    nz: int
    mode: int
    dtype: np.dtype[Any]
    voxel_size_a: tuple[float, float, float]
    origin_a: tuple[float, float, float]
    ispg: int
    nsymbt: int
    exttyp: str
    data_offset: int
    expected_size: int
    nstart: tuple[int, int, int] = (0, 0, 0)
    grid: tuple[int, int, int] = (0, 0, 0)
    cell_a: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cell_angles_deg: tuple[float, float, float] = (90.0, 90.0, 90.0)
    axis_order: tuple[int, int, int] = (1, 2, 3)
    stats: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    nversion: int = 0
    labels: tuple[str, ...] = ()
    byte_order: Literal["<", ">"] = "<"
    raw_header: bytes = field(default=b"", repr=False, compare=False)

    @property
    def pixel_size_a(self) -> float | None:
        """X voxel size in Å, ``None`` when unset (0). A value of 1.0 is returned as is."""
        size = self.voxel_size_a[0]
        return size if size > 0 else None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nz, ny, nx)``."""
        return (self.nz, self.ny, self.nx)

    @property
    def file_dtype(self) -> np.dtype[Any]:
        """Element type with the file's byte order (for memory maps)."""
        return self.dtype.newbyteorder(self.byte_order)


@dataclass(frozen=True)
class MrcCompleteness:
    """Outcome of :func:`check_complete`.

    Attributes
    ----------
    complete
        Whether the header is valid and the file has exactly the size it announces.
    expected_bytes, actual_bytes
        Size the header announces (0 when the header is unreadable) and size on disk.
    info
        The parsed header, ``None`` when it could not be read.
    problem
        Why the file is not complete, ``None`` when it is.
    """

    complete: bool
    expected_bytes: int
    actual_bytes: int
    info: MrcInfo | None
    problem: str | None


def _decode(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


def _floats3(values: npt.NDArray[Any]) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def _byte_order(header: npt.NDArray[np.void]) -> Literal["<", ">"]:
    machst = header["machst"]
    if machst[0] in _LITTLE_MACHST:
        return "<"
    if machst[0] == _BIG_MACHST:
        return ">"
    # Old files without a machine stamp: take the byte order in which the header is sane.
    raw = header.tobytes()
    orders: tuple[Literal["<", ">"], ...] = ("<", ">")
    for order in orders:
        words = np.frombuffer(raw, dtype=np.dtype("i4").newbyteorder(order), count=4)
        if (words[:3] > 0).all() and (words[:3] < 1 << 24).all() and 0 <= words[3] < 1 << 16:
            return order
    return "<"


def _parse_header(raw: bytes, path: PathLike) -> MrcInfo:
    header = np.frombuffer(raw, dtype=HEADER_DTYPE, count=1)[0]
    order = _byte_order(header)
    if order == ">":
        header = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(">"), count=1)[0]
    map_id = bytes(header["map"])
    if map_id.strip(b"\0") and not map_id.startswith(b"MAP"):
        raise MrcFormatError(path, f"not an MRC file (bad MAP id {map_id!r})")
    nx, ny, nz = int(header["nx"]), int(header["ny"]), int(header["nz"])
    if min(nx, ny, nz) <= 0:
        raise MrcFormatError(path, f"non-positive dimensions nx={nx} ny={ny} nz={nz}")
    mode = int(header["mode"])
    if mode not in _MODE_DTYPES:
        name = _MODE_NAMES.get(mode, "unknown")
        raise MrcFormatError(path, f"unsupported MRC mode {mode} ({name})")
    nsymbt = int(header["nsymbt"])
    if nsymbt < 0:
        raise MrcFormatError(path, f"negative extended header size {nsymbt}")
    dtype = _MODE_DTYPES[mode].newbyteorder("=")
    grid = (int(header["mx"]), int(header["my"]), int(header["mz"]))
    cell = _floats3(header["cella"])
    rms = float(header["rms"])
    voxel = tuple(c / m if m > 0 else 0.0 for c, m in zip(cell, grid, strict=True))
    nlabl = min(max(int(header["nlabl"]), 0), 10)
    return MrcInfo(
        path=os.fspath(path),
        nx=nx,
        ny=ny,
        nz=nz,
        mode=mode,
        dtype=dtype,
        voxel_size_a=(voxel[0], voxel[1], voxel[2]),
        origin_a=_floats3(header["origin"]),
        ispg=int(header["ispg"]),
        nsymbt=nsymbt,
        exttyp=_decode(bytes(header["exttyp"])),
        data_offset=HEADER_BYTES + nsymbt,
        expected_size=HEADER_BYTES + nsymbt + nx * ny * nz * dtype.itemsize,
        nstart=(int(header["nxstart"]), int(header["nystart"]), int(header["nzstart"])),
        grid=grid,
        cell_a=(cell[0], cell[1], cell[2]),
        cell_angles_deg=_floats3(header["cellb"]),
        axis_order=(int(header["mapc"]), int(header["mapr"]), int(header["maps"])),
        stats=(float(header["dmin"]), float(header["dmax"]), float(header["dmean"]), rms),
        nversion=int(header["nversion"]),
        labels=tuple(_decode(bytes(lab)) for lab in header["label"][:nlabl]),
        byte_order=order,
        raw_header=bytes(raw),
    )


def read_header(path: PathLike) -> MrcInfo:
    """Parse the 1024-byte MRC header of ``path`` (cheap; fine on files still being written).

    Both byte orders are handled (machine stamp, or sniffing for old files without one).

    Parameters
    ----------
    path
        An MRC/MRCS/map file.

    Returns
    -------
    MrcInfo
        The header.

    Raises
    ------
    IncompleteFileError
        The file is shorter than 1024 bytes.
    MrcFormatError
        Bad MAP id, non-positive dimensions, or an unsupported mode (3/4 complex, 101 4-bit…).
    OSError
        The file cannot be opened.
    """
    with open(path, "rb") as fh:
        raw = fh.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise IncompleteFileError(path, f"only {len(raw)} bytes, shorter than an MRC header")
    return _parse_header(raw, path)


def check_complete(path: PathLike) -> MrcCompleteness:
    """Tell whether an MRC file is completely written, without raising.

    Parameters
    ----------
    path
        The file to check.

    Returns
    -------
    MrcCompleteness
        ``complete`` iff the header is valid and the size on disk equals
        ``1024 + nsymbt + nx·ny·nz·bytes_per_voxel``. A larger file is reported as corrupt.
    """
    try:
        actual = os.stat(path).st_size
    except OSError as exc:
        return MrcCompleteness(False, 0, 0, None, f"cannot read: {exc.strerror or exc}")
    try:
        info = read_header(path)
    except (MrcFormatError, IncompleteFileError) as exc:
        return MrcCompleteness(False, 0, actual, None, exc.problem)
    except OSError as exc:
        return MrcCompleteness(False, 0, actual, None, f"cannot read: {exc.strerror or exc}")
    problem = _size_problem(info, actual)
    return MrcCompleteness(problem is None, info.expected_size, actual, info, problem)


def _size_problem(info: MrcInfo, actual: int) -> str | None:
    if actual < info.expected_size:
        return f"truncated: {actual} of {info.expected_size} bytes"
    if actual > info.expected_size:
        return f"file is {actual - info.expected_size} bytes larger than its header says"
    return None


def _read_data(path: PathLike, *, mmap: bool) -> tuple[npt.NDArray[Any], MrcInfo]:
    info = read_header(path)
    problem = _size_problem(info, os.stat(path).st_size)
    if problem is not None:
        if problem.startswith("truncated"):
            raise IncompleteFileError(path, problem)
        raise MrcFormatError(path, problem)
    if mmap and info.byte_order == "<":
        data: npt.NDArray[Any] = np.memmap(
            path, dtype=info.file_dtype, mode="r", offset=info.data_offset, shape=info.shape
        )
        return data, info
    with open(path, "rb") as fh:
        fh.seek(info.data_offset)
        flat = np.fromfile(fh, dtype=info.file_dtype, count=info.nx * info.ny * info.nz)
    if flat.size != info.nx * info.ny * info.nz:
        raise IncompleteFileError(path, "truncated while reading")
    return flat.astype(info.dtype, copy=False).reshape(info.shape), info


def read_micrograph(path: PathLike, *, mmap: bool = True) -> tuple[npt.NDArray[Any], MrcInfo]:
    """Read a single-image MRC file (a micrograph) as a 2D array.

    Parameters
    ----------
    path
        The MRC file; extended headers (FEI1/FEI2, symmetry records) are skipped.
    mmap
        Return a read-only memory map (little-endian files) instead of reading into memory.

    Returns
    -------
    data, info
        ``(ny, nx)`` array in the file's element type (native byte order), and the header.

    Raises
    ------
    IncompleteFileError
        The file is shorter than its header says.
    MrcFormatError
        Invalid header, wrong size, or more than one section (a stack or a volume).
    """
    data, info = _read_data(path, mmap=mmap)
    if info.nz != 1:
        raise MrcFormatError(path, f"expected a single micrograph, found {info.nz} sections")
    return data[0], info


def read_stack(path: PathLike, *, mmap: bool = True) -> tuple[npt.NDArray[Any], MrcInfo]:
    """Read an image stack (``.mrcs`` or any MRC) as ``(n, ny, nx)``; one image gives n = 1.

    Parameters
    ----------
    path
        The MRC/MRCS file.
    mmap
        Return a read-only memory map (little-endian files) instead of reading into memory.

    Returns
    -------
    data, info
        ``(nz, ny, nx)`` array in the file's element type, and the header.

    Raises
    ------
    IncompleteFileError, MrcFormatError
        As for :func:`read_micrograph`.
    """
    return _read_data(path, mmap=mmap)


def read_volume(path: PathLike, *, mmap: bool = False) -> tuple[npt.NDArray[Any], MrcInfo]:
    """Read a 3D map as ``(nz, ny, nx)`` in file order (see ``info.axis_order``).

    Parameters
    ----------
    path
        The MRC/map file.
    mmap
        Memory-map instead of reading into memory (default: read).

    Returns
    -------
    data, info
        The voxels and the header; ``info.voxel_size_a`` holds the (x, y, z) voxel size in Å.

    Raises
    ------
    IncompleteFileError, MrcFormatError
        As for :func:`read_micrograph`.
    """
    return _read_data(path, mmap=mmap)
