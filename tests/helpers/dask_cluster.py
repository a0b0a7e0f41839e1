"""Real Dask processes for tests: ``dask scheduler`` and ``dask worker`` (the ``distributed``
CLI), every one bound to loopback (``--host 127.0.0.1``), without dashboards."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.service import free_port, wait_for


class DaskProcesses:
    """A scheduler on a fixed loopback port (so that it can be restarted at the same address)
    and any number of workers, each a subprocess logging to ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Path] = []

    def _dask(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.folder / f"dask-{name}.log"
        self._logs.append(log)
        with open(log, "ab") as handle:
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "dask"), *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                cwd=self.folder,
            )

    def start_scheduler(self, *, env: dict[str, str] | None = None) -> None:
        """Start the scheduler (again); ``env``: extra environment, e.g. Dask configuration
        (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``)."""
        self.scheduler = self._dask(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-dashboard",
            env=env,
        )
        wait_for(lambda: b"Scheduler at" in self.log("scheduler"), 60, "the dask scheduler")

    def stop_scheduler(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.send_signal(signal.SIGKILL)
            self.scheduler.wait(10)
        self.scheduler = None

    def start_worker(
        self,
        name: str,
        *,
        preload: Path | None = None,
        memory_limit: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start a worker with one thread. Without ``memory_limit``: no nanny (a SIGKILL ends
        it for good). With one: under a nanny, which terminates the worker process when it
        goes beyond 95 % of the limit and starts a new one."""
        args = [
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--name",
            name,
        ]
        if memory_limit is None:
            args += ["--no-nanny"]
        else:
            args += ["--nanny", "--memory-limit", memory_limit]
        if preload is not None:
            args += ["--preload", str(preload)]
        self.workers[name] = self._dask(f"worker-{name}", *args, env=env)

    def wait_worker(self, name: str) -> None:
        wait_for(
            lambda: (
                b"Registered to" in self.log(f"worker-{name}")
                or self.workers[name].poll() is not None
            ),
            60,
            f"dask worker {name}",
        )

    def worker_address(self, name: str) -> str:
        match = re.search(rb"Start worker at:\s+(\S+)", self.log(f"worker-{name}"))
        assert match is not None, self.log(f"worker-{name}")
        return match.group(1).decode()

    def kill_worker_mid_task(self, name: str, timeout: float = 60.0) -> str:
        """SIGKILL a worker while the scheduler says it is running a task (asked every 5 ms);
        returns that task's key."""
        from distributed import Client

        address = self.worker_address(name)
        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=10, set_as_default=False) as client:
            while time.monotonic() < deadline:
                keys = client.processing(workers=[address]).get(address, ())
                if keys:
                    self.kill_worker(name)
                    return str(keys[0])
                time.sleep(0.005)
        raise AssertionError(f"dask worker {name} never ran a task")

    def kill_worker(self, name: str) -> None:
        process = self.workers[name]
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def log(self, name: str) -> bytes:
        path = self.folder / f"dask-{name}.log"
        return path.read_bytes() if path.exists() else b""

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in set(self._logs)
        )

    def close(self) -> None:
        for process in [*self.workers.values(), self.scheduler]:
            if process is not None and process.poll() is None:
                with contextlib.suppress(OSError):
                    process.send_signal(signal.SIGKILL)
                process.wait(10)
