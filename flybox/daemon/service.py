"""``flybox run``: the streaming service (DESIGN.md §2), one async context manager.

::

    async with Service(config) as service:   # journal, workers, telemetry, intake, work
        await service.wait()                 # until stop() (SIGTERM/SIGINT)
                                             # leaving: drain, hand back, "stopped"

The service composes the stages and owns their lifetimes; the stages never see it. Files
flow in data-flow order, each stage talking to the next through an explicit seam::

    Intake (watcher → completeness → pairing → journal unit)   flybox.daemon.intake.stage
        │ enqueue(stem): the ReadyQueue
        ▼
    UnitRunner (submit → executor → commit)                     flybox.daemon.work.queue
        │ on_quarantine(path, kind, reason, code), release_picks(stem): back to intake
        ▼
    EventBus.emit(event) → Telemetry (MQTT, metrics, HTTP)      flybox.daemon.telemetry

What both stages share is explicit and small (:mod:`flybox.daemon.state`): the stems and
status counts (:class:`~flybox.daemon.state.SessionState`) and the journal with its thread
(:class:`~flybox.daemon.state.JournalThread`). Everything runs on one event loop; blocking
work goes to threads (scans, probes, hashing, parsing: the default thread pool; journal and
commits: the journal thread, which serialises them) and processing to the executor's worker
processes.

A restart continues where the journal says: units left ``running`` are queued again, the
cumulative STAR files are cut back to their committed length, temporary files are removed,
and inputs are rediscovered by the first scan; a unit whose key is ``done`` is not processed
again. An output folder is never used with other processing settings (the service refuses to
start, see :func:`check_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from types import TracebackType

from flybox.config import FlyboxConfig, load_config
from flybox.config.warnings import config_warnings
from flybox.daemon.intake.stage import Intake
from flybox.daemon.intake.watch import WatchPattern, compile_pattern
from flybox.daemon.lock import OutputLock
from flybox.daemon.picking import LivePicking
from flybox.daemon.state import Heartbeats, JournalThread, SessionState
from flybox.daemon.systemd import Notifier
from flybox.daemon.telemetry.events import (
    EventBus,
    ExecutorStatus,
    Health,
    ServiceState,
    StatusEvent,
    WarningEvent,
    warning_code,
)
from flybox.daemon.telemetry.progress import Phase, Progress
from flybox.daemon.work.commit import Committer
from flybox.daemon.work.executor import Executor, LocalExecutor
from flybox.daemon.work.journal import Journal
from flybox.daemon.work.queue import ReadyQueue, UnitRunner
from flybox.daemon.work.units import settings_description, settings_hash
from flybox.errors import ConfigError
from flybox.pipeline.inputs import DEFAULT_COORD_SUFFIXES
from flybox.pipeline.job import JobWarnings
from flybox.pipeline.matching import PatternMatches

__all__ = ["Service", "check_settings", "run"]

log = logging.getLogger(__name__)

#: A status event at least this often (and after commits, at most once per second).
STATUS_SECONDS = 5.0
#: Failure codes whose units a restart queues again (the cause may be gone: a full disk,
#: a crash, a fixed bug); ``processing`` failures are deterministic and stay failed.
RETRIED_AT_START = ("worker_crash", "job_timeout", "io_error", "internal")


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


def check_output_outside_watch(output: Path, patterns: list[WatchPattern]) -> None:
    """Refuse an output folder the watched tree reaches into: its own outputs (``.mrcs``
    stacks, STAR files) would be taken as inputs, and every commit would start new work.

    Raises
    ------
    ConfigError
        When a watch pattern can match files inside ``output``.
    """
    resolved = os.path.realpath(output)
    for pattern in patterns:
        root = os.path.realpath(pattern.root)
        if resolved != root and not resolved.startswith(root.rstrip("/") + "/"):
            continue
        depth = 0 if resolved == root else resolved[len(root) :].strip("/").count("/") + 1
        if pattern.max_depth is None or depth < pattern.max_depth:
            raise ConfigError(
                "session.output",
                f"{output} is inside the watched tree of {pattern.pattern!r}: the service "
                "would take its own outputs as inputs; use an output folder outside the "
                "watched folders",
            )


def _coordinate_patterns(config: FlyboxConfig) -> list[str]:
    assert config.watch is not None
    if config.watch.coordinates:
        return list(config.watch.coordinates)
    if config.picking is not None:  # the service picks: no coordinate files are looked for
        return []
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
    telemetry
        Whether to start the MQTT/metrics/HTTP telemetry.

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
        telemetry: bool = True,
    ) -> None:
        if config.session is None:
            raise ConfigError("session", "flybox run needs a [session] table (name, output)")
        if config.watch is None:
            raise ConfigError("watch", "flybox run needs a [watch] table (micrographs, …)")
        if config.executor.address is not None and executor is None:
            try:
                import distributed  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "executor.address",
                    "a Dask executor needs the [dask] extra: pip install 'flybox[dask]'",
                ) from None
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
        self.shared = SessionState(self.progress)
        patterns = [compile_pattern("micrograph", p) for p in self.watch.micrographs]
        patterns += [compile_pattern("coordinates", p) for p in _coordinate_patterns(config)]
        if self.watch.ctf is not None:
            patterns.append(compile_pattern("ctf", self.watch.ctf))
        self.patterns = patterns
        self.matched = PatternMatches(patterns)
        check_output_outside_watch(self.output_dir, patterns)
        self.heartbeats = Heartbeats(config.session.stall_seconds)
        self._lock = OutputLock(self.output_dir)
        self.journal = JournalThread(self.output_dir / ".flybox" / "journal.sqlite")
        self._ready = ReadyQueue()
        self.picking: LivePicking | None = None
        if config.picking is not None:
            self.picking = LivePicking(
                config.picking,
                output_dir=self.output_dir,
                session=self.session,
                stream=next(iter(self.chain.streams)),
                journal=self.journal,
                events=self.bus,
            )
        self.intake = Intake(
            self.watch,
            patterns,
            session=self.session,
            output_dir=self.output_dir,
            settings_hash=self.settings_hash,
            state=self.shared,
            journal=self.journal,
            events=self.bus,
            enqueue=self._ready.put,
            on_seen=self.matched.see,
            autopick=self.picking,
            heartbeats=self.heartbeats,
        )
        if self.picking is not None:
            self.picking.intake = self.intake
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._executor = executor
        self._telemetry = telemetry
        self._stack: contextlib.AsyncExitStack | None = None
        self._committer: Committer | None = None
        self._runner: UnitRunner | None = None
        self._loops: dict[str, asyncio.Task[None]] = {}

    # ----------------------------------------------------------------------------- helpers
    def _new_executor(self) -> contextlib.AbstractAsyncContextManager[Executor]:
        """``[executor] address`` absent: the local pool; else a Dask cluster."""
        executor = self.config.executor
        if executor.address is None:
            return LocalExecutor(executor.workers)
        from flybox.daemon.work.dask_executor import DaskExecutor

        return DaskExecutor(executor.address, executor.workers)

    def _executor_state(self) -> ExecutorStatus:
        state = getattr(self._executor, "state", None)
        return state if isinstance(state, ExecutorStatus) else ExecutorStatus()

    def health(self) -> Health:
        """Stalled loops (heartbeats) and a full disk, for the status and ``/healthz``."""
        stalled = self.heartbeats.stalled()
        disk = self.shared.disk
        problems = [f"{name} loop stalled for {age:.0f} s" for name, age in stalled.items()]
        if disk.full:
            problems.append(f"disk full, commits waiting ({disk.problem})")
        return Health(
            ok=not problems,
            stalled=sorted(stalled),
            disk_full=disk.full,
            problem="; ".join(problems),
        )

    def status_snapshot(self) -> StatusEvent:
        """The current :class:`~flybox.daemon.telemetry.events.StatusEvent`."""
        status = self.progress.snapshot(self.state)
        return status.model_copy(
            update={"unmatched_patterns": self.matched.unmatched, "health": self.health()}
        )

    def emit_status(self) -> None:
        """Emit the status now (and show it to systemd)."""
        self.shared.status_dirty = False
        self.bus.emit(self.status_snapshot())
        self.notifier.status(f"{self.state}: {self.progress.line()}")

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
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(self._lock)  # before anything in the folder is touched
            await stack.enter_async_context(self.journal)
            committer = self._committer = Committer(
                self.output_dir, self.journal.journal, list(self.chain.streams)
            )
            await self._recover(committer)
            if self._executor is None:
                self._executor = await stack.enter_async_context(self._new_executor())
            self.progress.executor = self._executor_state
            if self.picking is not None:
                await stack.enter_async_context(self.picking)
            if self._telemetry:
                from flybox.daemon.telemetry.fanout import Telemetry

                telemetry = Telemetry(self.config, self.bus, self.status_snapshot)
                telemetry.dashboard.particle_diameter = self.chain.extraction_box / 1.5
                if self.picking is not None:
                    telemetry.http.add_routes(self.picking.routes)
                    telemetry.dashboard.picking = True
                    telemetry.dashboard.particle_diameter = self.picking.particle_size
                await stack.enter_async_context(telemetry)
            self.bus.emit(self.status_snapshot())
            for message in await asyncio.to_thread(config_warnings, self.config):
                self.bus.emit(
                    WarningEvent(session=self.session, message=message, code=warning_code(message))
                )
            if self.picking is not None:
                self.picking.announce()
            await stack.enter_async_context(self.intake)
            self._runner = await stack.enter_async_context(
                UnitRunner(
                    self._executor,
                    committer,
                    self._ready,
                    config=self.config,
                    session=self.session,
                    output_dir=self.output_dir,
                    state=self.shared,
                    journal=self.journal,
                    events=self.bus,
                    on_quarantine=self.intake.quarantine,
                    release_picks=self.intake.release_picks,
                    project_dir=self.project_dir,
                    job_warnings=self.job_warnings,
                    picker=self.picking.autopick_for if self.picking is not None else None,
                    heartbeats=self.heartbeats,
                )
            )
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._loops = {
                "service-status": tasks.create_task(self._status_loop(), name="service-status"),
                "service-journal-beat": tasks.create_task(
                    self._journal_beat_loop(), name="service-journal-beat"
                ),
            }
            if self.notifier.watchdog_seconds:
                self._loops["service-watchdog"] = tasks.create_task(
                    self._watchdog_loop(), name="service-watchdog"
                )
            self._stack = stack.pop_all()
        self.state = "running"
        self.emit_status()
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

    async def _recover(self, committer: Committer) -> None:
        journal = self.journal
        await journal.call(
            check_settings,
            journal.journal,
            self.settings_hash,
            json.dumps(self.settings, sort_keys=True),
            self.output_dir,
        )
        requeued = await journal.call(journal.journal.recover)
        if requeued:
            log.info("%s: %d interrupted micrographs queued again", self.session, requeued)
        retried = await journal.call(journal.journal.retry_failed, RETRIED_AT_START)
        if retried:
            log.info(
                "%s: %d failed micrographs (worker crash, I/O or internal error) queued again",
                self.session,
                retried,
            )
        await journal.call(committer.recover)
        for stream, record in committer.files.items():
            self.progress.particles[stream] = record.particles
        phases: dict[str, Phase] = {
            "done": "done",
            "failed": "failed",
            "quarantined": "quarantined",
        }
        for stem, state in (await journal.call(journal.journal.stem_states)).items():
            if state in phases:
                self.shared.set_phase(stem, phases[state])

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
            self.emit_status()
            self.notifier.stopping(f"draining: {self.progress.line()}")
            await self.intake.close()  # no new work: the watcher and intake loops end
            assert self._runner is not None
            assert self._committer is not None
            timeout = 0.0 if self._force.is_set() else self.config.executor.drain_seconds
            await self._runner.drain(timeout, self._force)
            if self._executor is not None:
                await self._executor.close(cancel=True)
            await self.journal.call(self.journal.journal.recover)
            await self.journal.call(self._committer.recover)
            self.state = "stopped"
            self.emit_status()
            log.info("%s: stopped (%s)", self.session, self.progress.line())
        finally:
            for task in self._loops.values():
                task.cancel()
            await stack.aclose()
            self.bus.close()

    # ----------------------------------------------------------------------------- loops
    async def _status_loop(self) -> None:
        last = time.monotonic()
        stalled: set[str] = set()
        while True:
            await asyncio.sleep(1.0)
            now_stalled = self.heartbeats.stalled()
            for name in sorted(now_stalled.keys() - stalled):
                log.error(
                    "%s: the %s loop has made no progress for %.0f s (/healthz answers 503)",
                    self.session,
                    name,
                    now_stalled[name],
                )
            for name in sorted(stalled - now_stalled.keys()):
                log.info("%s: the %s loop makes progress again", self.session, name)
            if now_stalled.keys() != stalled:
                stalled = set(now_stalled)
                self.shared.mark_dirty()
            if self.shared.status_dirty or time.monotonic() - last >= STATUS_SECONDS:
                last = time.monotonic()
                self.emit_status()

    async def _journal_beat_loop(self) -> None:
        """The journal thread runs every commit: a no-op through it each second shows that
        commits are not stuck (a hung file system shows as a stalled ``journal`` loop)."""
        self.heartbeats.register("journal")  # [session] stall_seconds
        try:
            while True:
                await self.journal.call(lambda: None)
                self.heartbeats.beat("journal")
                await asyncio.sleep(1.0)
        finally:
            self.heartbeats.unregister("journal")

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
    _say_relative_paths(config, config_path)
    try:
        return asyncio.run(_serve(config))
    except OSError as exc:  # an output folder that cannot be written, a port in use…
        # Name what failed (the file, else the operation), never the configuration file:
        # the configuration was valid, the machine refused.
        where = getattr(exc, "filename", None) or "flybox run"
        log.error("%s: %s", where, exc.strerror or exc)
        return 1


def _say_relative_paths(config: FlyboxConfig, config_path: str) -> None:
    """Relative paths are taken from the working directory (not the configuration file's
    folder); say so once, with what they resolve to, so that a surprise is visible."""
    if config.session is None or config.watch is None:
        return  # Service refuses it with the key path
    paths = [str(config.session.output), *config.watch.micrographs, *config.watch.coordinates]
    if config.watch.ctf is not None:
        paths.append(config.watch.ctf)
    relative = [p for p in paths if not os.path.isabs(os.path.expanduser(p))]
    if relative:
        log.info(
            "%s: relative paths are taken from the working directory %s (%s)",
            config_path,
            os.getcwd(),
            ", ".join(f"{p} → {os.path.abspath(p)}" for p in relative),
        )
