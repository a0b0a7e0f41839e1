"""Running :func:`~flybox.pipeline.job.run_job` on a Dask cluster (``distributed``), shared by
the batch command (``flybox extract --dask``) and the service's Dask executor (DESIGN.md §10).

Workers get a :class:`~flybox.pipeline.job.MicrographJob` (paths and settings) and hand back a
:class:`~flybox.pipeline.job.JobResult` (small metadata); they read inputs and write temporary
outputs on the shared file system, and the caller commits. Exactly once is **not** Dask's job:
Dask may run a task twice (a worker lost after finishing, a retry) or not at all
(``KilledWorker``), and a scheduler keeps nothing across restarts. So each submission gets its
own task key (the unit key, the attempt and a submission number, :func:`task_key`) and its own
temporary names (``MicrographJob.temp_tag``): two runs of one unit never clash, and the
temporary files of an attempt that nobody will commit can be found and removed
(:func:`discard_attempt`). Which result counts is the caller's (journal's) decision.

A worker must run the same flybox with the same plugins as the caller, or its outputs would
differ silently: :func:`check_workers` compares every worker's :func:`fingerprint` with this
process's and refuses (retires) the others with one clear line; a task that reaches a refused
worker before that fails (:class:`WorkerMismatchError`) and is retried elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import itertools
import logging
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flybox.errors import WorkerLostError
from flybox.pipeline.job import JobResult, MicrographJob, discard_job, run_job

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

__all__ = [
    "LOCAL",
    "DaskBatch",
    "WorkerMismatchError",
    "check_workers",
    "discard_attempt",
    "fingerprint",
    "local_cluster",
    "run_dask_job",
    "run_on_dask",
    "task_key",
    "threads",
    "worker_check",
    "workers_info",
]

log = logging.getLogger(__name__)

#: ``[executor] address`` / ``--dask`` value that starts a cluster on this machine.
LOCAL = "local"

#: Environment of local-cluster workers: one BLAS/OpenMP thread each (parallelism comes from
#: the worker processes, as in the local pool).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class WorkerMismatchError(WorkerLostError):
    """A task reached a worker whose flybox differs from the caller's (version or plugins)."""


