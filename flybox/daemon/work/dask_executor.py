"""The service's Dask executor: :class:`~flybox.daemon.work.executor.Executor` on a Dask
cluster, on the asyncio client in the service's event loop (DESIGN.md §10).

``[executor] address = "tcp://host:8786"`` uses an existing scheduler; ``"local"`` starts a
``LocalCluster`` of ``[executor] workers`` processes on loopback. What runs on the workers and
why exactly once stays the journal's job: :mod:`flybox.pipeline.dask`.

Faults, as the service sees them:

- a worker dies mid-task, or Dask gives up on a task (``KilledWorker``): the submission fails
  with :class:`~flybox.errors.WorkerLostError`, so the runner retries it (bounded by
  ``[executor] max_attempts``); the attempt's temporary files are removed;
- the scheduler restarts or is unreachable: logged once; every submission in flight waits and
  is submitted again (new task key, new temporary names) once a scheduler answers again, tried
  with backoff up to :attr:`DaskExecutor.max_backoff` seconds apart; meanwhile the service
  keeps watching and journaling;
- a worker whose flybox differs (version, plugins) is refused with one clear line and retired
  (:func:`~flybox.pipeline.dask.check_workers`), at connect and whenever workers join.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from types import TracebackType
from typing import Any

from distributed import Client, Future, KilledWorker, LocalCluster

from flybox.daemon.telemetry.events import ExecutorStatus
from flybox.errors import WorkerLostError
from flybox.pipeline.dask import (
    check_workers,
    discard_attempt,
    fingerprint,
    is_local,
    local_cluster,
    run_dask_job,
    tagged,
    task_key,
    threads,
    workers_info,
)
from flybox.pipeline.job import JobResult, MicrographJob

__all__ = ["DaskExecutor"]

log = logging.getLogger(__name__)

#: How often the supervisor looks at the connection and for new workers.
WATCH_SECONDS = 0.5
#: At stop, how long abandoned tasks (still running on workers) get to end before their
#: temporary files are removed.
ABANDON_SECONDS = 20.0


class DaskExecutor:
    """Jobs on a Dask cluster; an async context manager owning its supervisor task.

    Parameters
    ----------
    address
        ``tcp://host:port`` of a scheduler, or ``"local"``.
    workers
        Worker processes of a local cluster; elsewhere the least number of jobs the service
        keeps in flight (it keeps about twice the cluster's task slots).
    max_backoff
        Longest wait between reconnection attempts, in seconds.
    """

    def __init__(self, address: str, workers: int, *, max_backoff: float = 10.0) -> None:
        self.address = address
        self.max_backoff = max_backoff
        self._slots = workers
        self._local_workers = workers
        self._expected = fingerprint()
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._connected = asyncio.Event()
        self._accepted: set[str] = set()
        self._closing = False
        self._lost_logged = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._abandoned: list[tuple[Future[JobResult], MicrographJob]] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------------------- interface
    @property
    def workers(self) -> int:
        """Task slots (at least ``workers``; the cluster's threads once connected)."""
        return self._slots

    @property
    def state(self) -> ExecutorStatus:
        """Connected or not, and how many accepted workers (status, metrics, MQTT)."""
        return ExecutorStatus(
            kind="dask", connected=self._connected.is_set(), workers=len(self._accepted)
        )

    async def __aenter__(self) -> DaskExecutor:
        async with contextlib.AsyncExitStack() as stack:
            if is_local(self.address):
                cluster = local_cluster(self._local_workers, asynchronous=True)
                self._cluster = await stack.enter_async_context(cluster)
            self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
            await self._connect()
            self._supervisor = self._tasks.create_task(self._supervise(), name="dask-supervisor")
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(cancel=True)

    def submit(self, job: MicrographJob) -> asyncio.Future[JobResult]:
        """Run ``job`` on the cluster (submitted again after a scheduler restart)."""
        if self._tasks is None or self._closing:
            raise RuntimeError("the executor is not started")
        outer: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        task = self._tasks.create_task(self._settle(job, outer), name=f"dask-{job.output_stem}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        outer.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return outer

    def abandon(self, future: asyncio.Future[JobResult]) -> None:
        """Give up a job: cancel its future (the Dask task is cancelled with it). A task
        stuck in a system call on a hung file system keeps its worker thread until the call
        returns: Dask cannot stop a running task."""
        future.cancel()

    async def _settle(self, job: MicrographJob, outer: asyncio.Future[JobResult]) -> None:
        """Run a job and hand its outcome to ``outer`` (never raises into the task group)."""
        try:
            result = await self._run(job)
        except asyncio.CancelledError:
            outer.cancel()
            raise
        except Exception as exc:
            if not outer.done():
                outer.set_exception(exc)
        else:
            if not outer.done():
                outer.set_result(result)

    async def close(self, *, cancel: bool) -> None:
        """Stop: wait a little for tasks still running on workers, remove the temporary files of
        every submission that will not be committed, close the client (and a local cluster)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        running = list(self._running)
        for task in running:  # the service hands their units back to the journal
            task.cancel()
        if running:
            await asyncio.wait(running)
        try:
            if self._abandoned and self._connected.is_set():
                from distributed import wait

                futures = [future for future, _ in self._abandoned]
                with contextlib.suppress(Exception):
                    await wait(futures, timeout=ABANDON_SECONDS)  # type: ignore[no-untyped-call]
            for _, job in self._abandoned:
                await asyncio.to_thread(discard_attempt, job)
            self._abandoned.clear()
            client, self._client = self._client, None
            self._connected.clear()
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()  # type: ignore[no-untyped-call]
        finally:
            await stack.aclose()  # the task group (its tasks are cancelled), then the cluster
            self._tasks = None

    # ----------------------------------------------------------------------------- internals
    async def _connect(self) -> bool:
        """Connect once; on success check the workers. ``False`` when the scheduler does not
        answer (logged once until it does)."""
        address: Any = self._cluster if self._cluster is not None else self.address
        try:
            client = await Client(address, asynchronous=True, timeout=5, set_as_default=False)  # type: ignore[no-untyped-call]
        except (OSError, TimeoutError) as exc:
            if not self._lost_logged:
                log.error(
                    "dask scheduler %s unreachable (%s); still watching and journaling, "
                    "reconnecting with backoff",
                    self.address,
                    exc,
                )
                self._lost_logged = True
            return False
        self._client = client
        self._accepted = set()
        await self._check_workers(client)
        self._connected.set()
        if self._lost_logged:
            log.warning("dask scheduler %s: connected again", self.address)
        self._lost_logged = False
        log.info(
            "dask scheduler %s: %d workers accepted, %d task slots",
            self.address,
            len(self._accepted),
            self._slots,
        )
        return True

    async def _check_workers(self, client: Client) -> None:
        current = await workers_info(client)
        self._accepted &= set(current)
        self._accepted |= await check_workers(client, self._expected, self._accepted)
        accepted = {a: w for a, w in current.items() if a in self._accepted}
        self._slots = max(self._slots, threads(accepted))

    def _lost(self, why: str) -> None:
        if self._connected.is_set() and not self._lost_logged:
            log.error(
                "dask scheduler %s lost (%s); still watching and journaling, reconnecting "
                "with backoff; work in flight will be submitted again",
                self.address,
                why,
            )
            self._lost_logged = True
        self._connected.clear()

    async def _supervise(self) -> None:
        """Watch the connection (reconnect with backoff) and check workers that join."""
        backoff = 0.5
        next_try = 0.0
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            client = self._client
            if client is not None and client.status == "running":
                try:
                    await self._check_workers(client)
                except Exception as exc:  # the scheduler went away during the check
                    log.debug("worker check failed: %s", exc)
                continue
            if client is not None and client.status in ("connecting", "newly-created"):
                self._lost("connection interrupted")
                continue  # the client reconnects by itself for a while
            self._lost("connection closed")
            if time.monotonic() < next_try:
                continue
            if client is not None:
                self._client = None
                with contextlib.suppress(Exception):
                    await client.close()  # type: ignore[no-untyped-call]
            if await self._connect():
                backoff = 0.5
            else:
                backoff = min(backoff * 2, self.max_backoff)
                next_try = time.monotonic() + backoff

    async def _run(self, job: MicrographJob) -> JobResult:
        while True:
            await self._connected.wait()
            client = self._client
            if client is None or client.status != "running":
                self._lost("connection interrupted")
                continue
            key = task_key(job)
            attempt = tagged(job, key)
            future = client.submit(
                run_dask_job, attempt, self._expected, key=key, pure=False, retries=0
            )
            try:
                return await future  # type: ignore[no-any-return]
            except KilledWorker as exc:
                await asyncio.to_thread(discard_attempt, attempt)
                raise WorkerLostError(f"dask worker died while running it ({exc})") from None
            except WorkerLostError:
                await asyncio.to_thread(discard_attempt, attempt)
                raise
            except asyncio.CancelledError:  # the runner handed the unit back (drain)
                self._abandoned.append((future, attempt))
                raise
            except concurrent.futures.CancelledError:
                # Dask cancelled it (distributed's FutureCancelledError): the scheduler
                # connection was lost. Submit it again once a scheduler answers.
                self._abandoned.append((future, attempt))
                self._lost("scheduler connection lost")
            except OSError as exc:
                if client.status == "running" and future.status == "error":
                    await asyncio.to_thread(discard_attempt, attempt)
                    raise  # the job's own I/O error
                self._abandoned.append((future, attempt))
                self._lost(f"{type(exc).__name__}: {exc}")
            except Exception:
                await asyncio.to_thread(discard_attempt, attempt)
                raise
