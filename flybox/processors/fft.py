"""Batched 2D/3D real FFTs through pyFFTW with plans cached per image shape.

Scaling follows numpy: the forward transform is unnormalised and the inverse divides by the
number of samples. RELION divides the forward transform by the number of samples and leaves
the inverse unscaled (ALGORITHMS.md §0.2); code that needs RELION's scaling multiplies once.

Batches of particle-sized images are transformed in fixed blocks of :data:`BLOCK` images (the
last block zero-padded), so one ``FFTW_MEASURE`` plan per image shape serves every batch size;
measured plans run about 20 % faster than estimated ones here. Images over 2²⁰ pixels (whole
micrographs, maps) are transformed one at a time with estimated plans. Each worker process
keeps its own plans, one FFT thread each (parallelism comes from worker processes).

Measuring a plan takes ~0.1 s per shape, so FFTW's wisdom is kept in a small per-host file
(``$FLYBOX_CACHE_DIR``, else ``$XDG_CACHE_HOME/flybox``, else ``~/.cache/flybox``) and
reused by later processes. The cache is best effort: a missing, unreadable, corrupt or
read-only cache only costs planning time. ``FLYBOX_CACHE_DIR=""`` disables it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt


def _import_pyfftw() -> Any:
    """``import pyfftw`` without its optional interfaces to scipy.fftpack and dask.array.

    pyFFTW's ``__init__`` imports ``pyfftw.interfaces``, which imports ``scipy.fftpack`` (and
    ``dask.array.fft``) when they are installed: 0.15 s (0.5 s with dask) of start-up for
    wrappers flybox never uses (it drives ``pyfftw.FFTW`` plans directly). Entries of ``None``
    in ``sys.modules`` make those optional imports fail the way a missing package does; they
    are removed again right after, so later imports of scipy or dask are unaffected.
    """
    if "pyfftw" in sys.modules:
        return sys.modules["pyfftw"]
    blocked = [name for name in ("scipy.fftpack", "dask.array.fft") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import pyfftw
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return pyfftw


if TYPE_CHECKING:
    import pyfftw
else:
    pyfftw = _import_pyfftw()

__all__ = [
    "BLOCK",
    "WisdomStore",
    "cropped_rfft2",
    "empty_aligned",
    "irfftn_last",
    "rfftn_last",
    "use_wisdom_store",
]

#: Images per FFTW execution.
BLOCK = 16

_plans: dict[tuple[Any, ...], tuple[pyfftw.FFTW, npt.NDArray[Any], npt.NDArray[Any]]] = {}
_lock = threading.Lock()
_MAX_PLANS = 64


_wisdom_loaded = False


class WisdomStore(Protocol):
    """Where FFTW's wisdom (measured plans) is kept between processes: this package does no
    I/O itself; :mod:`flybox.io.fftw_wisdom` provides the on-disk store."""

    def load(self) -> tuple[bytes, ...] | None:
        """The saved wisdom, or ``None``."""

    def save(self, wisdom: tuple[bytes, ...]) -> None:
        """Keep ``wisdom`` (failures only cost planning time later: never raise)."""


_store: WisdomStore | None = None


def use_wisdom_store(store: WisdomStore | None) -> None:
    """Load and save FFTW wisdom through ``store`` (``None``: keep it in memory only)."""
    global _store, _wisdom_loaded
    _store, _wisdom_loaded = store, False


def _load_wisdom() -> None:
    global _wisdom_loaded
    _wisdom_loaded = True
    wisdom = _store.load() if _store is not None else None
    if wisdom is not None:
        with contextlib.suppress(ValueError, TypeError):  # a bad cache costs planning time
            pyfftw.import_wisdom(wisdom)


def _save_wisdom() -> None:
    if _store is not None:
        _store.save(tuple(pyfftw.export_wisdom()))


def _block(real_shape: tuple[int, ...]) -> int:
    # Whole micrographs and large maps are transformed one at a time.
    return 1 if np.prod(real_shape) > 1 << 20 else BLOCK


def empty_aligned(shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
    """An uninitialised array aligned for SIMD, so FFTs can run on it without a copy."""
    out: npt.NDArray[Any] = pyfftw.empty_aligned(shape, dtype=dtype)
    return out


def _plan(
    direction: str, real_shape: tuple[int, ...], real_dtype: Any
) -> tuple[pyfftw.FFTW, npt.NDArray[Any], npt.NDArray[Any]]:
    complex_dtype = np.complex128 if real_dtype == np.float64 else np.complex64
    half_shape = (*real_shape[:-1], real_shape[-1] // 2 + 1)
    key = (direction, real_shape, real_dtype)
    plan = _plans.get(key)
    if plan is None:
        if not _wisdom_loaded:
            _load_wisdom()
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        block = _block(real_shape)
        real = pyfftw.empty_aligned((block, *real_shape), dtype=real_dtype)
        half = pyfftw.empty_aligned((block, *half_shape), dtype=complex_dtype)
        axes = tuple(range(1, len(real_shape) + 1))
        # Large 3D maps plan with ESTIMATE: measuring them would cost more than it saves.
        effort = "FFTW_MEASURE" if np.prod(real_shape) <= 1 << 20 else "FFTW_ESTIMATE"
        if direction == "r2c":
            fftw = pyfftw.FFTW(real, half, axes=axes, direction="FFTW_FORWARD", flags=(effort,))
            plan = (fftw, real, half)
        else:
            fftw = pyfftw.FFTW(half, real, axes=axes, direction="FFTW_BACKWARD", flags=(effort,))
            plan = (fftw, half, real)
        _plans[key] = plan
        if effort == "FFTW_MEASURE":
            _save_wisdom()
    return plan


def _fits(array: npt.NDArray[Any], like: npt.NDArray[Any]) -> bool:
    return (
        array.shape == like.shape
        and array.dtype == like.dtype
        and array.flags.c_contiguous
        and array.ctypes.data % pyfftw.simd_alignment == 0
    )


def _load(
    fftw: pyfftw.FFTW,
    own_in: npt.NDArray[Any],
    own_out: npt.NDArray[Any],
    source: npt.NDArray[Any],
    target: npt.NDArray[Any] | None = None,
    *,
    in_place_ok: bool = True,
) -> bool:
    """Set ``fftw``'s next execution to read ``source``: where it is when that is a whole
    aligned block (and ``target``, the output wanted instead of the plan's own, fits too;
    returns ``True``), else copied, zero-padded, into the plan's own buffers (``False``)."""
    if in_place_ok and _fits(source, own_in) and (target is None or _fits(target, own_out)):
        fftw.update_arrays(source, own_out if target is None else target)
        return True
    _restore(fftw, own_in, own_out)
    count = source.shape[0]
    own_in[:count] = source
    own_in[count:] = 0
    return False


