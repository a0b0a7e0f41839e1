"""The local executor: real worker processes from a fork server."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from flybox.daemon.work.executor import LocalExecutor
from flybox.errors import MrcFormatError, WorkerLostError
from flybox.io.mrc import write_micrograph
from flybox.pipeline.chain import ChainSpec
from flybox.pipeline.job import MicrographJob
from flybox.sim.microscope import synthetic_micrograph

CHAIN = [{"step": "extract", "box": 32, "border": "fill"}]


def _job(tmp_path: Path, name: str = "m", particles: int = 5) -> MicrographJob:
    mic = synthetic_micrograph(128, particles, rng=1)
    path = tmp_path / f"{name}.mrc"
    write_micrograph(path, mic.image, 1.0)
    return MicrographJob(
        micrograph=str(path),
        name=str(path),
        output_dir=str(tmp_path / "out"),
        chain=ChainSpec.of(CHAIN),
        picks=mic.picks,
    )


async def test_jobs_run_in_worker_processes_and_return_small_results(tmp_path: Path) -> None:
    async with LocalExecutor(2) as executor:
        results = await asyncio.gather(
            *(executor.submit(_job(tmp_path, f"m{i}")) for i in range(3))
        )
    assert [r.particles for r in results] == [5, 5, 5]
    for result in results:
        temp = result.streams["particles"].stack_temp
        assert temp is not None
        assert Path(temp).name.startswith(".")  # written under a temporary name
        assert Path(temp).exists()


async def test_worker_errors_come_back_as_exceptions(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"x" * 2048)
    job = _job(tmp_path)
    job.micrograph = str(bad)
    async with LocalExecutor(1) as executor:
        with pytest.raises(MrcFormatError) as caught:
            await executor.submit(job)
    assert caught.value.path == str(bad)


async def test_a_worker_dying_under_a_job_is_reported_and_replaced(tmp_path: Path) -> None:
    async with LocalExecutor(1) as executor:
        await executor.submit(_job(tmp_path))
        pool = executor._pool
        assert pool is not None
        workers = list(pool._processes.values())  # type: ignore[attr-defined]
        # Stop the worker first so that the next job is certainly in flight (queued to it, not
        # finished) when the worker dies: the race between death and submission is removed.
        for process in workers:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGSTOP)
        pending = executor.submit(_job(tmp_path, "again"))
        await asyncio.sleep(0.2)
        assert not pending.done()
        for process in workers:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            await asyncio.wait_for(pending, 30)
        assert executor._pool is not pool  # replaced
        result = await executor.submit(_job(tmp_path, "after"))
    assert result.particles == 5


async def test_a_worker_that_died_while_idle_does_not_fail_the_next_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with LocalExecutor(1) as executor:
        await executor.submit(_job(tmp_path))
        pool = executor._pool
        assert pool is not None
        for process in list(pool._processes.values()):  # type: ignore[attr-defined]
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        for _ in range(200):  # until the pool has noticed the death
            if pool._broken:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert pool._broken  # type: ignore[attr-defined]
        result = await executor.submit(_job(tmp_path, "next"))
        assert executor._pool is not pool
    assert result.particles == 5
    assert "a worker process died" in caplog.text


async def test_closing_with_cancel_ends_the_workers(tmp_path: Path) -> None:
    executor = LocalExecutor(2)
    await executor.start()
    pool = executor._pool
    assert pool is not None
    processes = list(pool._processes.values())  # type: ignore[attr-defined]
    await executor.close(cancel=True)
    for process in processes:
        process.join(5)
        assert not process.is_alive()
