"""``flybox run``: the streaming service (DESIGN.md §2), one async context manager.

::

    async with Service(config) as service:   # journal, workers, publishing, watcher, loops
        await service.wait()                 # until stop() (SIGTERM/SIGINT)
                                             # leaving: drain, hand back, "stopped"

Inside, everything runs on one event loop; blocking work goes to threads (scans, probes,
hashing, parsing: the default thread pool; journal and commits: one journal thread, which
serialises them) and processing to the executor's worker processes. Files flow:
watcher → :class:`~flybox.daemon.intake.complete.Completeness` (tick loop) → intake (fingerprint or
parse, quarantine) → :class:`~flybox.daemon.intake.pairing.Pairing` → journal unit (resolved by
key) →
ready queue → :mod:`flybox.daemon.work.queue` (submit, commit, events).

A restart continues where the journal says: units left ``running`` are queued again, the
cumulative STAR files are cut back to their committed length, temporary files are removed,
and inputs are rediscovered by the first scan; a unit whose key is ``done`` is not processed
again. An output folder is never used with other processing settings (the service refuses to
start, see :func:`check_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from flybox.config import FlyboxConfig, load_config
from flybox.daemon.intake.pairing import Pair
from flybox.daemon.intake.reading import settings_description, settings_hash
from flybox.daemon.intake.stage import Intake
from flybox.daemon.intake.watch import Watcher, compile_pattern
from flybox.daemon.systemd import Notifier
from flybox.daemon.telemetry.events import EventBus, ServiceState, StatusEvent
from flybox.daemon.telemetry.progress import Phase, Progress
from flybox.daemon.work.commit import Committer
from flybox.daemon.work.executor import Executor, LocalExecutor
from flybox.daemon.work.journal import Journal, UnitRecord
from flybox.daemon.work.queue import UnitRunner
from flybox.errors import ConfigError
from flybox.pipeline.inputs import DEFAULT_COORD_SUFFIXES
from flybox.pipeline.job import JobWarnings
from flybox.pipeline.matching import PatternMatches

__all__ = ["Service", "check_settings", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A status event at least this often (and after commits, at most once per second).
STATUS_SECONDS = 5.0
#: Failure codes whose units a restart queues again (the cause may be gone: a full disk,
#: a crash, a fixed bug); ``processing`` failures are deterministic and stay failed.
RETRIED_AT_START = ("worker_crash", "io_error", "internal")


@dataclass
class StemState:
    """The service's view of one micrograph (stem)."""

    stem: str
    unit: UnitRecord | None = None
    pair: Pair | None = None
    micrograph_at: float = 0.0
    touched_at: float = 0.0
    ready_at: float = 0.0


def check_settings(journal: Journal, digest: str, description: str, output: Path) -> None:
    """Refuse an output folder made with other processing settings (a particle set never mixes
    settings); record the settings of a fresh one.

    Raises
    ------
    ConfigError
        When the journal has committed micrographs made with other settings.
    """
    recorded = journal.get_meta("settings_hash")
    if recorded is not None and recorded != digest and journal.star_files():
        raise ConfigError(
            "chain",
            f"{output} holds particles made with other processing settings ([[chain]], "
            "[micrograph] or [output] changed); a particle set never mixes settings: use a new "
            "[session] output folder, or restore the settings recorded in "
            f"{journal.path} (meta 'settings')",
        )
    if recorded != digest:
        journal.set_meta("settings_hash", digest)
        journal.set_meta("settings", description)


def _coordinate_patterns(config: FlyboxConfig) -> list[str]:
    assert config.watch is not None
    if config.watch.coordinates:
        return list(config.watch.coordinates)
    suffixes = (config.watch.coordinate_suffix,) if config.watch.coordinate_suffix else None
    return [
        os.path.join(os.path.dirname(pattern), "*" + suffix)
        for pattern in config.watch.micrographs
        for suffix in suffixes or DEFAULT_COORD_SUFFIXES
    ]