def _restore(fftw: pyfftw.FFTW, own_in: npt.NDArray[Any], own_out: npt.NDArray[Any]) -> None:
    """Point ``fftw`` back at its own buffers (after :func:`_load` pointed it elsewhere)."""
    if fftw.input_array is not own_in or fftw.output_array is not own_out:
        fftw.update_arrays(own_in, own_out)


def _blocks(
    data: npt.NDArray[Any],
    plan: tuple[pyfftw.FFTW, npt.NDArray[Any], npt.NDArray[Any]],
    out: npt.NDArray[Any],
    *,
    in_place_ok: bool,
) -> None:
    # Full blocks of aligned arrays are transformed where they are (no copies); otherwise
    # each block is copied into the plan's own aligned buffers. FFTW's c2r destroys its
    # input, so the caller's input is used directly only when it says that is fine.
    fftw, own_in, own_out = plan
    n = data.shape[0]
    block = own_in.shape[0]
    try:
        for start in range(0, n, block):
            stop = min(start + block, n)
            target = out[start:stop]
            direct = _load(fftw, own_in, own_out, data[start:stop], target, in_place_ok=in_place_ok)
            fftw.execute()
            if not direct:
                target[...] = own_out[: stop - start]
    finally:
        _restore(fftw, own_in, own_out)


