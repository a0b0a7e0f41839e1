"""``numba.njit`` with an on-disk cache that never stops flybox from starting.

numba caches compiled code beside the source (``__pycache__``), else under the user's home
(``~/.cache/numba``) or ``NUMBA_CACHE_DIR``. A service account without a writable home running
an installed (read-only) flybox has none of these, and ``njit(cache=True)`` then raises
``RuntimeError: cannot cache function`` when the module is imported. :func:`njit` falls back to
a private folder in the temporary directory (kept between runs when possible), else to no
cache, with one warning.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import numba

__all__ = ["fallback_cache_dir", "njit", "ready_target"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

_fallback: list[str | None] = []


def fallback_cache_dir() -> str | None:
    """A writable numba cache folder of this user in the temporary directory (created once per
    process; ``None`` when even that fails). Logs the one warning."""
    if _fallback:
        return _fallback[0]
    path: str | None = os.path.join(tempfile.gettempdir(), f"flybox-numba-{os.getuid()}")
    assert path is not None
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            path = tempfile.mkdtemp(prefix="flybox-numba-")
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        path = None
    _fallback.append(path)
    if path is not None:
        log.warning(
            "numba cannot write its cache (no writable home or package folder): using %s "
            "(set NUMBA_CACHE_DIR to choose)",
            path,
        )
    else:
        log.warning("numba cannot write a cache anywhere: compiling without one at every start")
    return path


def njit(**options: Any) -> Callable[[F], F]:
    """``numba.njit(cache=True, **options)``, falling back as the module docstring says."""

    def decorate(function: F) -> F:
        try:
            return numba.njit(cache=True, **options)(function)  # type: ignore[no-any-return]
        except RuntimeError as exc:
            if "cannot cache" not in str(exc):
                raise
        folder = fallback_cache_dir()
        if folder is not None:
            setattr(numba.config, "CACHE_DIR", folder)  # noqa: B010 (read at cache time)
            try:
                return numba.njit(cache=True, **options)(function)  # type: ignore[no-any-return]
            except RuntimeError:
                pass
        return numba.njit(**options)(function)  # type: ignore[no-any-return]

    return decorate


def ready_target() -> None:
    """Initialise numba's CPU target (its typing and lowering registries) in this process,
    without importing ``scipy.linalg`` for it.

    The first compiled call of a process (even one served from the on-disk cache) loads
    numba's registries, and ``numba.np.arraymath`` checks on import that BLAS is available by
    importing ``scipy.linalg``: 0.09 s of the ~0.2 s every worker spends before its first
    micrograph, for a module flybox's kernels never call. The check is answered without the
    import when scipy.linalg can be found (what the import would establish); a kernel that
    does use BLAS (``np.dot`` in a plugin) still imports it, when it is compiled or first
    called. Idempotent; a no-op once the registries are loaded.
    """
    import numba.np.linalg as linalg
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target

    # Under numba's compiler lock, as its own compilations refresh the registries: a Dask
    # worker warms up in one thread while another may already run a task.
    with global_compiler_lock:
        check = linalg.ensure_blas
        if "numba.np.arraymath" not in sys.modules and importlib.util.find_spec("scipy.linalg"):
            linalg.ensure_blas = _blas_found
        try:
            cpu_target.target_context.refresh()
        finally:
            linalg.ensure_blas = check


def _blas_found() -> None:
    """Stands in for ``numba.np.linalg.ensure_blas`` while the registries load."""
