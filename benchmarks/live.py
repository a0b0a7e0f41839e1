"""Benchmark: the live session's picking step and the dashboard's update latency (issue 13).

Autopick step. A 4096² float32 synthetic micrograph (160-px particles among decoys,
:mod:`flybox.pick.synthetic`) processed by the worker's job (:func:`flybox.pipeline.job.run_job`)
with the default chain, one thread: once picked by the model inside the job (the ``autopick``
step before ``extract``), once with the same picks given as a coordinate file (the local
baseline: extraction alone). Reported: the step's own time (the job's ``autopick_seconds``,
model already loaded in the worker, as in a running stream) and the two job times side by
side. Target: ≤ 1 s per micrograph on one core.

Dashboard latency. The real service (``flybox run``, a subprocess) with ``[picking]`` and the
dashboard open in headless Chromium; micrographs are written one by one; for each, the time
from its commit (the micrograph event's timestamp, taken when the service committed it) to the
page receiving it over Server-Sent Events (``Date.now()`` in the page; same machine clock).
Target: ≤ 1 s.

Usage::

    python benchmarks/live.py [--repeats 3] [--micrographs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import json  # noqa: E402

import numpy as np  # noqa: E402

from flybox.config import DEFAULT_CHAIN  # noqa: E402
from flybox.io.mrc import write_micrograph  # noqa: E402
from flybox.pick.features import prepare  # noqa: E402
from flybox.pick.learner import LabelledMicrograph, train  # noqa: E402
from flybox.pick.live import Autopick  # noqa: E402
from flybox.pick.model_file import save_model  # noqa: E402
from flybox.pick.synthetic import synthetic_micrograph  # noqa: E402
from flybox.pipeline.chain import Chain, ChainSpec  # noqa: E402
from flybox.pipeline.job import MicrographJob, run_job  # noqa: E402

SIZE = 160


def _model(folder: Path, size: int, particle: float) -> Path:
    examples = []
    for seed in (100, 101):
        mic = synthetic_micrograph(size, particle, particles=40, amplitude=0.5, seed=seed)
        examples.append(LabelledMicrograph(f"t{seed}", prepare(mic.image, particle), mic.particles))
    path = folder / "model.flypick"
    save_model(path, train(examples, particle))
    return path


def autopick_step(folder: Path, repeats: int) -> None:
    model = _model(folder, 2048, SIZE)
    mic = synthetic_micrograph(4096, SIZE, particles=300, amplitude=0.5, seed=7)
    path = folder / "mic.mrc"
    write_micrograph(path, mic.image, 1.0)
    chain = Chain.from_config(ChainSpec.of(DEFAULT_CHAIN)).spec
    picker = Autopick(str(model), 1, SIZE, 0.5, str(folder / "Picks"))
    base = {"micrograph": str(path), "name": str(path), "chain": chain, "pixel_size_a": 1.0}
    out = folder / "out"
    run_job(MicrographJob(output_dir=str(out), picker=picker, **base))  # warm: model, plans
    step, picked, baseline = [], [], []
    coords = folder / "Picks" / "mic_autopick.star"
    for _ in range(repeats):
        started = time.perf_counter()
        result = run_job(MicrographJob(output_dir=str(out), picker=picker, **base))
        picked.append(time.perf_counter() - started)
        step.append(result.stats["autopick_seconds"])
        started = time.perf_counter()
        run_job(MicrographJob(output_dir=str(out), coordinates=str(coords), **base))
        baseline.append(time.perf_counter() - started)
    n = result.picks
    print(f"autopick step, 4096² micrograph, {n} picks, 1 thread:")
    print(f"  autopick step        {statistics.median(step):6.3f} s  (target ≤ 1 s)")
    print(f"  job with autopick    {statistics.median(picked):6.3f} s")
    print(f"  job, same picks from a file (baseline) {statistics.median(baseline):6.3f} s")
    ratio = statistics.median(picked) / statistics.median(baseline)
    print(f"  ratio job with autopick / baseline: {ratio:.2f}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dashboard_latency(folder: Path, count: int) -> None:
    from playwright.sync_api import sync_playwright

    model = _model(folder, 768, 48)
    inputs, output = folder / "in", folder / "live"
    inputs.mkdir()
    port = _free_port()
    config = folder / "flybox.toml"
    config.write_text(
        f"""[session]
name = "bench"
output = "{output}"
[watch]
micrographs = ["{inputs}/*.mrc"]
settle_seconds = 0.2
[picking]
model = "{model}"
[[chain]]
step = "extract"
box = 64
border = "fill"
[executor]
workers = 1
[http]
listen = "127.0.0.1:{port}"
"""
    )
    log = open(folder / "service.log", "wb")  # noqa: SIM115 - closed below
    service = subprocess.Popen(
        [sys.executable, "-m", "flybox", "run", "-c", str(config)], stdout=log, stderr=log
    )
    latencies = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as playwright:
            args = ["--no-sandbox"] if os.geteuid() == 0 else []
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=args)
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_selector("body[data-ready=true]")
            page.wait_for_function("window.flyboxDashboard.connected")
            for index in range(count):
                mic = synthetic_micrograph(768, 48, particles=40, amplitude=0.5, seed=index)
                write_micrograph(inputs / f"m{index}.mrc", mic.image, 1.0)
                page.wait_for_function(
                    f"window.flyboxDashboard.updates >= {index + 1}", timeout=60_000
                )
                point = page.evaluate(
                    "() => [window.flyboxDashboard.micrographs.at(-1).t,"
                    " window.flyboxDashboard.lastUpdate.receivedAt]"
                )
                latencies.append(point[1] / 1000 - point[0])
            browser.close()
    finally:
        service.terminate()
        service.wait(60)
        log.close()
    print(f"dashboard update latency, commit → page, {count} micrographs:")
    print(
        f"  median {statistics.median(latencies) * 1000:6.1f} ms, max {max(latencies) * 1000:6.1f}"
        " ms  (target ≤ 1000 ms)"
    )
    print("  " + json.dumps([round(v * 1000, 1) for v in latencies]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micrographs", type=int, default=5)
    args = parser.parse_args()
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        autopick_step(Path(tmp), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        dashboard_latency(Path(tmp), args.micrographs)


if __name__ == "__main__":
    main()