def rfftn_last(
    x: npt.NDArray[np.floating[Any]], ndim: int = 2
) -> npt.NDArray[np.complexfloating[Any, Any]]:
    """Real-to-complex FFT over the last ``ndim`` axes of a batch (numpy scaling).

    Parameters
    ----------
    x
        Real array ``(..., n1, …, n_ndim)``; float32 gives complex64, float64 gives complex128.
    ndim
        Number of trailing axes to transform (2 for images, 3 for volumes).

    Returns
    -------
    numpy.ndarray
        A new array ``(..., n1, …, n_ndim//2 + 1)``, owned by the caller.
    """
    real_dtype = np.float64 if x.dtype == np.float64 else np.float32
    shape = tuple(x.shape[-ndim:])
    lead = x.shape[:-ndim]
    data = np.asarray(x, dtype=real_dtype).reshape((-1, *shape))
    complex_dtype = np.complex128 if real_dtype == np.float64 else np.complex64
    out = empty_aligned((data.shape[0], *shape[:-1], shape[-1] // 2 + 1), complex_dtype)
    with _lock:
        # An out-of-place r2c transform leaves its input intact.
        _blocks(data, _plan("r2c", shape, real_dtype), out, in_place_ok=True)
    return out.reshape((*lead, *out.shape[1:]))


def irfftn_last(
    f: npt.NDArray[np.complexfloating[Any, Any]],
    shape: tuple[int, ...],
    *,
    overwrite_input: bool = False,
) -> npt.NDArray[np.floating[Any]]:
    """Complex-to-real inverse FFT over the last ``len(shape)`` axes (numpy scaling).

    Parameters
    ----------
    f
        Half spectrum ``(..., n1, …, n_last//2 + 1)``; complex64 gives float32.
    shape
        Real-space size of the transformed axes, e.g. ``(M, M)``.
    overwrite_input
        Allow the transform to destroy ``f`` (saves a copy when the caller discards it).

    Returns
    -------
    numpy.ndarray
        A new real array ``(..., *shape)``, owned by the caller.
    """
    shape = tuple(shape)
    ndim = len(shape)
    real_dtype = np.float64 if f.dtype == np.complex128 else np.float32
    complex_dtype = np.complex128 if real_dtype == np.float64 else np.complex64
    lead = f.shape[:-ndim]
    data = np.asarray(f, dtype=complex_dtype).reshape((-1, *f.shape[-ndim:]))
    out = empty_aligned((data.shape[0], *shape), real_dtype)
    with _lock:
        _blocks(data, _plan("c2r", shape, real_dtype), out, in_place_ok=overwrite_input)
    # FFTW's c2r is unscaled; numpy's convention divides by the number of samples.
    out *= real_dtype(1.0 / float(np.prod(shape)))
    return out.reshape((*lead, *shape))


_pruned: dict[tuple[int, int], tuple[pyfftw.FFTW, pyfftw.FFTW]] = {}


def _pruned_plans(n: int, keep: int) -> tuple[pyfftw.FFTW, pyfftw.FFTW]:
    plans = _pruned.get((n, keep))
    if plans is None:
        if not _wisdom_loaded:
            _load_wisdom()
        flags = ("FFTW_MEASURE",)
        real = pyfftw.empty_aligned((BLOCK, n, n), dtype=np.float32)
        rows = pyfftw.empty_aligned((BLOCK, n, n // 2 + 1), dtype=np.complex64)
        columns = pyfftw.empty_aligned((BLOCK, n, keep), dtype=np.complex64)
        row_plan = pyfftw.FFTW(real, rows, axes=(2,), direction="FFTW_FORWARD", flags=flags)
        # The column transforms read the kept columns where the row transforms left them
        # (a strided view): no copy of the narrow band.
        column_plan = pyfftw.FFTW(
            rows[:, :, :keep], columns, axes=(1,), direction="FFTW_FORWARD", flags=flags
        )
        plans = (row_plan, column_plan)
        _pruned[(n, keep)] = plans
        _save_wisdom()
    return plans


def cropped_rfft2(images: npt.NDArray[np.float32], m: int) -> npt.NDArray[np.complex64]:
    """Half spectra of ``(k, n, n)`` images, already windowed to ``m < n`` (numpy scaling).

    Equal to ``resize_spectrum(rfftn_last(images), n, m)`` (RELION's crop, see
    :mod:`flybox.processors.fourier`) but cheaper: the row transforms are done for every row,
    the column transforms only for the ``m//2 + 1`` columns the crop keeps (for 256 → 64
    about 0.6 of the full 2D transform), and whole blocks of aligned images are transformed
    where they are, without a copy.
    """
    k, n, _ = images.shape
    keep = m // 2 + 1
    positive = m // 2 + 1
    negative = m - positive
    out = np.empty((k, m, keep), dtype=np.complex64)
    with _lock:
        row_plan, column_plan = _pruned_plans(n, keep)
        real, rows = row_plan.input_array, row_plan.output_array
        columns = column_plan.output_array
        try:
            for start in range(0, k, BLOCK):
                stop = min(start + BLOCK, k)
                count = stop - start
                _load(row_plan, real, rows, images[start:stop])
                row_plan.execute()
                column_plan.execute()
                out[start:stop, :positive] = columns[:count, :positive]
                if negative:
                    out[start:stop, positive:] = columns[:count, n - negative :]
        finally:
            _restore(row_plan, real, rows)
    return out
