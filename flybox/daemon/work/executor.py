"""Where units of work run: the executor interface and the local process pool (DESIGN.md §10).

The service hands an executor a :class:`~flybox.pipeline.job.MicrographJob` (paths and
settings, small
and picklable) and awaits a :class:`~flybox.pipeline.job.JobResult` (small metadata; the worker has
written its outputs under temporary names). Any object with the :class:`Executor` methods
will do: :class:`LocalExecutor` runs jobs in worker processes on this machine;
:class:`~flybox.daemon.work.dask_executor.DaskExecutor` on a Dask cluster (workers then
read inputs and write temporary outputs on the shared file system, and the service commits).
Both also have a ``state`` property (:class:`~flybox.daemon.telemetry.events.ExecutorStatus`)
for status, metrics and MQTT.

Workers come from a fork server that has imported the processing modules once
(``flybox.pipeline.preload``): the service runs threads (watchdog, journal), so forking the service
itself is not safe. Each worker ignores SIGINT (a Ctrl-C in a terminal reaches the whole
process group; draining is the service's decision) and ends itself when the service process is
gone, so that a killed service never leaves workers writing into the output folder behind it
(the fork server and multiprocessing's resource tracker then end on their own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
import contextlib
import logging
from types import TracebackType
from typing import Protocol

from flybox.daemon.telemetry.events import ExecutorStatus
from flybox.errors import WorkerLostError
from flybox.pipeline.job import JobResult, MicrographJob, run_job
from flybox.pipeline.workers import ready_worker, worker_pool

__all__ = ["Executor", "LocalExecutor"]

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the service needs from an executor."""

    @property
    def workers(self) -> int:
        """How many jobs can run at once (the service keeps about twice as many in flight)."""
        ...

    def submit(self, job: MicrographJob) -> asyncio.Future[JobResult]:
        """Start a job; the future resolves to its result or raises its exception
        (:class:`~flybox.errors.WorkerLostError` when the worker died)."""
        ...

    def abandon(self, future: asyncio.Future[JobResult]) -> None:
        """Give up a job that did not finish in time (``future`` came from :meth:`submit`):
        cancel it and free what it holds as far as the executor can."""
        ...

    async def close(self, *, cancel: bool) -> None:
        """Stop the workers; ``cancel``: abandon running jobs (their temporary files are
        removed by the service)."""
        ...


class LocalExecutor:
    """A pool of worker processes on this machine; an async context manager.

    Parameters
    ----------
    workers
        Number of worker processes.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: futures.ProcessPoolExecutor | None = None
        self._generation = 0
        #: Jobs in flight: their result future → (the job, its future in the current pool).
        self._jobs: dict[
            asyncio.Future[JobResult], tuple[MicrographJob, futures.Future[JobResult]]
        ] = {}

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return self._workers

    @property
    def state(self) -> ExecutorStatus:
        """For status, metrics and MQTT: always connected."""
        return ExecutorStatus(kind="local", connected=self._pool is not None, workers=self._workers)

    def _new_pool(self) -> futures.ProcessPoolExecutor:
        return worker_pool(self._workers, fork=False)

    async def start(self) -> None:
        """Start the workers now (the fork server imports the processing modules once), so
        that the first micrograph does not wait for them."""
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, ready_worker) for _ in range(self._workers))
        )

    async def __aenter__(self) -> LocalExecutor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(cancel=True)

    def submit(self, job: MicrographJob) -> asyncio.Future[JobResult]:
        """Run ``job`` in a worker."""
        if self._pool is None:
            raise RuntimeError("the executor is not started")
        outer: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._start(job, outer)

        def forget(done: asyncio.Future[JobResult]) -> None:
            entry = self._jobs.pop(done, None)
            if entry is not None and done.cancelled():
                entry[1].cancel()

        outer.add_done_callback(forget)
        return outer

    def _start(self, job: MicrographJob, outer: asyncio.Future[JobResult]) -> None:
        assert self._pool is not None
        try:
            submitted = self._pool.submit(run_job, job)
        except futures.process.BrokenProcessPool:  # broken by an earlier job: not this one's fault
            self._replace_broken(self._generation)
            submitted = self._pool.submit(run_job, job)
        generation = self._generation
        self._jobs[outer] = (job, submitted)
        inner = asyncio.wrap_future(submitted)

        def settle(done: asyncio.Future[JobResult]) -> None:
            error = None if done.cancelled() else done.exception()  # retrieved in every case
            current = self._jobs.get(outer)
            if outer.done() or current is None or current[1] is not submitted:
                return  # abandoned, or running again on a new pool
            if done.cancelled():
                outer.cancel()
                return
            if isinstance(error, futures.process.BrokenProcessPool):
                self._replace_broken(generation)
                outer.set_exception(WorkerLostError(f"worker process died: {error}"))
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        inner.add_done_callback(settle)

    def abandon(self, future: asyncio.Future[JobResult]) -> None:
        """Give up a job that does not finish (a read or write on a hung file system): stop
        every worker of the pool (a process pool cannot stop one job) and start new ones; the
        other jobs in flight run again on the new workers, transparently. A worker stuck in
        the kernel ends when its system call returns."""
        self._jobs.pop(future, None)
        if not future.done():
            future.cancel()
        if self._pool is None:
            return
        old = self._pool
        processes = list(getattr(old, "_processes", {}).values())
        self._pool = self._new_pool()
        self._generation += 1
        for process in processes:
            with contextlib.suppress(OSError, ValueError):
                process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        log.warning("stopped %d workers (a job did not finish); starting new ones", len(processes))
        for other, (job, _) in list(self._jobs.items()):
            if not other.done():
                self._start(job, other)

    def _replace_broken(self, generation: int) -> None:
        """A worker died: the pool is unusable; start a new one (once per breakage)."""
        if generation != self._generation or self._pool is None:
            return
        log.warning("a worker process died; starting new workers")
        broken, self._pool = self._pool, self._new_pool()
        self._generation += 1
        broken.shutdown(wait=False, cancel_futures=True)

    async def close(self, *, cancel: bool) -> None:
        """Shut the pool down; with ``cancel``, running jobs are killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", {}).values()) if cancel else []
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        await asyncio.to_thread(pool.shutdown, wait=True)
