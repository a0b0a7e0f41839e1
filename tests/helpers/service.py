"""Helpers for the service tests (no tests here): configurations, the service as a real
subprocess, output checks, and a leak check for the processes a test started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flybox.io.coords import read_coordinates, write_coordinates_star
from flybox.io.mrc import read_header, write_micrograph
from flybox.io.star import read_relion_star
from flybox.sim.microscope import synthetic_micrograph

#: The chain of the service tests: 64-px boxes and a 32-px small set on 512² micrographs.
TEST_CHAIN = """
[[chain]]
step = "extract"
box = 64
border = "fill"

[[chain]]
step = "fourier_crop"
outputs = { particles = 64, particles_small = 32 }

[[chain]]
step = "normalize"
method = "ramp"
"""

STREAMS = {"particles": "Particles", "particles_small": "ParticlesSmall"}


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    folder: Path,
    inputs: Path,
    output: Path,
    *,
    chain: str = TEST_CHAIN,
    ctf: bool = True,
    **watch: Any,
) -> Path:
    """A service configuration watching ``inputs`` (the simulator's layout)."""
    settings: dict[str, Any] = {
        "settle_seconds": 0.3,
        "rescan_seconds": 5.0,
        "incomplete_timeout_seconds": 3.0,
        "pairing_timeout_seconds": 60.0,
    }
    settings.update(watch)
    lines = [
        "[session]",
        'name = "test"',
        f'output = "{output}"',
        "",
        "[watch]",
        f'micrographs = ["{inputs}/Micrographs/*.mrc"]',
        f'coordinates = ["{inputs}/AutoPick/*_autopick.star"]',
        'coordinate_suffix = "_autopick.star"',
    ]
    if ctf:
        lines.append(f'ctf = "{inputs}/micrographs_ctf.star"')
    for key, value in settings.items():
        lines.append(f"{key} = {value!r}".replace("'", '"'))
    lines += [
        chain,
        "[executor]",
        "workers = 2",
        "drain_seconds = 20",
        "",
        "[http]",
        f'listen = "127.0.0.1:{free_port()}"',
        "",
    ]
    path = folder / "flybox.toml"
    path.write_text("\n".join(lines))
    return path


class ServiceProcess:
    """``python -m flybox run -c CONFIG`` in a subprocess, tagged so that every process it
    starts (fork server, workers) can be found afterwards."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config = config
        self.cwd = cwd
        self.prefix = prefix or []
        self.log = log
        self.tag = uuid.uuid4().hex
        self.env = {**os.environ, "FLYBOX_TEST_TAG": self.tag, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> None:
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "flybox", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def running(self) -> bool:
        """Whether this start of the service has logged that it is running."""
        with open(self.log, "rb") as log:
            log.seek(self._log_offset)
            return b": running (" in log.read()

    def wait_running(self, timeout: float = 60.0) -> None:
        """Wait until this start is running (or has exited)."""
        wait_for(lambda: self.running() or not self.alive(), timeout, "the service to start")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM once the service runs (a SIGTERM while the interpreter itself is still
        starting, before flybox code runs, ends it by the signal: nothing was taken yet, but
        the exit status would not be the clean stop the tests check)."""
        assert self.process is not None
        self.wait_running(timeout)
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tagged_processes(self) -> list[int]:
        """Processes still running with this service's tag in their environment."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if f"FLYBOX_TEST_TAG={self.tag}".encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def assert_no_leftovers(self, wait: float = 10.0) -> None:
        """Fail (and clean up) when processes of this service outlive it."""
        deadline = time.monotonic() + wait
        while (left := self.tagged_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind by the service: {left}"


#: A user that owns nothing here (files chowned to it are unreadable in a user namespace).
FOREIGN_UID = 12345


def unprivileged_root_prefix() -> list[str] | None:
    """A command prefix under which a root process cannot read files of other users.

    Root reads files whatever their permission bits say. In a new user namespace that maps
    only uid 0 (``unshare --user --map-root-user``) the process is still root for root's
    files, but its capabilities do not apply to files of unmapped users such as
    :data:`FOREIGN_UID`: reading those fails with "Permission denied", as it does for the
    service account of a facility. ``None`` where user namespaces are not available.
    """
    command = ["unshare", "--user", "--map-root-user"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return command if probe.returncode == 0 else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.25) -> None:
    """Wait until ``condition()`` holds (a functional wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def committed_rows(output: Path, stream: str = "particles") -> int:
    """Rows in a stream's cumulative STAR file (0 when absent or unreadable)."""
    try:
        return len(read_relion_star(output / f"{stream}.star", "particles").rows)
    except Exception:
        return 0


#: Picks per micrograph of :class:`Inputs`.
PARTICLES = 20


class Inputs:
    """Micrographs and picks written by hand into the simulator's layout (``Micrographs/``,
    ``AutoPick/<stem>_autopick.star``), each micrograph made in a staging folder first."""

    def __init__(self, root: Path) -> None:
        self.micrographs = root / "Micrographs"
        self.picks = root / "AutoPick"
        self.staging = root.parent / "staging"
        self._made = 0
        for folder in (self.micrographs, self.picks, self.staging):
            folder.mkdir(parents=True, exist_ok=True)

    def source(self, stem: str, seed: int = 0) -> tuple[Path, pd.DataFrame]:
        """A 512² micrograph with :data:`PARTICLES` picks in the staging folder (under a
        name of its own: ``stem`` may be a name the tests want refused)."""
        mic = synthetic_micrograph(512, PARTICLES, rng=seed)
        self._made += 1
        path = self.staging / f"source{self._made}.mrc"
        write_micrograph(path, mic.image, 1.0)
        return path, mic.picks

    def write_picks(self, stem: str, picks: pd.DataFrame) -> None:
        write_coordinates_star(self.picks / f"{stem}_autopick.star", picks)

    def add(self, stem: str, seed: int = 0) -> Path:
        """A micrograph and its picks (picks first); returns the micrograph's path."""
        source, picks = self.source(stem, seed)
        self.write_picks(stem, picks)
        target = os.path.join(os.fsencode(self.micrographs), os.fsencode(stem) + b".mrc")
        shutil.copyfile(source, target)
        return Path(os.fsdecode(target))


def both_streams_committed(output: Path, rows: int) -> bool:
    """Whether both cumulative STAR files (``particles``, ``particles_small``) hold ``rows``."""
    return committed_rows(output) == rows and committed_rows(output, "particles_small") == rows


def expected_picks(inputs: Path, stems: list[str] | None = None) -> dict[str, int]:
    """Picks per micrograph stem, from the coordinate files."""
    counts = {}
    for path in sorted((inputs / "AutoPick").glob("*_autopick.star")):
        stem = path.name[: -len("_autopick.star")]
        if stems is None or stem in stems:
            counts[stem] = len(read_coordinates(path))
    return counts


def check_outputs(output: Path, expected: dict[str, int]) -> None:
    """Every particle exactly once in every stream, stacks complete, nothing temporary."""
    leftovers = [p for p in output.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left: {leftovers}"
    for stream, folder in STREAMS.items():
        rows = read_relion_star(output / f"{stream}.star", "particles").rows
        names = rows["rlnImageName"].astype(str)
        assert names.is_unique, f"{stream}: duplicated particles"
        stems = rows["rlnMicrographName"].map(lambda p: Path(str(p)).stem)
        counts = stems.value_counts().to_dict()
        assert counts == expected, f"{stream}: {counts} != {expected}"
        for stem, count in expected.items():
            header = read_header(output / folder / f"{stem}.mrcs")
            assert header.nz == count
            assert (output / folder / f"{stem}.mrcs").stat().st_size == header.expected_size
            indices = sorted(int(n.split("@")[0]) for n in names[stems == stem])
            assert indices == list(range(1, count + 1))


def write_halves(source: Path, target: Path, pause: float) -> None:
    """Write ``source`` to ``target`` in two halves with a pause (non-atomically)."""
    data = source.read_bytes()
    half = len(data) // 2
    with open(target, "wb") as handle:
        handle.write(data[:half])
        handle.flush()
        time.sleep(pause)
        handle.write(data[half:])


def noise(shape: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """A float32 image of noise."""
    return np.random.default_rng(seed).standard_normal((shape, shape)).astype(np.float32)


def http_base(config: Path) -> str:
    """``http://HOST:PORT`` of a service from its configuration's ``[http] listen``."""
    listen = next(
        line.split('"')[1] for line in config.read_text().splitlines() if "listen" in line
    )
    return f"http://{listen}"


def healthz(config: Path) -> tuple[int, str]:
    """``GET /healthz`` of a running service: status code and text."""
    try:
        with urllib.request.urlopen(f"{http_base(config)}/healthz", timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
