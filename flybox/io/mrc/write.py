"""Writing MRC files: particle stacks (incrementally, float32 or RELION-rule float16),
micrographs and volumes (keeping a template's header metadata). Every final file appears
only complete (temporary name, fsync, rename; :mod:`flybox.io.atomic`).

Header layout and statistics follow ALGORITHMS.md §16 (RELION 3.1.3's stacks: ``ispg`` 0,
``mz`` 1; ``dmean`` = mean of per-image means, ``rms`` = sqrt of the mean per-image variance).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import numpy as np
import numpy.typing as npt

from flybox.errors import IncompleteFileError
from flybox.io.atomic import atomic_write, rename_into_place, temp_path_for
from flybox.io.mrc.header import HEADER_BYTES, HEADER_DTYPE, new_header, set_stats
from flybox.io.mrc.read import MrcInfo, PathLike, read_header
from flybox.types import ImageStats

__all__ = ["StackWriter", "relion_float16", "write_micrograph", "write_stack", "write_volume"]


def relion_float16(a: npt.ArrayLike) -> npt.NDArray[np.float16]:
    """Convert to IEEE half precision with RELION's rules (ALGORITHMS.md §16).

    * the magnitude is rounded by adding half a unit in the last place and truncating, so ties
      round away from zero (numpy rounds them to even);
    * results beyond the largest half (65504) are clamped to ±65504 instead of becoming ±inf;
    * results below the smallest normal half (2**-14) become a zero of the same sign;
    * ±inf stays ±inf and NaN stays NaN (its payload truncated to 10 bits), as in RELION.

    Rounding happens before the range checks, as in RELION, so a value that rounds up to 2**-14
    is kept. RELION's own ``float2half`` also lets a mantissa carry spill into the exponent
    (a value just below a power of two can come out doubled); this function rounds correctly.

    Parameters
    ----------
    a
        Values, converted to float32 first.

    Returns
    -------
    numpy.ndarray
        float16 array of the same shape.
    """
    x = np.ascontiguousarray(a, dtype=np.float32)
    bits = x.view(np.uint32)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    rounded = magnitude + np.uint32(0x1000)  # half a float16 ULP; carries into the exponent
    exponent = rounded >> np.uint32(23)
    normal = ((exponent - np.uint32(112)) << np.uint32(10)) | (
        (rounded >> np.uint32(13)) & np.uint32(0x3FF)
    )
    half = np.where(exponent > 142, np.uint32(0x7BFF), normal)
    half = np.where(exponent < 113, np.uint32(0), half)
    special = np.uint32(0x7C00) | ((magnitude & np.uint32(0x7FFFFF)) >> np.uint32(13))
    half = np.where(magnitude >= np.uint32(0x7F800000), special, half)
    result: npt.NDArray[np.float16] = (half | sign).astype(np.uint16).view(np.float16)
    return result


def _image_stats(
    images: npt.NDArray[Any],
) -> tuple[float, float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """min, max, and per-image mean and (population) variance of ``(n, size)`` images.

    Sums are taken in float64 on one image at a time (a cache-sized buffer), relative to the
    image's first pixel, which keeps them well conditioned for raw data with a large offset.
    """
    n = images.shape[0]
    means = np.empty(n)
    variances = np.empty(n)
    if n == 0:
        return np.inf, -np.inf, means, variances
    buffer = np.empty(images.shape[1])
    for k in range(n):
        ref = float(images[k, 0])
        np.subtract(images[k], ref, out=buffer)
        mean = float(buffer.mean())
        means[k] = ref + mean
        variances[k] = max(float(np.dot(buffer, buffer)) / buffer.size - mean * mean, 0.0)
    return float(images.min()), float(images.max()), means, variances


def _volume_stats(volume: npt.NDArray[np.float32]) -> tuple[float, float, float, float]:
    """min, max, mean and (population) standard deviation of a map, from float64 sums per
    section (no float64 copy of the whole map): the total variance is the mean section
    variance plus the variance of the section means (sections have equal sizes)."""
    low, high, means, variances = _image_stats(volume.reshape(volume.shape[0], -1))
    mean = float(means.mean())
    variance = float(variances.mean() + np.mean((means - mean) ** 2))
    return low, high, mean, math.sqrt(max(variance, 0.0))


class StackWriter:
    """Write a particle stack image by image, with constant memory.

    The data go to ``path`` as they are appended; the final header (RELION-style statistics,
    ALGORITHMS.md §16) is written by :meth:`close`, which also fsyncs the file. ``path`` is used
    as given: pick a temporary name and :func:`flybox.io.atomic.publish` it afterwards (or use
    :func:`write_stack`). Leaving the ``with`` block by an exception removes the file.

    Parameters
    ----------
    path
        Exact path to write.
    box
        Image side in pixels.
    pixel_size_a
        Pixel size in Å; ``None`` writes the cell as pixel counts (voxel size 1), as RELION does.
    float16
        Store mode 12 (half precision, converted with :func:`relion_float16`) instead of mode 2.
    sync
        fsync the file on :meth:`close`. A worker whose output is later committed with
        :func:`flybox.io.atomic.publish` (which fsyncs before renaming) passes ``False``, so
        the disk flush happens in the committer, overlapping the next computation.

    Notes
    -----
    A stack with zero images is not written: :meth:`close` raises ``ValueError`` and removes
    the file, since MRC requires nz ≥ 1 and RELION never writes empty stacks.
    """

    def __init__(
        self,
        path: PathLike,
        box: int,
        pixel_size_a: float | None,
        *,
        float16: bool = False,
        sync: bool = True,
    ) -> None:
        if box <= 0:
            raise ValueError(f"box must be positive, got {box}")
        self._sync = sync
        self.path = Path(path)
        self.box = int(box)
        self.pixel_size_a = pixel_size_a
        self.mode = 12 if float16 else 2
        self.count = 0
        self._min = np.inf
        self._max = -np.inf
        self._sum_means = 0.0
        self._sum_vars = 0.0
        self._advise_from = 0
        self._fh: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 (closed in close/abort)
        try:
            self._fh.write(bytes(HEADER_BYTES))  # placeholder until close() knows the count
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, images: npt.ArrayLike, stats: ImageStats | None = None) -> None:
        """Write images now.

        Parameters
        ----------
        images
            ``(k, box, box)`` or ``(box, box)`` array, converted to float32.
        stats
            Statistics of ``images`` when the caller already has them (saves a pass over the
            data); ignored in float16 mode, where they are taken from the stored values.
        """
        if self._fh is None:
            raise ValueError(f"{self.path}: stack writer is closed")
        data = np.asarray(images, dtype=np.float32)
        if data.ndim == 2:
            data = data[np.newaxis]
        if data.ndim != 3 or data.shape[1:] != (self.box, self.box):
            raise ValueError(f"expected (k, {self.box}, {self.box}) images, got {data.shape}")
        if data.shape[0] == 0:
            return
        stored = relion_float16(data) if self.mode == 12 else data.astype("<f4", copy=False)
        stored = np.ascontiguousarray(stored)
        self._fh.write(stored.data)
        written = stored.nbytes
        if stats is not None and self.mode == 2 and len(stats.means) == stored.shape[0]:
            low, high, means, variances = stats
        else:
            # Statistics of the stored values (after float16 rounding in mode 12).
            flat = stored.reshape(stored.shape[0], -1)
            low, high, means, variances = _image_stats(flat.astype(np.float32, copy=False))
        self._min = min(self._min, low)
        self._max = max(self._max, high)
        self._sum_means += float(means.sum())
        self._sum_vars += float(variances.sum())
        self.count += data.shape[0]
        self._start_writeback(written)

    def _start_writeback(self, length: int) -> None:
        # Hand the appended data to the disk now, asynchronously, and let the kernel drop the
        # pages once written: the final fsync (here or at commit) then finds little left to
        # do, disk writes overlap the computation of the next images, and outputs do not
        # crowd the page cache. Advisory only; durability still comes from fsync. The range
        # is the bytes of this append and of the previous one (written back by now, so
        # dropped this time): advising the whole file each time rescans all its pages.
        assert self._fh is not None
        self._fh.flush()
        end = self._fh.tell()
        start, self._advise_from = self._advise_from, end - length
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fh.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Write the final header, fsync and close. Idempotent.

        Raises
        ------
        ValueError
            No image was appended (the file is removed).
        """
        if self._fh is None:
            return
        if self.count == 0:
            self.abort()
            raise ValueError(f"{self.path}: refusing to write a stack with no images")
        n, box = self.count, self.box
        p = self.pixel_size_a
        cell = (p * box, p * box, p) if p else (float(box), float(box), 1.0)
        stats = (self._min, self._max, self._sum_means / n, float(np.sqrt(self._sum_vars / n)))
        header = new_header(self.mode, (n, box, box), (box, box, 1), cell, 0, stats)
        try:
            self._fh.seek(0)
            self._fh.write(header.tobytes())
            self._fh.flush()
            if self._sync:
                os.fsync(self._fh.fileno())
        except BaseException:
            self.abort()
            raise
        fh, self._fh = self._fh, None
        fh.close()

    def abort(self) -> None:
        """Close and remove the file (nothing is kept)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        self.path.unlink(missing_ok=True)


def write_stack(
    path: PathLike, images: npt.ArrayLike, pixel_size_a: float | None, *, float16: bool = False
) -> None:
    """Write a whole particle stack atomically (temporary name, fsync, rename).

    Parameters
    ----------
    path
        Final path (usually ``*.mrcs``).
    images
        ``(n, box, box)`` array with n ≥ 1.
    pixel_size_a
        Pixel size in Å, or ``None`` when unknown.
    float16
        Store mode 12 with RELION's conversion rules.
    """
    data = np.asarray(images, dtype=np.float32)
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ValueError(f"expected an (n, box, box) array, got shape {data.shape}")
    temp = temp_path_for(path)
    with StackWriter(temp, data.shape[1], pixel_size_a, float16=float16) as writer:
        writer.append(data)
    try:
        rename_into_place(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _as_voxel(voxel_size_a: tuple[float, float, float] | float) -> tuple[float, float, float]:
    if isinstance(voxel_size_a, tuple):
        return (float(voxel_size_a[0]), float(voxel_size_a[1]), float(voxel_size_a[2]))
    return (float(voxel_size_a),) * 3


def write_volume(
    path: PathLike,
    data: npt.ArrayLike,
    *,
    voxel_size_a: tuple[float, float, float] | float | None,
    template: MrcInfo | PathLike | None = None,
) -> None:
    """Write a 3D map as float32 (mode 2), atomically, optionally keeping a template's metadata.

    Parameters
    ----------
    path
        Final path.
    data
        ``(nz, ny, nx)`` array (a 2D array is written as one section), in the file order of the
        template when one is given.
    voxel_size_a
        (x, y, z) or isotropic voxel size in Å. ``None``: the template's, else 0 (unset).
    template
        Header (or path) of the map this one derives from. Its origin, ``nxstart…``, grid and
        cell (when the shape is unchanged), space group, axis order, labels and extended header
        (symmetry records) are kept; the statistics are recomputed.
    """
    volume = np.asarray(data, dtype=np.float32)
    if volume.ndim == 2:
        volume = volume[np.newaxis]
    if volume.ndim != 3 or 0 in volume.shape:
        raise ValueError(f"expected a non-empty (nz, ny, nx) array, got shape {volume.shape}")
    nz, ny, nx = volume.shape
    stats = _volume_stats(volume)
    extended = b""
    if template is None:
        voxel = _as_voxel(voxel_size_a) if voxel_size_a is not None else (0.0, 0.0, 0.0)
        cell = (voxel[0] * nx, voxel[1] * ny, voxel[2] * nz)
        header = new_header(2, (nz, ny, nx), (nx, ny, nz), cell, 1, stats)
    else:
        info = template if isinstance(template, MrcInfo) else read_header(template)
        parsed = np.frombuffer(info.raw_header, dtype=HEADER_DTYPE.newbyteorder(info.byte_order))
        header = parsed[0].astype(HEADER_DTYPE)
        same_shape = info.shape == (nz, ny, nx)
        grid = info.grid if same_shape and min(info.grid) > 0 else (nx, ny, nz)
        if voxel_size_a is None and same_shape:
            cell = info.cell_a
        else:
            voxel = info.voxel_size_a if voxel_size_a is None else _as_voxel(voxel_size_a)
            cell = (voxel[0] * grid[0], voxel[1] * grid[1], voxel[2] * grid[2])
        header["nz"], header["ny"], header["nx"] = nz, ny, nx
        header["mode"] = 2
        header["mx"], header["my"], header["mz"] = grid
        header["cella"] = cell
        header["map"] = b"MAP "
        header["machst"] = (0x44, 0x44, 0, 0)
        set_stats(header, stats)
        if info.nsymbt:
            with open(info.path, "rb") as fh:
                fh.seek(HEADER_BYTES)
                extended = fh.read(info.nsymbt)
            if len(extended) != info.nsymbt:
                raise IncompleteFileError(info.path, "extended header is truncated")
    with atomic_write(path) as fh:
        fh.write(header.tobytes())
        fh.write(extended)
        fh.write(np.ascontiguousarray(volume, dtype="<f4").data)


def write_micrograph(
    path: PathLike, image: npt.ArrayLike, pixel_size_a: float | None, *, float16: bool = False
) -> None:
    """Write one 2D image (a micrograph, any aspect ratio) atomically, float32 or float16.

    The header is an image (``ispg`` 0, ``nz = mz = 1``) with cell ``p·(nx, ny, 1)``.

    Parameters
    ----------
    path
        Final path (usually ``*.mrc``).
    image
        ``(ny, nx)`` array.
    pixel_size_a
        Pixel size in Å, or ``None`` (cell written as pixel counts).
    float16
        Store mode 12 with RELION's conversion rules.
    """
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(f"expected a non-empty (ny, nx) array, got shape {data.shape}")
    ny, nx = data.shape
    stored = relion_float16(data) if float16 else data
    values = stored.astype(np.float64)
    stats = (float(values.min()), float(values.max()), float(values.mean()), float(values.std()))
    pixel = 1.0 if pixel_size_a is None else float(pixel_size_a)
    header = new_header(
        12 if float16 else 2, (1, ny, nx), (nx, ny, 1), (pixel * nx, pixel * ny, pixel), 0, stats
    )
    with atomic_write(path) as fh:
        fh.write(header.tobytes())
        fh.write(np.ascontiguousarray(stored, dtype="<f2" if float16 else "<f4").data)
