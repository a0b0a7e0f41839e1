"""Benchmark: the streaming service under a simulated acquisition, and its commit cost.

(a) Stream: a simulated microscope writes 4096² micrographs with 300 picks each (and a growing
    CTF table) at 1 micrograph/s for 3 minutes, in place and in pieces as acquisition software
    does; the service (in this process, 2 worker processes) extracts the 256-px set and the
    64-px small set (ramp normalisation, inversion) as they arrive. Reported: sustained
    micrographs/s, the backlog (written, not yet committed) over time, p50/p95 latency from
    *file complete* (the service accepts the file: full size per its header, unchanged for
    ``settle_seconds``) to *committed*, the same from the last byte written (includes the
    settle time and detection), and the RSS of the service process and of its workers over
    time (growth measured from the end of the first minute).
    Targets: keeps up (no growing backlog), p50 ≤ 0.5 s, p95 ≤ 1.5 s, RSS growth < 50 MB.
(b) Commit cost: the service-side commit of one micrograph (publish its files, append its rows
    to both cumulative STAR files, journal transaction) with 1 000 000 particles already
    committed vs an empty session. Target: within 2×.

Micrographs are simulated once (a pool of ``--pool``, 2 s each) before the clock starts, then
copied under new names at the acquisition rate.

Usage::

    python benchmarks/stream.py [--minutes 3] [--rate 60] [--size 4096] [--particles 300]
        [--workers 2] [--settle 0.5] [--pool 6] [--keep DIR] [--skip-stream] [--skip-commit]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from flybox.config import parse_config
from flybox.daemon.service import Service
from flybox.daemon.telemetry.events import MicrographEvent
from flybox.daemon.work.commit import Committer
from flybox.daemon.work.journal import Journal, SegmentRecord
from flybox.io.mrc import write_micrograph
from flybox.pipeline.chain import ChainSpec
from flybox.pipeline.job import JobResult, MicrographJob, run_job
from flybox.sim.microscope import Acquisition, AcquisitionSettings, synthetic_micrograph
from flybox.types import OpticsGroup

CHAIN: list[dict[str, Any]] = [
    {"step": "extract", "box": 256, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 256, "particles_small": 64}},
    {"step": "normalize", "method": "ramp", "bg_radius": 96},
    {"step": "invert"},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                kids = [int(k) for k in handle.read().split()]
        except OSError:
            kids = []
        found.extend(kids)
        stack.extend(kids)
    return found


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _stream(args: argparse.Namespace, root: Path) -> None:
    inputs, output = root / "microscope", root / "output"
    total = round(args.minutes * args.rate)
    config = parse_config(
        {
            "session": {"name": "bench", "output": str(output)},
            "watch": {
                "micrographs": [str(inputs / "Micrographs" / "*.mrc")],
                "coordinates": [str(inputs / "AutoPick" / "*_autopick.star")],
                "coordinate_suffix": "_autopick.star",
                "ctf": str(inputs / "micrographs_ctf.star"),
                "settle_seconds": args.settle,
            },
            "chain": CHAIN,
            "executor": {"workers": args.workers},
            "http": {"listen": f"127.0.0.1:{_free_port()}"},
        }
    )
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=total,
            rate_per_minute=args.rate,
            size=args.size,
            particles=args.particles,
            pool=args.pool,
            picks_first_every=0,
        ),
    )
    events: list[tuple[float, MicrographEvent]] = []
    samples: list[tuple[float, float, float, int]] = []
    print(
        f"stream: {total} micrographs of {args.size}² × {args.particles} particles at "
        f"{args.rate:g}/min, {args.workers} workers, settle {args.settle:g} s "
        f"(simulating a pool of {args.pool} first)",
        flush=True,
    )
    async with Service(config) as service:
        with service.bus.subscribe() as subscription:

            async def follow() -> None:
                async for event in subscription:
                    if isinstance(event, MicrographEvent):
                        events.append((time.time(), event))

            follower = asyncio.create_task(follow())
            writer = asyncio.create_task(asyncio.to_thread(acquisition.run))
            while not acquisition.written and not writer.done():
                await asyncio.sleep(0.2)
            started = time.monotonic()
            pid = os.getpid()
            deadline = None
            while True:
                now = time.monotonic()
                workers_rss = sum(_rss_mb(p) for p in _children(pid))
                backlog = len(acquisition.written) - len(events)
                samples.append((now - started, _rss_mb(pid), workers_rss, backlog))
                if writer.done():
                    deadline = deadline or now + 120
                    if len(events) >= len(acquisition.written) or now > deadline:
                        break
                await asyncio.sleep(5.0)
            await writer
            follower.cancel()
    _report_stream(acquisition, events, samples)


def _report_stream(
    acquisition: Acquisition,
    events: list[tuple[float, MicrographEvent]],
    samples: list[tuple[float, float, float, int]],
) -> None:
    written = {item.path.stem: item.written_at for item in acquisition.written}
    latencies = [e.latency_seconds for _, e in events]
    from_write = [t - written[e.name] for t, e in events if e.name in written]
    process = [e.stages.get("process", 0.0) for _, e in events]
    first_write = min(written.values())
    span = max(t for t, _ in events) - first_write if events else float("nan")
    rate = len(events) / span if events else 0.0
    print(
        f"stream: committed {len(events)}/{len(written)} micrographs in {span:.1f} s: "
        f"{rate:.3f} micrographs/s sustained (acquisition "
        f"{len(written) / (max(written.values()) - first_write + 1e-9):.3f}/s)"
    )
    print(
        f"stream: latency file complete → committed: p50 {_percentile(latencies, 50):.3f} s, "
        f"p95 {_percentile(latencies, 95):.3f} s, max {max(latencies, default=float('nan')):.3f} s "
        "(targets: p50 ≤ 0.5 s, p95 ≤ 1.5 s)"
    )
    print(
        f"stream: latency last byte written → committed: p50 {_percentile(from_write, 50):.3f} s, "
        f"p95 {_percentile(from_write, 95):.3f} s; worker time per micrograph: "
        f"median {statistics.median(process) if process else float('nan'):.3f} s"
    )
    backlogs = [b for _, _, _, b in samples]
    half = len(backlogs) // 2
    print(
        f"stream: backlog (written, not committed) every 5 s: max {max(backlogs, default=0)}, "
        f"mean first half {np.mean(backlogs[:half]) if half else float('nan'):.2f}, "
        f"mean second half {np.mean(backlogs[half:]) if backlogs else float('nan'):.2f}"
    )
    settled = [s for s in samples if s[0] >= 60.0] or samples
    service = [s[1] for s in settled]
    workers = [s[2] for s in settled]
    print(
        f"stream: RSS service {service[0]:.0f} → {service[-1]:.0f} MB (max {max(service):.0f}), "
        f"workers {workers[0]:.0f} → {workers[-1]:.0f} MB (max {max(workers):.0f}); growth "
        f"after the first minute: service {service[-1] - service[0]:+.1f} MB, workers "
        f"{workers[-1] - workers[0]:+.1f} MB (target < 50 MB)"
    )
    timeline = ", ".join(
        f"{t:.0f}s:{s:.0f}/{w:.0f}MB/{b}" for t, s, w, b in samples[:: max(1, len(samples) // 12)]
    )
    print(f"stream: timeline (t: service/workers RSS/backlog): {timeline}")


def _results(root: Path, output: Path, count: int, prefix: str) -> list[tuple[str, JobResult]]:
    """Worker results (outputs under temporary names) of ``count`` micrographs, 300 picks."""
    mic = synthetic_micrograph(1024, 300, rng=1)
    path = root / "source.mrc"
    write_micrograph(path, mic.image, 1.0)
    out = []
    for index in range(count):
        stem = f"{prefix}{index:07d}"
        job = MicrographJob(
            micrograph=str(path),
            name=f"Micrographs/{stem}.mrc",
            output_dir=str(output),
            chain=ChainSpec.of(CHAIN),
            picks=mic.picks,
            stem=stem,
        )
        out.append((stem, run_job(job)))
    return out


def _commit_times(root: Path, committed: int, count: int) -> list[float]:
    output = root / f"commit-{committed}"
    journal = Journal(output / ".flybox" / "journal.sqlite")
    committer = Committer(output, journal, ["particles", "particles_small"])
    committer.recover()
    group = OpticsGroup(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    seed_stem, seed = _results(root, output, 1, "seed")[0]
    committer.commit(journal.add_unit(seed_stem, seed_stem, seed_stem, {}), seed, group)
    if committed > 300:
        _prefill(committer, journal, committed // 300 - 1)
    results = _results(root, output, count, "new")
    times = []
    for stem, result in results:
        unit = journal.add_unit(stem, stem, stem, {})
        started = time.perf_counter()
        committer.commit(unit, result, group)
        times.append(time.perf_counter() - started)
    particles = journal.star_files()["particles"].particles
    journal.close()
    print(
        f"commit: session with {particles - 300 * count} particles: median "
        f"{statistics.median(times) * 1e3:.2f} ms, p95 {_percentile(times, 95) * 1e3:.2f} ms "
        f"per micrograph ({count} commits, 300 particles × 2 streams each)",
        flush=True,
    )
    shutil.rmtree(output, ignore_errors=True)
    return times


def _prefill(committer: Committer, journal: Journal, micrographs: int) -> None:
    """Grow both cumulative files by ``micrographs`` copies of the first micrograph's rows,
    with their journal records, as if that many had been committed."""
    for stream, record in committer.files.items():
        path = committer.output_dir / record.path
        body = path.read_bytes()[record.header_bytes : record.length]
        segments = []
        with open(path, "ab") as handle:
            for index in range(micrographs):
                handle.write(body)
                offset = len(body) * (index + 1)
                segments.append(SegmentRecord(stream, f"old{index:07d}", 0, offset, len(body), 300))
            os.fsync(handle.fileno())
        grown = record.length + len(body) * micrographs
        with journal.transaction() as db:
            db.executemany(
                "INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?)",
                [(s.stream, s.stem, s.unit, s.offset, s.length, s.particles) for s in segments],
            )
            db.execute(
                "UPDATE star_files SET length = ?, particles = ?, micrographs = ? WHERE stream = ?",
                (grown, record.particles + 300 * micrographs, 1 + micrographs, stream),
            )
    committer.recover()


def _commit(args: argparse.Namespace, root: Path) -> None:
    empty = _commit_times(root, 0, args.commits)
    full = _commit_times(root, 1_000_000, args.commits)
    ratio = statistics.median(full) / statistics.median(empty)
    print(f"commit: cost with 1 000 000 particles committed / fresh session = {ratio:.2f}× (≤ 2×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=60.0, help="micrographs per minute")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.5, help="[watch] settle_seconds")
    parser.add_argument("--pool", type=int, default=6, help="distinct simulated micrographs")
    parser.add_argument("--commits", type=int, default=30, help="commits timed per session size")
    parser.add_argument("--keep", type=Path, help="keep the folders here")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-commit", action="store_true")
    args = parser.parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = args.keep or Path(tempfile.mkdtemp(prefix="flybox-stream-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_stream:
            asyncio.run(_stream(args, root))
        if not args.skip_commit:
            _commit(args, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "benchmark"
    main()
