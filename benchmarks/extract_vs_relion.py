"""Benchmark: flybox extract vs RELION 3.1 relion_preprocess_mpi, in the same run.

Data: N synthetic micrographs (default 12 × 4096², 300 particles each) made by flybox's own
simulator, with a CTF micrographs STAR and RELION-layout coordinate files.

(a) flybox: ``flybox extract`` writing the 256-px set **and** the 64-px small set in one pass,
    ramp normalisation + inversion, 2 worker processes.
(b) RELION: the same two outputs need two runs of ``relion_preprocess_mpi`` with 2 MPI ranks
    (``--extract_size 256`` and ``--extract_size 256 --scale 64``, ``--norm --invert_contrast``,
    background radius 96 and int(96·64/256) = 24).

Both read the micrographs from the page cache (the data are written just before). After an
untimed warm-up round, each round runs RELION then flybox, compares every particle, and
deletes all outputs, so both tools write into recycled page cache (on a fresh VM the first
touch of new memory is slow, which would penalise whichever tool runs later). flybox
fsyncs every output (crash safety) inside its time; RELION does not, so its time is also shown
with a final ``sync``. flybox's memory is measured in one more, untimed run: the peak of the
summed RSS of its whole process tree (and of the summed PSS, which counts pages shared by the
forked workers once), sampled every 20 ms. Every particle of every run is compared with
RELION's (per-particle correlation) as a sanity check.

Usage::

    python benchmarks/extract_vs_relion.py [--micrographs 12] [--size 4096] [--particles 300]
        [--workers 2] [--repeat 3] [--warmup 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np

from flybox.sim.microscope import write_dataset

BOX = 256
SMALL = 64
BG = 96


def tree_memory_bytes(pid: int) -> tuple[int, int]:
    """Summed RSS and summed PSS of a process and all its descendants (Linux /proc).

    RSS counts pages shared between processes (forked workers share the parent's modules)
    once per process; PSS divides each shared page among its sharers, so the PSS sum is the
    memory the tree really occupies.
    """
    rss = pss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss, pss


def timed(
    command: list[str], cwd: Path, sample_memory: bool = False
) -> tuple[float, tuple[int, int]]:
    """Run a command; wall seconds and the peak (RSS sum, PSS sum) of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = (0, 0)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            rss, pss = tree_memory_bytes(process.pid)
            peak = (max(peak[0], rss), max(peak[1], pss))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    if sample_memory:
        sampler.join()
    if process.returncode != 0:
        sys.stdout.write(output.decode(errors="replace"))
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}")
    return seconds, peak


def relion_command(workers: int, part_dir: str, *extra: str) -> list[str]:
    mpirun = ["mpirun", "-n", str(workers)]
    if os.geteuid() == 0:
        mpirun.insert(1, "--allow-run-as-root")
    return [
        *mpirun,
        "relion_preprocess_mpi",
        "--i",
        "micrographs_ctf.star",
        "--coord_dir",
        "AutoPick/",
        "--coord_suffix",
        "_autopick.star",
        "--part_star",
        f"{part_dir}.star",
        "--part_dir",
        f"{part_dir}/",
        "--extract",
        "--extract_size",
        str(BOX),
        "--norm",
        "--white_dust",
        "-1",
        "--black_dust",
        "-1",
        "--invert_contrast",
        *extra,
    ]


def flybox_command(workers: int, out: str) -> list[str]:
    flybox = shutil.which("flybox") or str(Path(sys.executable).with_name("flybox"))
    return [
        flybox,
        "extract",
        "--micrographs",
        "micrographs_ctf.star",
        "--coords",
        "AutoPick/",
        "--coord-suffix",
        "_autopick.star",
        "-o",
        out,
        "--box",
        str(BOX),
        "--fcrop-small",
        str(SMALL),
        "--norm",
        "ramp",
        "--bg-radius",
        str(BG),
        "--invert",
        "--workers",
        str(workers),
        "--no-progress",
    ]