def fingerprint() -> dict[str, str]:
    """What a worker must share with the caller: flybox's version, the registered processing
    steps (entry point name = target) and the Python version (pickles)."""
    import flybox

    steps = sorted(f"{e.name}={e.value}" for e in entry_points(group="flybox.processors"))
    return {
        "flybox": flybox.__version__,
        "plugins": ",".join(steps),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


@functools.cache
def _this_worker() -> dict[str, str]:
    """This worker process's :func:`fingerprint`, worked out once (it reads every installed
    distribution's entry points: not something to repeat for each task)."""
    return fingerprint()


def worker_check() -> dict[str, str]:
    """Runs on each worker at connect: warm the processing modules up (so that the first
    micrograph does not pay for them) and report the :func:`fingerprint`."""
    import flybox.pipeline.preload  # noqa: F401

    return fingerprint()


def mismatch(expected: dict[str, str], found: dict[str, str]) -> str | None:
    """What differs between two fingerprints, in words; ``None`` when they agree."""
    differences = []
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            differences.append(f"{name} {found.get(name)!r} (here {expected.get(name)!r})")
    return "; ".join(differences) or None


def task_key(job: MicrographJob) -> str:
    """A task key of its own for each submission: the unit key and attempt (``job.unit``, or
    the micrograph's stem) and a random submission tag, which also names its temporary files."""
    base = job.unit or job.output_stem
    return f"flybox-{base}-{secrets.token_hex(4)}"


def tagged(job: MicrographJob, key: str) -> MicrographJob:
    """``job`` with temporary names of its own (the task key's submission tag)."""
    return dataclasses.replace(job, temp_tag=key.rsplit("-", 1)[-1])


def discard_attempt(job: MicrographJob) -> int:
    """Remove the temporary files of one submission (``job.temp_tag``) wherever its worker got
    to; returns how many. Used when an attempt will never be committed (its worker died, its
    result came back for a unit already done, the caller stopped)."""
    if job.temp_tag is None:
        return 0
    removed = 0
    stem = glob.escape(job.output_stem)
    root = glob.escape(job.output_dir)
    for pattern in (f"{root}/.{stem}*.{job.temp_tag}.tmp", f"{root}/*/.{stem}*.{job.temp_tag}.tmp"):
        for path in glob.glob(pattern):
            Path(path).unlink(missing_ok=True)
            removed += 1
    return removed


def run_dask_job(job: MicrographJob, expected: dict[str, str]) -> JobResult:
    """The task a Dask worker runs: check the worker, run the job, and drop the outputs again
    when nobody wants them any more (the task was cancelled while it ran: the caller stopped or
    lost the scheduler)."""
    problem = mismatch(expected, _this_worker())
    if problem is not None:
        raise WorkerMismatchError(f"worker refused: other flybox: {problem}")
    result = run_job(job)
    if not _still_wanted():
        discard_job(result)
    return result


def _still_wanted() -> bool:
    """Whether the scheduler still wants this task's result (``False`` once it was released
    or cancelled while running)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
        task = worker.state.tasks.get(key)
    except (ImportError, ValueError, AttributeError, KeyError):
        return True
    return task is not None and task.state not in ("cancelled", "released", "forgotten")


async def check_workers(client: Client, expected: dict[str, str], known: set[str]) -> set[str]:
    """Check the workers not in ``known``; retire those whose flybox differs, with one log line
    each. Returns the workers accepted now."""
    workers = set(await workers_info(client)) - known
    if not workers:
        return set()
    replies: dict[str, Any] = await client.run(
        worker_check, workers=sorted(workers), on_error="return"
    )
    accepted, refused = judge(expected, workers, replies)
    if refused:
        await client.retire_workers(workers=refused, close_workers=True, remove=True)
    return accepted


def judge(
    expected: dict[str, str], workers: set[str], replies: dict[str, Any]
) -> tuple[set[str], list[str]]:
    """Accepted and refused workers from their :func:`worker_check` replies (one log line per
    refused worker)."""
    accepted, refused = set(), []
    for address in sorted(workers):
        reply = replies.get(address)
        if isinstance(reply, BaseException):
            problem: str | None = f"cannot run flybox ({type(reply).__name__}: {reply})"
        elif isinstance(reply, dict):
            found = mismatch(expected, reply)
            problem = f"other flybox: {found}" if found else None
        else:
            problem = "did not answer the version check"
        if problem is None:
            accepted.add(address)
        else:
            log.error("dask worker %s refused: %s", address, problem)
            refused.append(address)
    return accepted, refused


async def workers_info(client: Client) -> dict[str, dict[str, Any]]:
    """The scheduler's workers now, by address (an asynchronous client's cached
    ``scheduler_info()`` has no per-worker information)."""
    scheduler = client.scheduler
    if scheduler is None:  # not connected
        return {}
    try:
        identity = await scheduler.identity(n_workers=-1)
    except TypeError:  # distributed before n_workers: every worker anyway
        identity = await scheduler.identity()
    return dict(identity.get("workers", {}))


def threads(workers: dict[str, dict[str, Any]]) -> int:
    """Task slots of ``workers`` (:func:`workers_info`)."""
    return sum(int(w.get("nthreads", 1)) for w in workers.values())


def local_cluster(workers: int, *, asynchronous: bool = False) -> LocalCluster:
    """A cluster on this machine (``address = "local"``, ``--dask local``): ``workers`` worker
    processes with one thread each, on loopback, without a dashboard."""
    from distributed import LocalCluster

    return LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        asynchronous=asynchronous,
        env=dict(WORKER_ENV),
    )


def is_local(address: str) -> bool:
    """Whether an address asks for a cluster on this machine."""
    return address == LOCAL


class DaskBatch:
    """A Dask cluster for a batch (``flybox extract --dask``): :meth:`start` connects in the
    background (importing ``distributed``, starting a local cluster, the client, the version
    check of every worker), so that this overlaps with planning the batch, as the local pool's
    start does; :meth:`run` waits for it and runs the jobs. A context manager (closes the client
    and a local cluster).

    Parameters
    ----------
    address
        A scheduler's address, or ``"local"``: ``workers`` processes on this machine.
    workers
        Worker processes of a local cluster.
    """

    def __init__(self, address: str, workers: int) -> None:
        self.address = address
        self.workers = workers
        #: Seconds from :meth:`start` until the workers were checked (``None`` before).
        self.start_seconds: float | None = None
        self._expected = fingerprint()
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None
        self._slots = 0
        self._connecting: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        """Start connecting (on a thread of its own; :meth:`run` waits for it)."""
        if self._connecting is None:
            self._connecting = concurrent.futures.Future()
            thread = threading.Thread(target=self._connect, name="flybox-dask-connect")
            thread.daemon = True
            thread.start()

    def _connect(self) -> None:
        assert self._connecting is not None
        started = time.perf_counter()
        try:
            from distributed import Client

            cluster = (
                self._stack.enter_context(local_cluster(self.workers))
                if is_local(self.address)
                else None
            )
            client = self._stack.enter_context(
                Client(  # type: ignore[no-untyped-call]
                    cluster if cluster is not None else self.address,
                    timeout=30,
                    set_as_default=False,
                )
            )
            self._client = client
            info = client.scheduler_info(n_workers=-1)["workers"]
            # One call checks every worker (not one per task).
            replies = client.run(worker_check, workers=sorted(info), on_error="return")
            accepted, refused = judge(self._expected, set(info), replies)
            if refused:
                client.retire_workers(workers=refused, close_workers=True, remove=True)
            if not accepted:
                raise WorkerLostError(f"dask scheduler {self.address}: no worker runs this flybox")
            self._slots = max(threads({a: w for a, w in info.items() if a in accepted}), 1)
        except BaseException as exc:
            self._connecting.set_exception(exc)
            return
        self.start_seconds = time.perf_counter() - started
        log.info(
            "dask scheduler %s: %d workers accepted, %d task slots; client started in %.2f s",
            self.address,
            len(accepted),
            self._slots,
            self.start_seconds,
        )
        self._connecting.set_result(None)

    def __enter__(self) -> DaskBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client (and a local cluster), once connecting has ended."""
        if self._connecting is not None:
            concurrent.futures.wait([self._connecting])
        self._client = None
        self._stack.close()

    def run(self, jobs: Sequence[MicrographJob]) -> Iterator[tuple[int, JobResult | BaseException]]:
        """Run jobs, yielding ``(index, result or exception)`` as they finish. Each worker
        slot has a second task waiting (``2 ×`` the task slots in flight), so that a worker
        never waits for a round trip to the client between two micrographs; memory does not
        grow with the batch."""
        from distributed import KilledWorker, as_completed

        self.start()
        assert self._connecting is not None
        self._connecting.result()
        client = self._client
        assert client is not None
        expected = self._expected
        limit = 2 * self._slots
        pending: dict[str, tuple[int, MicrographJob]] = {}
        queue = iter(enumerate(jobs))
        running = as_completed(loop=client.loop)  # type: ignore[no-untyped-call]

        def submit(count: int) -> None:
            batch = list(itertools.islice(queue, count))
            if not batch:
                return
            keys, attempts = [], []
            for index, job in batch:
                key = task_key(job)
                attempt = tagged(job, key)
                pending[key] = (index, attempt)
                keys.append(key)
                attempts.append(attempt)
            # One message to the scheduler for the lot.
            futures = client.map(run_dask_job, attempts, expected=expected, key=keys, pure=False)
            running.update(futures)  # type: ignore[no-untyped-call]

        submit(limit)
        for future in running:
            index, attempt = pending.pop(future.key)
            try:
                outcome: JobResult | BaseException = future.result()
            except KilledWorker as exc:
                discard_attempt(attempt)
                outcome = WorkerLostError(f"{attempt.micrograph}: dask worker died ({exc})")
            except Exception as exc:
                discard_attempt(attempt)
                outcome = exc
            future.release()
            submit(limit - len(pending))
            yield index, outcome


def run_on_dask(
    jobs: Sequence[MicrographJob], address: str, workers: int
) -> Iterator[tuple[int, JobResult | BaseException]]:
    """Run jobs on a Dask cluster (``address``, or ``"local"``: ``workers`` processes here),
    yielding ``(index, result or exception)`` as they finish (:class:`DaskBatch`)."""
    with DaskBatch(address, workers) as batch:
        yield from batch.run(jobs)
