"""numba set-up of the worker processes (flybox/processors/jit.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_target_is_ready_without_scipy_linalg_and_blas_kernels_still_work() -> None:
    # In a fresh interpreter (numba's registries load once per process): ready_target() loads
    # them under numba's compiler lock; after it, scipy.linalg is not imported, numba still
    # knows BLAS is there, a cached flybox kernel runs, and a kernel calling np.dot compiles
    # and gives numpy's answer (importing scipy.linalg then).
    code = textwrap.dedent(
        """
        import sys
        import numba
        import numpy as np
        from flybox.processors.jit import ready_target

        from numba.core.compiler_lock import global_compiler_lock
        from numba.core.registry import cpu_target

        # The registries load under numba's compiler lock, as numba's own compilations load
        # them (a Dask worker warms up in one thread while another may run a task).
        held = []
        refresh = cpu_target.target_context.refresh

        def watched_refresh():
            held.append(global_compiler_lock.is_locked())
            refresh()

        cpu_target.target_context.refresh = watched_refresh
        ready_target()
        cpu_target.target_context.refresh = refresh
        assert held and held[0], "the first refresh ran without the lock"
        ready_target()  # idempotent
        import numba.np.arraymath as arraymath
        import numba.np.linalg as linalg

        assert "scipy.linalg" not in sys.modules, "scipy.linalg imported"
        assert arraymath._HAVE_BLAS
        assert linalg.ensure_blas.__module__ == "numba.np.linalg"

        from flybox.processors.normalize import normalize_images

        image = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
        out, _ = normalize_images(image, method="whole", radius=2)
        assert abs(out.mean()) < 1e-6 and abs(out.std() - 1.0) < 1e-5

        @numba.njit
        def product(a, b):
            return np.dot(a, b)

        a = np.arange(9.0).reshape(3, 3)
        assert np.allclose(product(a, a), a @ a)
        assert "scipy.linalg" in sys.modules
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
