"""``flybox demo``: a simulated microscope and the service, on temporary folders.

The simulator (:class:`~flybox.sim.microscope.Acquisition`, in a thread) writes micrographs,
picks and a CTF table over time, exactly as ``flybox simulate`` does; the service
(:class:`~flybox.daemon.service.Service`, embedded default configuration, no broker needed)
processes them as ``flybox run`` would. A progress line follows the session; a summary ends
it. Defaults are small (1024² micrographs, 60 particles, 128-px particles + 64-px small set) so
that the demo takes about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flybox.config import FlyboxConfig, parse_config
from flybox.daemon.service import Service
from flybox.daemon.telemetry.events import MicrographEvent
from flybox.sim.microscope import Acquisition, AcquisitionSettings

__all__ = ["DemoSummary", "demo_config", "run_demo"]

log = logging.getLogger(__name__)

#: The demo's chain: 128-px boxes, a 64-px small set, RELION ramp normalisation, inversion.
DEMO_CHAIN: list[dict[str, Any]] = [
    {"step": "extract", "box": 128, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 128, "particles_small": 64}},
    {"step": "normalize", "method": "ramp"},
    {"step": "invert"},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_config(inputs: Path, output: Path, *, workers: int = 2) -> FlyboxConfig:
    """The demo's configuration: watch the simulator's folders, write to ``output``."""
    return parse_config(
        {
            "session": {"name": "demo", "output": str(output)},
            "watch": {
                "micrographs": [str(inputs / "Micrographs" / "*.mrc")],
                "coordinates": [str(inputs / "AutoPick" / "*_autopick.star")],
                "coordinate_suffix": "_autopick.star",
                "ctf": str(inputs / "micrographs_ctf.star"),
                "settle_seconds": 0.3,
                "rescan_seconds": 10.0,
            },
            "chain": DEMO_CHAIN,
            "executor": {"workers": workers},
            "http": {"listen": f"127.0.0.1:{_free_port()}"},
        }
    )


@dataclass
class DemoSummary:
    """What a demo did."""

    micrographs: int
    failed: int
    particles: dict[str, int]
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    output: Path = Path()

    def line(self) -> str:
        """The final summary line."""
        sets = ", ".join(f"{stream} {count}" for stream, count in self.particles.items())
        mean = sum(self.latencies) / len(self.latencies) if self.latencies else 0.0
        text = (
            f"flybox demo: {self.micrographs} micrographs in {self.seconds:.1f} s; {sets}; "
            f"mean latency {mean:.2f} s (file complete → committed)"
        )
        if self.failed:
            text += f"; {self.failed} failed or quarantined"
        return text


async def _follow(service: Service, latencies: list[float]) -> None:
    with service.bus.subscribe() as events:
        async for event in events:
            if isinstance(event, MicrographEvent):
                latencies.append(event.latency_seconds)


async def _session(
    config: FlyboxConfig,
    acquisition: Acquisition,
    out: TextIO,
    stall_seconds: float,
) -> DemoSummary:
    total = acquisition.settings.micrographs
    latencies: list[float] = []
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    async with Service(config) as service:
        stop: Callable[[], None] = service.stop
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stop)
        try:
            async with asyncio.TaskGroup() as tasks:
                follower = tasks.create_task(_follow(service, latencies))
                writer = tasks.create_task(asyncio.to_thread(acquisition.run))
                last_change, last_done, shown = time.monotonic(), -1, 0.0
                while True:
                    counts = service.status_snapshot().counts
                    finished = counts.done + counts.failed + counts.quarantined
                    now = time.monotonic()
                    if finished != last_done:
                        last_done, last_change = finished, now
                    if out.isatty() or now - shown >= 5.0:
                        shown = now
                        _progress(out, service, finished, total)
                    if writer.done() and finished >= len(acquisition.written):
                        break
                    if service.stop_requested or now - last_change > stall_seconds:
                        log.warning("demo: stopping early")
                        break
                    await asyncio.sleep(0.5)
                acquisition.stop()
                await writer
                follower.cancel()
        finally:
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)
        if out.isatty():
            out.write("\n")
        counts = service.status_snapshot().counts
        particles = dict(service.progress.particles)
    return DemoSummary(
        micrographs=counts.done,
        failed=counts.failed + counts.quarantined,
        particles=particles,
        latencies=latencies,
        seconds=time.monotonic() - started,
    )


def _progress(out: TextIO, service: Service, finished: int, total: int) -> None:
    status = service.status_snapshot()
    sets = " · ".join(f"{s} {n}" for s, n in status.particles.items())
    line = (
        f"[{finished}/{total}] {sets} · queued {status.counts.queued} · "
        f"running {status.counts.running}"
    )
    if out.isatty():
        out.write("\r\033[K" + line)
    else:
        out.write(line + "\n")
    out.flush()


def run_demo(
    micrographs: int = 20,
    rate_per_minute: float = 30.0,
    keep: str | None = None,
    *,
    size: int = 1024,
    particles: int = 60,
    workers: int = 2,
    out: TextIO | None = None,
) -> DemoSummary:
    """Run the demo and return its summary (the folders are removed unless ``keep``)."""
    stream = out or sys.stderr
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="flybox-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    inputs, output = root / "microscope", root / "output"
    config = demo_config(inputs, output, workers=workers)
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=micrographs,
            rate_per_minute=rate_per_minute,
            size=size,
            particles=particles,
        ),
    )
    stream.write(
        f"flybox demo: {micrographs} micrographs of {size}² px at {rate_per_minute:g}/min "
        f"into {root}\n"
    )
    quiet = logging.getLogger("flybox.daemon")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        stall = max(60.0, 3 * 60.0 / max(rate_per_minute, 1e-3))
        summary = asyncio.run(_session(config, acquisition, stream, stall))
    finally:
        quiet.setLevel(level)
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(root)
    summary.output = output
    return summary
