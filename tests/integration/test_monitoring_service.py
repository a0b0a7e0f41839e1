"""Acceptance: the real service (``python -m flybox run``, fed by the simulated microscope) is
scraped over HTTP and by a real Prometheus server, and the values match the outputs it wrote;
``flybox status`` reads it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from flybox.io.star import read_relion_star
from tests.conftest import REPO, require_binary
from tests.helpers.mqtt_broker import (
    FlyboxRun,
    prometheus_query,
    start_prometheus,
    stop_process,
    wait_for_port,
)

SESSION = "service-metrics"


def _prometheus_value(port: int, query: str, timeout: float = 90.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = prometheus_query(port, query)
        except OSError:
            result = []
        if result:
            return float(result[0]["value"][1])
        assert time.monotonic() < deadline, f"prometheus has no value for {query}"
        time.sleep(0.5)


def test_metrics_of_the_real_service_match_its_outputs_and_prometheus_scrapes_them(
    tmp_path: Path,
) -> None:
    prometheus = require_binary("prometheus")
    total = 6
    service = FlyboxRun(tmp_path / "session", SESSION)
    with service:
        service.acquisition(total, rate_per_minute=240).run()
        deadline = time.monotonic() + 60
        while service.metrics()[("flybox_micrographs_total", (("result", "done"),))] < total:
            assert time.monotonic() < deadline, "the service did not commit every micrograph"
            time.sleep(0.3)
        metrics = service.metrics()
        server, web_port = start_prometheus(prometheus, service.http_port, tmp_path)
        try:
            wait_for_port(web_port, timeout=60)
            scraped_done = _prometheus_value(web_port, 'flybox_micrographs_total{result="done"}')
            scraped_small = _prometheus_value(
                web_port, 'flybox_particles_total{stream="particles_small"}'
            )
        finally:
            stop_process(server)
        status = subprocess.run(
            [sys.executable, "-m", "flybox", "status", "--url", service.url],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
    out = service.output
    for stream, folder in (("particles", "Particles"), ("particles_small", "ParticlesSmall")):
        rows = len(read_relion_star(out / f"{stream}.star", "particles").rows)
        assert rows > 0
        assert metrics[("flybox_particles_total", (("stream", stream),))] == rows
        assert metrics[("flybox_session_particles", (("stream", stream),))] == rows
        assert len(list((out / folder).glob("*.mrcs"))) == total
    particles_small = len(read_relion_star(out / "particles_small.star", "particles").rows)
    assert metrics[("flybox_micrographs_total", (("result", "done"),))] == total
    assert metrics[("flybox_micrographs_total", (("result", "failed"),))] == 0
    assert metrics[("flybox_latency_seconds_count", ())] == total
    assert metrics[("flybox_stage_seconds_count", (("stage", "process"),))] == total
    assert metrics[("flybox_session_micrographs", (("state", "done"),))] == total
    assert metrics[("flybox_queue_depth", ())] == 0
    assert metrics[("flybox_micrograph_defocus_angstroms_count", ())] == total  # CTF known
    assert scraped_done == total
    assert scraped_small == particles_small
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{SESSION}: running")
    assert f"{total} done, 0 failed" in status.stdout
