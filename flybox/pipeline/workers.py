"""The one worker pool: processes that run :func:`flybox.pipeline.job.run_job`, for the batch
command and the service's local executor alike.

Workers start with the processing modules imported and their compiled kernels warm
(:mod:`flybox.pipeline.preload`), one BLAS/OpenMP thread each (parallelism comes from the
processes), and end with the process that made them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings
from concurrent import futures

__all__ = ["ready_worker", "worker_pool"]

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """A process's start time (``/proc/PID/stat`` field 22), ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _watch_service(pid: int, started: str | None) -> None:
    """Worker thread: end the worker when the service process is gone."""
    while True:
        time.sleep(0.5)
        if _start_time(pid) != started:  # gone (or its pid reused)
            os._exit(1)


def _worker_init(service_pid: int) -> None:
    """Runs first in every worker process.

    Ignores SIGINT (draining is the service's decision) and makes the worker end with the
    service: fork-server workers are the fork server's children and hold its pipes, so
    neither the kernel nor multiprocessing would end them when the service is killed. A thread
    checks every 0.5 s that the service process (pid + start time) still exists.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = _start_time(service_pid)
    if started is None:  # the service died while this worker was starting
        os._exit(1)
    threading.Thread(
        target=_watch_service, args=(service_pid, started), name="flybox-orphan", daemon=True
    ).start()


def _warm_up() -> None:
    """Runs first in every forked worker: the compiled kernels, ready before the first job."""
    import flybox.pipeline.preload  # noqa: F401


def ready_worker() -> int:
    """A no-op job that makes the pool start a worker."""
    return os.getpid()


def worker_pool(workers: int, *, fork: bool | None = None) -> futures.ProcessPoolExecutor:
    """A process pool whose workers start with the processing modules imported.

    When this process runs no other Python thread (the batch command), workers are forked
    from it at once: they start in milliseconds and share the imported modules, and each
    warms its compiled kernels up (numba's on-disk cache) while this process goes on (planning
    the batch), instead of this process doing it before forking. The
    only native thread then is the background thread of pyarrow's jemalloc (pulled in by
    pandas), which jemalloc itself makes fork-safe with ``pthread_atfork`` handlers. With
    other Python threads alive (the service), workers come from a fork server that imports
    them once instead; those end by themselves when this process is gone.

    Parameters
    ----------
    workers
        Number of processes.
    fork
        ``True``/``False`` to force forking or the fork server; ``None`` (default): fork
        when this process runs no other thread.
    """
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    if fork is None:
        default_fork = multiprocessing.get_start_method(allow_none=True) in (None, "fork")
        fork = default_fork and threading.active_count() == 1
    if fork:
        pool = futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_warm_up
        )
        with warnings.catch_warnings():
            # Python ≥ 3.12 warns about fork() in any multi-threaded process; see above.
            warnings.simplefilter("ignore", DeprecationWarning)
            # The first submission forks every worker before it returns (and before the pool's
            # manager thread starts); no need to wait for the no-op itself.
            pool.submit(ready_worker)
        log.debug("worker pool: %d processes forked from this one", workers)
        return pool
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flybox.pipeline.preload"])
    log.debug("worker pool: %d processes from a fork server", workers)
    return futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_init,
        initargs=(os.getpid(),),
    )
