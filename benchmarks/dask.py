"""Benchmark: the local worker pool vs a 2-worker Dask cluster on this machine, side by side.

(a) Batch: ``flybox extract`` of N synthetic micrographs (default 16 × 2048², 200 particles,
    the 256-px set and the 64-px small set) with ``--workers 2`` (local pool) and with
    ``--dask tcp://127.0.0.1:PORT`` (a ``dask scheduler`` and two ``dask worker --nthreads 1``
    processes, all on loopback, started before the clock). Interleaved rounds; the Dask
    client's start (connect, version check; overlapping the planning) reported on its own.
(b) Stream: the service (``flybox run``, a subprocess, the test suite's two-stream chain) takes
    a burst of N micrographs written by the simulator, with the local pool and with
    ``[executor] address`` on the same Dask cluster, interleaved rounds; wall time from the
    first file to the last commit, and the per-micrograph latency (file complete → committed,
    from the service's log) p50/p95.

Reported per mode, medians over ``--repeat`` rounds: throughput (micrographs/s), the ratio
Dask / local (target ≥ 0.9), the per-micrograph scheduling overhead ((Dask wall − local wall)
/ N), and for the stream the latency p50/p95. Outputs of the two batch runs are compared byte
for byte. The machine may be shared: compare ratios from one run, not across runs.

Usage::

    python benchmarks/dask.py [--micrographs 16] [--size 2048] [--particles 200]
        [--repeat 5] [--skip-stream]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flybox.sim.microscope import Acquisition, AcquisitionSettings, write_dataset  # noqa: E402
from tests.helpers.dask_cluster import DaskProcesses  # noqa: E402
from tests.helpers.service import ServiceProcess, committed_rows, write_config  # noqa: E402

CHAIN = ["--box", "256", "--fcrop-small", "64"]


def batch(star: Path, folder: Path, output: Path, extra: list[str]) -> tuple[float, float]:
    """Wall time of one ``flybox extract`` command, and (Dask) how long its client took to
    start (connect and check the workers; overlapping the planning), from its log."""
    command = [
        sys.executable, "-m", "flybox", "extract", "--micrographs", str(star),
        "--coords", str(folder / "AutoPick"), "--coord-suffix", "_autopick.star", *CHAIN,
        "--no-progress", "--workers", "2", "-o", str(output), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    client = re.search(r"client started in ([0-9.]+) s", done.stderr)
    return wall, float(client.group(1)) if client else 0.0


def stream(root: Path, args: argparse.Namespace, address: str | None) -> tuple[float, list[float]]:
    inputs, output = root / "inputs", root / "output"
    root.mkdir(parents=True)
    config = write_config(root, inputs, output)
    if address is not None:
        text = config.read_text().replace("workers = 2", f'workers = 2\naddress = "{address}"')
        config.write_text(text)
    service = ServiceProcess(config, root / "service.log")
    service.start()
    service.wait_running()
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(
            micrographs=args.micrographs,
            rate_per_minute=6000,
            size=args.size,
            particles=args.particles,
            chunks=1,
            seed=3,
        ),
    )
    started = time.perf_counter()
    writer = threading.Thread(target=acquisition.run, daemon=True)
    writer.start()
    total = args.micrographs * args.particles
    while committed_rows(output) < total:
        time.sleep(0.05)
    wall = time.perf_counter() - started
    service.terminate()
    latencies = [float(x) for x in re.findall(r"latency ([0-9.]+) s", service.output())]
    return wall, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micrographs", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--particles", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-stream", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flybox-dask-bench-") as tmp:
        root = Path(tmp)
        cluster = DaskProcesses(root)
        try:
            cluster.start_scheduler()
            for name in ("w1", "w2"):
                cluster.start_worker(name)
            for name in ("w1", "w2"):
                cluster.wait_worker(name)
            folder = root / "data"
            star = write_dataset(
                folder, args.micrographs, shape=args.size, n_particles=args.particles, seed=1
            )
            batch(star, folder, root / "warm-local", [])  # untimed: page cache, FFTW wisdom
            batch(star, folder, root / "warm-dask", ["--dask", cluster.address])
            shutil.rmtree(root / "warm-local")
            shutil.rmtree(root / "warm-dask")
            local, dask, client = [], [], []
            for round_ in range(args.repeat):  # interleaved: the machine's load hits both
                local.append(batch(star, folder, root / f"local{round_}", [])[0])
                wall, started = batch(
                    star, folder, root / f"dask{round_}", ["--dask", cluster.address]
                )
                dask.append(wall)
                client.append(started)
                if round_ > 0:  # a batch's stacks take ~1 GB: keep the first round's only
                    shutil.rmtree(root / f"local{round_}")
                    shutil.rmtree(root / f"dask{round_}")
            for stack in sorted((root / "local0").rglob("*.mrcs")):
                twin = root / "dask0" / stack.relative_to(root / "local0")
                assert stack.read_bytes() == twin.read_bytes(), stack
            n = args.micrographs
            t_local, t_dask = statistics.median(local), statistics.median(dask)
            print(
                f"batch  {n} × {args.size}², {args.particles} particles, 2 streams; "
                f"median of {args.repeat}"
            )
            print(f"  local pool (2 workers): {t_local:6.2f} s  {n / t_local:6.2f} mic/s")
            print(f"  dask (2 workers)      : {t_dask:6.2f} s  {n / t_dask:6.2f} mic/s")
            print(
                f"  throughput ratio dask/local: {t_local / t_dask:.2f} (target ≥ 0.9); "
                f"scheduling overhead {(t_dask - t_local) / n * 1000:+.0f} ms/micrograph; "
                "stacks byte-identical"
            )
            print(
                f"  dask client start (connect + version check, overlapping the planning): "
                f"median {statistics.median(client) * 1000:.0f} ms; runs local "
                + " ".join(f"{t:.2f}" for t in local)
                + " s, dask "
                + " ".join(f"{t:.2f}" for t in dask)
                + " s"
            )
            if not args.skip_stream:
                walls: dict[str, list[float]] = {"local": [], "dask": []}
                latencies: dict[str, list[float]] = {"local": [], "dask": []}
                for round_ in range(args.repeat):  # interleaved, as the batch
                    for mode, address in (("local", None), ("dask", cluster.address)):
                        wall, lat = stream(root / f"stream-{mode}{round_}", args, address)
                        shutil.rmtree(root / f"stream-{mode}{round_}")
                        walls[mode].append(wall)
                        latencies[mode] += lat
                w_local, w_dask = (
                    statistics.median(walls["local"]),
                    statistics.median(walls["dask"]),
                )
                print(
                    f"stream  burst of {n} micrographs through `flybox run`; median of "
                    f"{args.repeat} (latencies pooled)"
                )
                for label, wall, lat in (
                    ("local pool", w_local, latencies["local"]),
                    ("dask      ", w_dask, latencies["dask"]),
                ):
                    print(
                        f"  {label}: {wall:6.2f} s  {n / wall:6.2f} mic/s  latency p50 "
                        f"{percentile(lat, 0.5):.2f} s  p95 {percentile(lat, 0.95):.2f} s"
                    )
                print(
                    f"  throughput ratio dask/local: {w_local / w_dask:.2f} (target ≥ 0.9); "
                    f"scheduling overhead {(w_dask - w_local) / n * 1000:+.0f} ms/micrograph"
                )
                print(
                    "  runs local "
                    + " ".join(f"{t:.2f}" for t in walls["local"])
                    + " s, dask "
                    + " ".join(f"{t:.2f}" for t in walls["dask"])
                    + " s"
                )
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