def worst_correlation(a_path: Path, b_path: Path) -> float:
    """Lowest per-particle Pearson correlation between two stacks."""
    a = mrcfile.read(a_path).astype(np.float64)
    b = mrcfile.read(b_path).astype(np.float64)
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
    return float(((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micrographs", type=int, default=12)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--particles", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each; medians shown")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    parser.add_argument("--keep", type=Path, help="keep data and outputs in this folder")
    args = parser.parse_args()
    for tool in ("relion_preprocess_mpi", "mpirun"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install relion)")

    folder = args.keep or Path(tempfile.mkdtemp(prefix="flybox-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_dataset(folder, args.micrographs, shape=args.size, n_particles=args.particles, seed=1)
    print(
        f"data   : {args.micrographs} micrographs {args.size}x{args.size} x {args.particles} "
        f"particles, box {BOX} -> {BOX} + {SMALL} px, ramp norm + invert "
        f"(simulated in {time.perf_counter() - started:.1f} s)"
    )
    subprocess.run(["sync"], check=True)

    flybox_times, relion_full, relion_small, relion_sync = [], [], [], []
    worst_full = worst_small = 1.0

    def run_relion() -> tuple[float, float, float]:
        full, _ = timed(relion_command(args.workers, "E256", "--bg_radius", str(BG)), folder)
        small, _ = timed(
            relion_command(
                args.workers, "E64", "--scale", str(SMALL), "--bg_radius", str(BG * SMALL // BOX)
            ),
            folder,
        )
        sync_started = time.perf_counter()
        subprocess.run(["sync"], check=True)
        return full, small, full + small + time.perf_counter() - sync_started

    def run_flybox() -> float:
        seconds, _ = timed(flybox_command(args.workers, "flybox"), folder)
        subprocess.run(["sync"], check=True)
        return seconds

    for run in range(-args.warmup, args.repeat):
        # Alternate which tool runs first, so neither always meets the other's leftovers.
        if run % 2 == 0:
            full, small, synced = run_relion()
            seconds = run_flybox()
        else:
            seconds = run_flybox()
            full, small, synced = run_relion()
        for mic in range(args.micrographs):
            name = f"mic{mic:03d}.mrcs"
            worst_full = min(
                worst_full,
                worst_correlation(
                    folder / "flybox" / "Particles" / name, folder / "E256" / "Micrographs" / name
                ),
            )
            worst_small = min(
                worst_small,
                worst_correlation(
                    folder / "flybox" / "ParticlesSmall" / name,
                    folder / "E64" / "Micrographs" / name,
                ),
            )
        # Both tools write into page cache recycled from the previous run (a fresh VM pays
        # for the first touch of every new page, which would penalise whoever runs later).
        for name in ("E256", "E64", "flybox"):
            shutil.rmtree(folder / name, ignore_errors=True)
        if run >= 0:
            relion_full.append(full)
            relion_small.append(small)
            relion_sync.append(synced)
            flybox_times.append(seconds)

    # Memory in a separate, untimed run: sampling /proc/*/smaps_rollup every 20 ms slows the
    # sampled processes (measured: +0.3-0.6 s), so it never overlaps a timed run.
    _, peak = timed(flybox_command(args.workers, "flybox"), folder, sample_memory=True)
    shutil.rmtree(folder / "flybox", ignore_errors=True)
    peaks = [peak]

    fly = statistics.median(flybox_times)
    rel = statistics.median([f + s for f, s in zip(relion_full, relion_small, strict=True)])
    rel_sync = statistics.median(relion_sync)
    n = args.micrographs
    print(
        f"flybox : {fly:.2f} s for both sets in one pass, {args.workers} workers "
        f"({n / fly:.2f} micrographs/s; outputs fsynced)"
    )
    print(
        f"RELION : {rel:.2f} s = {statistics.median(relion_full):.2f} s (256 px) + "
        f"{statistics.median(relion_small):.2f} s (64 px), 2 runs of relion_preprocess_mpi "
        f"-n {args.workers} ({n / rel:.2f} micrographs/s); {rel_sync:.2f} s with a final sync"
    )
    print(
        f"ratio  : flybox is {rel / fly:.2f}x faster than RELION (target >= 3x); "
        f"{rel_sync / fly:.2f}x against RELION + sync"
    )
    print(
        f"memory : flybox peak RSS {max(p[0] for p in peaks) / 2**20:.0f} MB summed over its "
        f"process tree (target <= 1024 MB); peak PSS {max(p[1] for p in peaks) / 2**20:.0f} MB "
        "(shared pages counted once)"
    )
    print(
        "check  : worst per-particle correlation with RELION over all particles: "
        f"{worst_full:.6f} (256 px), {worst_small:.6f} (64 px)"
    )
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