class Service:
    """The streaming service of one session (module docstring).

    Parameters
    ----------
    config
        A validated configuration with ``[session]`` and ``[watch]``.
    executor
        Where jobs run (default: :class:`~flybox.daemon.work.executor.LocalExecutor` with
        ``[executor] workers``).
    notifier
        systemd notifications (default: from ``NOTIFY_SOCKET``).
    publishing
        Whether to start MQTT/metrics/HTTP publishing.

    Raises
    ------
    ConfigError
        For settings ``flybox run`` cannot use.
    """

    def __init__(
        self,
        config: FlyboxConfig,
        *,
        executor: Executor | None = None,
        notifier: Notifier | None = None,
        publishing: bool = True,
    ) -> None:
        if config.session is None:
            raise ConfigError("session", "flybox run needs a [session] table (name, output)")
        if config.watch is None:
            raise ConfigError("watch", "flybox run needs a [watch] table (micrographs, …)")
        if config.executor.address is not None and executor is None:
            raise ConfigError(
                "executor.address",
                "Dask executors are not available in this version; remove the key to use "
                "local worker processes",
            )
        self.config = config
        self.chain = config.build_chain()
        if self.chain.requires_ctf and config.watch.ctf is None:
            raise ConfigError("watch.ctf", "the chain needs each micrograph's CTF; set its source")
        self.session = config.session.name
        self.output_dir = Path(config.session.output).absolute()
        self.project_dir = config.session.project_folder()
        self.job_warnings = JobWarnings()
        self.watch = config.watch
        self.bus = EventBus()
        self.notifier = notifier or Notifier()
        self.state: ServiceState = "starting"
        self.settings = settings_description(config, self.chain)
        self.settings_hash = settings_hash(self.settings)
        self.progress = Progress(self.session, self.chain.streams, config.executor.workers)
        self.patterns = [compile_pattern("micrograph", p) for p in self.watch.micrographs]
        self.patterns += [compile_pattern("coordinates", p) for p in _coordinate_patterns(config)]
        if self.watch.ctf is not None:
            self.patterns.append(compile_pattern("ctf", self.watch.ctf))
        self.matched = PatternMatches(self.patterns)
        self.stems: dict[str, StemState] = {}
        self.intake = Intake(self)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._status_dirty = False
        self._executor = executor
        self._publishing = publishing
        self._journal_thread: ThreadPoolExecutor | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.task_group: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[None]] = []
        self.journal: Journal | None = None
        self.runner: UnitRunner | None = None

    # ----------------------------------------------------------------------------- helpers
    async def journal_call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``function(*args, **kwargs)`` on the journal thread (journal and commits, in
        order)."""
        assert self._journal_thread is not None
        loop = asyncio.get_running_loop()
        call = functools.partial(function, *args, **kwargs)
        return await loop.run_in_executor(self._journal_thread, call)

    def status_snapshot(self) -> StatusEvent:
        """The current :class:`~flybox.daemon.telemetry.events.StatusEvent`."""
        status = self.progress.snapshot(self.state)
        return status.model_copy(update={"unmatched_patterns": self.matched.unmatched})

    def publish_status(self) -> None:
        """Publish the status now (and show it to systemd)."""
        self._status_dirty = False
        self.bus.publish(self.status_snapshot())
        self.notifier.status(f"{self.state}: {self.progress.line()}")

    def mark_dirty(self) -> None:
        """Something changed: publish a status within a second."""
        self._status_dirty = True

    def set_phase(self, stem: str, phase: Phase | None) -> None:
        """Move a stem to a phase (status counts)."""
        self.progress.set_phase(stem, phase)
        self.mark_dirty()

    def stem(self, stem: str) -> StemState:
        """The state of a stem (created on first use)."""
        return self.stems.setdefault(stem, StemState(stem))

    def stop(self) -> None:
        """Stop taking work and drain (a second call: stop without waiting for workers)."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    async def wait(self) -> None:
        """Wait until :meth:`stop` is called."""
        await self._stop.wait()

    # ----------------------------------------------------------------------------- lifetime
    async def __aenter__(self) -> Service:
        started = time.monotonic()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._journal_thread = ThreadPoolExecutor(1, thread_name_prefix="flybox-journal")
            stack.callback(self._journal_thread.shutdown, wait=True)
            self.journal = await self.journal_call(
                Journal, self.output_dir / ".flybox" / "journal.sqlite"
            )
            stack.callback(self.journal.close)
            await self._recover(self.journal)
            if self._executor is None:
                self._executor = await stack.enter_async_context(
                    LocalExecutor(self.config.executor.workers)
                )
            self.runner = UnitRunner(self, self._executor)
            if self._publishing:
                from flybox.daemon.telemetry.fanout import Publishing

                await stack.enter_async_context(
                    Publishing(self.config, self.bus, self.status_snapshot)
                )
            self.bus.publish(self.status_snapshot())
            poll = min(max(self.watch.settle_seconds, 0.25), 2.0)
            watcher = await stack.enter_async_context(
                Watcher(
                    self.patterns,
                    mode=self.watch.mode,
                    rescan_seconds=self.watch.rescan_seconds,
                    poll_seconds=poll,
                )
            )
            tasks = self.task_group = await stack.enter_async_context(asyncio.TaskGroup())
            self._loops = [
                tasks.create_task(self.intake.intake_loop(watcher), name="service-intake"),
                tasks.create_task(self.intake.tick_loop(), name="service-tick"),
                tasks.create_task(self.runner.schedule_loop(), name="service-schedule"),
                tasks.create_task(self._status_loop(), name="service-status"),
            ]
            if self.notifier.watchdog_seconds:
                self._loops.append(
                    tasks.create_task(self._watchdog_loop(), name="service-watchdog")
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self.state = "running"
        self.publish_status()
        self.notifier.ready(f"running: {self.progress.line()}")
        log.info(
            "%s: running (%s mode, %d workers, output %s; started in %.1f s)",
            self.session,
            self.watch.mode,
            self.config.executor.workers,
            self.output_dir,
            time.monotonic() - started,
        )
        return self

    async def _recover(self, journal: Journal) -> None:
        await self.journal_call(
            check_settings,
            journal,
            self.settings_hash,
            json.dumps(self.settings, sort_keys=True),
            self.output_dir,
        )
        requeued = await self.journal_call(journal.recover)
        if requeued:
            log.info("%s: %d interrupted micrographs queued again", self.session, requeued)
        retried = await self.journal_call(journal.retry_failed, RETRIED_AT_START)
        if retried:
            log.info(
                "%s: %d failed micrographs (worker crash, I/O or internal error) queued again",
                self.session,
                retried,
            )
        self.committer = Committer(self.output_dir, journal, list(self.chain.streams))
        await self.journal_call(self.committer.recover)
        for stream, record in self.committer.files.items():
            self.progress.particles[stream] = record.particles
        phases: dict[str, Phase] = {
            "done": "done",
            "failed": "failed",
            "quarantined": "quarantined",
        }
        for stem, state in (await self.journal_call(journal.stem_states)).items():
            if state in phases:
                self.set_phase(stem, phases[state])

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            self.state = "draining"
            self.publish_status()
            self.notifier.stopping(f"draining: {self.progress.line()}")
            for task in self._loops[:3]:
                task.cancel()
            assert self.runner is not None
            timeout = 0.0 if self._force.is_set() else self.config.executor.drain_seconds
            await self.runner.drain(timeout, self._force)
            if self._executor is not None:
                await self._executor.close(cancel=True)
            assert self.journal is not None
            await self.journal_call(self.journal.recover)
            await self.journal_call(self.committer.recover)
            self.state = "stopped"
            self.publish_status()
            log.info("%s: stopped (%s)", self.session, self.progress.line())
            for task in self._loops:
                task.cancel()
        finally:
            await stack.aclose()
            self.bus.close()

    # ----------------------------------------------------------------------------- loops
    async def _status_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if self._status_dirty or time.monotonic() - last >= STATUS_SECONDS:
                last = time.monotonic()
                self.publish_status()

    async def _watchdog_loop(self) -> None:
        assert self.notifier.watchdog_seconds is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_seconds / 2)


async def _serve(config: FlyboxConfig) -> int:
    loop = asyncio.get_running_loop()
    service = Service(config)
    signals = (signal.SIGTERM, signal.SIGINT)
    for number in signals:
        loop.add_signal_handler(number, service.stop)
    try:
        async with service:
            await service.wait()
    finally:
        for number in signals:
            loop.remove_signal_handler(number)
    return 0


def run(config_path: str) -> int:
    """``flybox run -c CONFIG``: the service in the foreground until SIGTERM/SIGINT.

    Returns
    -------
    int
        0 after a clean stop; 1 when the service could not go on (an output folder that
        cannot be written, a port in use), with one log line saying why.

    Raises
    ------
    ConfigError
        For an invalid configuration (before anything starts).
    """
    config = load_config(config_path)
    try:
        return asyncio.run(_serve(config))
    except OSError as exc:  # an output folder that cannot be written, a port in use…
        log.error("%s: %s", getattr(exc, "filename", None) or config_path, exc.strerror or exc)
        return 1
