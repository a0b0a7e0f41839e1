"""Masking files: particle stacks, particle STAR files and maps (the library of ``flybox mask``).

Inputs are ``.mrcs`` stacks (masked in 2D), particle STAR files (RELION 3.0/3.1; every
referenced stack is masked and the STAR is rewritten), or ``.mrc``/``.map`` maps (masked in
3D; a single-section ``.mrc`` is masked in 2D). Every file is written under a temporary name
and renamed when complete; inputs are checked against the mask before anything is written.

Masks are in pixels of the file's array (columns = x, rows = y, sections = z), as RELION and
Xmipp read maps; the header's axis order and voxel anisotropy are kept, not applied.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flybox.errors import ConfigError, InputError, ProcessingError, StarFormatError
from flybox.io.atomic import rename_into_place, temp_path_for
from flybox.io.mrc import MrcInfo, StackWriter, read_header, read_stack, read_volume, write_volume
from flybox.pipeline.layout import project_path, resolve_star_path
from flybox.processors.mask import FillMode, MaskCache, MaskSettings, apply_mask, is_binary_mask

if TYPE_CHECKING:  # pandas and the STAR code only for STAR inputs (0.2 s to import)
    import pandas as pd

__all__ = [
    "Masker",
    "StarPlan",
    "check_particles_star",
    "check_stack_file",
    "check_volume",
    "mask_particles_star",
    "mask_stack_file",
    "mask_volumes",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
FloatArray = npt.NDArray[np.float32]

#: Bytes of float32 pixels read, masked and written per step when streaming a stack; small
#: chunks keep the temporaries (here and in the writer's statistics) in cache.
CHUNK_BYTES = 4 * 2**20
#: Relative difference above which two pixel sizes count as different.
PIXEL_SIZE_TOLERANCE = 1e-3


def _shape_text(dims: Sequence[int]) -> str:
    """``(nz, ny, nx)`` → ``"nx x ny x nz"`` (x first, as users read sizes)."""
    return " x ".join(str(n) for n in reversed(tuple(dims)))


class Masker:
    """One mask definition, a geometric shape and/or a mask file, applied to images of any size.

    Parameters
    ----------
    settings
        Geometric mask; its ``fill``/``fill_value`` apply unless given here.
    mask_file
        MRC mask multiplied in (with ``settings``, the product of both masks is used). Its
        dimensions must equal the images'.
    fill, fill_value
        Fill for a mask from a file alone (see :func:`flybox.processors.mask.apply_mask`).

    Raises
    ------
    ConfigError
        Neither a shape nor a file is given.
    """

    def __init__(
        self,
        settings: MaskSettings | None = None,
        mask_file: PathLike | None = None,
        *,
        fill: FillMode | None = None,
        fill_value: float | None = None,
    ) -> None:
        if settings is None and mask_file is None:
            raise ConfigError("shape", "give a mask shape, or a mask file")
        self.settings = settings
        self.mask_file = Path(mask_file) if mask_file is not None else None
        default_fill = settings.fill if settings is not None else None
        default_value = settings.fill_value if settings is not None else 0.0
        self.fill: FillMode | None = fill if fill is not None else default_fill
        self.fill_value = float(fill_value if fill_value is not None else default_value)
        self._cache = MaskCache()
        self._file_mask: tuple[FloatArray, MrcInfo] | None = None
        self._prepared: dict[tuple[int, ...], tuple[FloatArray, bool]] = {}
        self._checked: set[tuple[Any, ...]] = set()

    def _read_file_mask(self) -> tuple[FloatArray, MrcInfo]:
        if self._file_mask is None:
            assert self.mask_file is not None
            data, info = read_volume(self.mask_file)
            values = np.asarray(data, dtype=np.float32)
            values.setflags(write=False)
            self._file_mask = (values, info)
        return self._file_mask

    def prepare(
        self, dims: Sequence[int], voxel_size_a: Sequence[float] | None, subject: PathLike
    ) -> tuple[FloatArray, bool]:
        """Check that the mask fits images of ``dims`` and build it (once per ``dims``).

        Parameters
        ----------
        dims
            ``(ny, nx)`` or ``(nz, ny, nx)`` of the images.
        voxel_size_a
            (x, y[, z]) pixel size of the images in Å, ``None`` when unknown; a mask file
            with a different one gets a warning.
        subject
            The images' file, named in errors and warnings.

        Returns
        -------
        mask, binary
            The read-only float32 mask and whether it is 0/1.

        Raises
        ------
        ProcessingError
            The mask file's dimensions differ from the images'.
        ConfigError
            A substitution fill is asked for with a soft mask file; or the geometric settings
            do not fit the images (e.g. a cylinder for 2D particles).
        """
        key = tuple(int(n) for n in dims)
        check = (key, tuple(voxel_size_a or ()), os.fspath(subject))
        if self.mask_file is not None and check not in self._checked:
            self._check_file_mask(key, voxel_size_a, subject)
            self._checked.add(check)
        cached = self._prepared.get(key)
        if cached is not None:
            return cached
        mask: FloatArray | None = None
        binary = True
        if self.settings is not None:
            mask = self._cache.get(key, self.settings)
            binary = self.settings.binary
        if self.mask_file is not None:
            values = self._read_file_mask()[0].reshape(key)
            file_binary = is_binary_mask(values)
            if not file_binary and self.fill in ("value", "min", "max", "avg"):
                raise ConfigError(
                    "fill",
                    f"fill {self.fill} applies to binary masks only; {self.mask_file} is soft",
                )
            mask = values if mask is None else mask * values
            mask.setflags(write=False)
            binary = binary and file_binary
        assert mask is not None
        self._prepared[key] = (mask, binary)
        return mask, binary

    def _check_file_mask(
        self, dims: tuple[int, ...], voxel_size_a: Sequence[float] | None, subject: PathLike
    ) -> None:
        assert self.mask_file is not None
        info = read_header(self.mask_file)
        mask_dims = (info.ny, info.nx) if len(dims) == 2 and info.nz == 1 else info.shape
        if tuple(mask_dims) != dims:
            raise ProcessingError(
                self.mask_file,
                f"mask is {_shape_text(info.shape)} pixels but the images of {subject} are "
                f"{_shape_text(dims)}; nothing was written",
            )
        ours = tuple(float(v) for v in (voxel_size_a or ()))
        theirs = info.voxel_size_a[: len(ours)]
        known = bool(ours) and min(ours) > 0 and min(theirs) > 0
        pairs = zip(theirs, ours, strict=True)
        if known and any(abs(a - b) > PIXEL_SIZE_TOLERANCE * b for a, b in pairs):
            logger.warning(
                "pixel size of mask %s (%s Å) differs from that of %s (%s Å)",
                self.mask_file,
                "/".join(f"{v:g}" for v in theirs),
                subject,
                "/".join(f"{v:g}" for v in ours),
            )

    def apply(self, images: npt.NDArray[Any], mask: FloatArray, binary: bool) -> FloatArray:
        """Mask ``images`` (a batch or one volume) with a mask from :meth:`prepare`."""
        return apply_mask(images, mask, self.fill, self.fill_value, binary=binary)


def _pixel_size(info: MrcInfo, fallback: float | None = None) -> float | None:
    return info.pixel_size_a if info.pixel_size_a is not None else fallback


def _check_square(info: MrcInfo) -> None:
    if info.nx != info.ny:
        raise InputError(info.path, f"particle images must be square, found {info.nx} x {info.ny}")


def _write_masked_images(
    output: Path,
    source: npt.NDArray[Any],
    indices: npt.NDArray[np.int64] | None,
    masker: Masker,
    info: MrcInfo,
    pixel_size_a: float | None,
) -> int:
    """Stream images ``source[indices]`` (all when ``None``) through the mask into ``output``."""
    mask, binary = masker.prepare((info.ny, info.nx), (pixel_size_a or 0.0,) * 2, info.path)
    count = source.shape[0] if indices is None else len(indices)
    step = max(1, CHUNK_BYTES // (4 * info.ny * info.nx))
    temp = temp_path_for(output)
    try:
        with StackWriter(temp, info.nx, pixel_size_a, float16=info.mode == 12) as writer:
            for start in range(0, count, step):
                stop = min(start + step, count)
                chunk = source[start:stop] if indices is None else source[indices[start:stop]]
                writer.append(masker.apply(chunk, mask, binary))
        rename_into_place(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return count


def check_stack_file(path: PathLike, masker: Masker) -> MrcInfo:
    """Check that the images of an ``.mrcs`` stack are square and fit the mask.

    Raises
    ------
    InputError
        Unreadable stack, or images that are not square.
    ProcessingError, ConfigError
        The mask does not fit the images.
    """
    info = read_header(path)
    _check_square(info)
    masker.prepare((info.ny, info.nx), (_pixel_size(info) or 0.0,) * 2, path)
    return info


def mask_stack_file(input_path: PathLike, output_path: PathLike, masker: Masker) -> int:
    """Mask every image of an ``.mrcs`` stack into a new stack, in bounded memory.

    Parameters
    ----------
    input_path
        The stack (read through a memory map, a chunk at a time).
    output_path
        The new stack, written atomically; the pixel size and float16 mode are kept.
    masker
        The mask and fill.

    Returns
    -------
    int
        Number of images written.

    Raises
    ------
    InputError
        The stack is unreadable or its images are not square.
    ProcessingError, ConfigError
        The mask does not fit the images (nothing is written).
    """
    check_stack_file(input_path, masker)
    data, info = read_stack(input_path, mmap=True)
    return _write_masked_images(Path(output_path), data, None, masker, info, _pixel_size(info))


@dataclass
class _StackRefs:
    """The rows of a STAR file that point into one stack, and where its masked copy goes."""

    path: Path
    info: MrcInfo
    rows: list[int]
    indices: list[int]
    output_name: str = ""


@dataclass
class StarPlan:
    """A checked particle STAR: its blocks and, per referenced stack, the rows and images.

    Attributes
    ----------
    star
        The STAR file.
    blocks
        Every block as read (loop tables and key/value blocks), in file order.
    block
        Name of the block holding ``rlnImageName``.
    version
        The file's ``# version`` number, ``None`` when it has none (RELION 3.0).
    stacks
        Referenced stack (as written in the STAR) → rows, images and output name.
    pixel_size_a
        Image pixel size from the optics (3.1) or per-row (3.0) columns, when unique.
    """

    star: Path
    blocks: dict[str, pd.DataFrame | dict[str, Any]]
    block: str
    version: int | None
    stacks: dict[str, _StackRefs]
    pixel_size_a: float | None


def _parse_image_names(star: Path, names: Iterable[str]) -> dict[str, _StackRefs]:
    """Group ``rlnImageName`` values (``NNNNNN@path``) by stack, checking every reference."""
    groups: dict[str, _StackRefs] = {}
    for row, raw in enumerate(names):
        text = str(raw).strip()
        number, sep, where = text.partition("@")
        if not sep:
            number, where = "1", text
        if not number.isdigit() or int(number) < 1 or not where:
            raise StarFormatError(star, f"row {row + 1}: bad rlnImageName {text!r}")
        refs = groups.get(where)
        if refs is None:
            path = resolve_star_path(where, star)
            if path is None or not path.is_file():
                raise StarFormatError(star, f"row {row + 1}: stack {where} not found")
            refs = groups[where] = _StackRefs(path, read_header(path), [], [])
            _check_square(refs.info)
        if int(number) > refs.info.nz:
            raise StarFormatError(
                star, f"row {row + 1}: image {number} beyond the {refs.info.nz} images of {where}"
            )
        refs.rows.append(row)
        refs.indices.append(int(number) - 1)
    return groups


def _output_names(groups: dict[str, _StackRefs]) -> None:
    """Name each output stack: the same relative path, or its base name when outside."""
    taken: set[str] = set()
    for where, refs in groups.items():
        pure = PurePosixPath(where.replace("\\", "/"))
        name = str(pure) if not pure.is_absolute() and ".." not in pure.parts else pure.name
        stem, suffix, k = PurePosixPath(name).stem, PurePosixPath(name).suffix, 1
        parent = PurePosixPath(name).parent
        while name in taken:
            k += 1
            name = str(parent / f"{stem}_{k}{suffix}")
        taken.add(name)
        refs.output_name = name


def _star_pixel_size(blocks: dict[str, Any], rows: pd.DataFrame) -> float | None:
    """``rlnImagePixelSize`` of the optics table, or RELION 3.0's detector pixel/magnification,
    when the file has exactly one value."""
    import pandas as pd

    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and "rlnImagePixelSize" in optics.columns:
        values = {float(v) for v in optics["rlnImagePixelSize"]}
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(rows.columns):
        sizes = rows["rlnDetectorPixelSize"].astype(float) * 1e4 / rows["rlnMagnification"]
        values = {float(v) for v in sizes}
    else:
        return None
    return values.pop() if len(values) == 1 else None


_VERSION_LINE = re.compile(rb"^#\s*version\s+(\d+)", re.MULTILINE)


def _star_version(path: Path) -> int | None:
    with open(path, "rb") as fh:
        match = _VERSION_LINE.search(fh.read(1 << 16))
    return int(match.group(1)) if match else None


def check_particles_star(
    star_path: PathLike, masker: Masker, output_dir: PathLike | None = None
) -> StarPlan:
    """Read a particle STAR and check every stack it references against the mask.

    Parameters
    ----------
    star_path
        RELION 3.0 or 3.1 particle STAR; ``rlnImageName`` paths are relative to its folder
        (else to the working folder) or absolute.
    masker
        The mask.
    output_dir
        Where the masked copies will go; refused when one would replace an input.

    Raises
    ------
    StarFormatError
        No ``rlnImageName`` column, bad names, missing stacks or images.
    ProcessingError, ConfigError
        The mask does not fit some images, or an output would overwrite an input.
    """
    import pandas as pd

    from flybox.io.star import read_star

    star = Path(star_path)
    blocks = read_star(star)
    block = next(
        (
            name
            for name, table in blocks.items()
            if isinstance(table, pd.DataFrame) and "rlnImageName" in table.columns
        ),
        None,
    )
    if block is None:
        raise StarFormatError(star, "no block with an rlnImageName column")
    rows = blocks[block]
    assert isinstance(rows, pd.DataFrame)
    plan = StarPlan(
        star=star,
        blocks=blocks,
        block=block,
        version=_star_version(star),
        stacks=_parse_image_names(star, rows["rlnImageName"]),
        pixel_size_a=_star_pixel_size(blocks, rows),
    )
    _output_names(plan.stacks)
    for refs in plan.stacks.values():
        pixel = _pixel_size(refs.info, plan.pixel_size_a)
        masker.prepare((refs.info.ny, refs.info.nx), (pixel or 0.0,) * 2, refs.path)
        if output_dir is not None:
            target = Path(output_dir) / refs.output_name
            if target.resolve() == refs.path.resolve():
                raise ConfigError("output", f"would overwrite the input stack {refs.path}")
    if output_dir is not None and (Path(output_dir) / star.name).resolve() == star.resolve():
        raise ConfigError("output", f"would overwrite the input {star}")
    return plan


def mask_particles_star(star_path: PathLike, output_dir: PathLike, masker: Masker) -> Path:
    """Mask the particles of a STAR file into new stacks and write a STAR pointing at them.

    Each stack the STAR references becomes one new stack under ``output_dir`` (same relative
    path, or its base name for absolute/outside paths) holding the referenced images in STAR
    order. The new STAR, ``output_dir/<name of star_path>``, keeps every column, the optics
    table and the version; only ``rlnImageName`` changes (``NNNNNN@stack``, 1-based, relative
    to the project folder, the working directory, as RELION reads it).

    Parameters
    ----------
    star_path
        RELION 3.0 or 3.1 particle STAR (see :func:`check_particles_star`).
    output_dir
        Folder for the new STAR and stacks (created).
    masker
        The mask and fill.

    Returns
    -------
    Path
        The new STAR file.

    Raises
    ------
    StarFormatError, ProcessingError, ConfigError
        As for :func:`check_particles_star`; nothing is written then.
    """
    import pandas as pd

    from flybox.io.star import write_star

    out_dir = Path(output_dir)
    plan = check_particles_star(star_path, masker, out_dir)
    rows = plan.blocks[plan.block]
    assert isinstance(rows, pd.DataFrame)
    names = rows["rlnImageName"].astype(object).to_numpy(copy=True)
    for refs in plan.stacks.values():
        target = out_dir / refs.output_name
        target.parent.mkdir(parents=True, exist_ok=True)
        data, info = read_stack(refs.path, mmap=True)
        indices = np.asarray(refs.indices, dtype=np.int64)
        pixel = _pixel_size(info, plan.pixel_size_a)
        _write_masked_images(target, data, indices, masker, info, pixel)
        for k, row in enumerate(refs.rows):
            names[row] = f"{k + 1:06d}@{project_path(target)}"
    blocks = dict(plan.blocks)
    blocks[plan.block] = rows.assign(rlnImageName=names)
    output = out_dir / plan.star.name
    write_star(output, blocks, version=plan.version)
    return output


def volume_dims(info: MrcInfo) -> tuple[int, ...]:
    """Mask dimensions for a map: ``(nz, ny, nx)``, or ``(ny, nx)`` for a single section."""
    return (info.ny, info.nx) if info.nz == 1 else info.shape


def check_volume(path: PathLike, masker: Masker) -> MrcInfo:
    """Check that a map fits the mask (see :meth:`Masker.prepare`)."""
    info = read_header(path)
    masker.prepare(volume_dims(info), info.voxel_size_a, path)
    return info


def mask_volumes(
    inputs: Sequence[PathLike], outputs: Sequence[PathLike], masker: Masker
) -> list[Path]:
    """Mask maps (3D, or single 2D images) keeping voxel size, origin and header metadata.

    All inputs are checked against the mask before the first output is written.

    Parameters
    ----------
    inputs
        ``.mrc``/``.map`` files.
    outputs
        One output path per input, written atomically with the input's header (voxel size,
        origin, ``nxstart``, axis order, space group, labels) and extended header.
    masker
        The mask and fill.

    Returns
    -------
    list of Path
        The outputs.
    """
    if len(inputs) != len(outputs):
        raise ValueError("mask_volumes needs one output per input")
    for path in inputs:
        check_volume(path, masker)
    written = []
    for path, out in zip(inputs, outputs, strict=True):
        data, info = read_volume(path)
        mask, binary = masker.prepare(volume_dims(info), info.voxel_size_a, path)
        masked = masker.apply(data.reshape(volume_dims(info)), mask, binary)
        write_volume(out, masked.reshape(info.shape), voxel_size_a=None, template=info)
        written.append(Path(out))
    return written
