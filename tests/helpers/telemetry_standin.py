"""A stand-in service process for the publishing tests: :class:`Telemetry` fed by a
synthetic event source (``python -m tests.helpers.telemetry_standin CONFIG ...``).

It publishes a ``running`` status, then ``--micrographs`` micrograph events every
``--interval`` seconds, then (unless ``--linger``) a ``stopped`` status, and leaves. SIGTERM
stops it the same way; SIGKILL is what the last-will test sends. It writes ``ready`` to
stdout once publishing has started, and ``done`` when every event has been handed over.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from flybox import __version__
from flybox.config import load_config
from flybox.daemon.telemetry.events import Counts, EventBus, MicrographEvent, Quality, StatusEvent
from flybox.daemon.telemetry.fanout import Telemetry


async def _serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    session = config.session.name if config.session is not None else "flybox"
    bus = EventBus()
    counts = {"done": 0}
    state: list[str] = ["running"]

    def status() -> StatusEvent:
        done = counts["done"]
        return StatusEvent(
            session=session,
            state=state[0],  # type: ignore[arg-type]
            counts=Counts(seen=args.micrographs, done=done, queued=args.micrographs - done),
            particles={"particles": 100 * done},
            version=__version__,
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Telemetry(config, bus, status):
        bus.emit(status())
        print("ready", flush=True)
        for index in range(args.micrographs):
            if stop.is_set():
                break
            bus.emit(
                MicrographEvent(
                    session=session,
                    name=f"mic{index:04d}",
                    path=f"/data/mic{index:04d}.mrc",
                    picks=110,
                    particles={"particles": 100},
                    excluded_border=10,
                    quality=Quality(gini=0.3, defocus_a=15000.0),
                    latency_seconds=2.5,
                    stages={"wait": 1.0, "queue": 0.5, "process": 0.9, "commit": 0.1},
                )
            )
            counts["done"] += 1
            await asyncio.sleep(args.interval)
        print("done", flush=True)
        if args.linger:
            await stop.wait()
        state[0] = "stopped"
        bus.emit(status())


def main() -> None:
    """Run the stand-in service until its events are out (or SIGTERM)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--micrographs", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
