"""Shared pieces of the hardening tests against the real service (issue 9): inputs written by
hand into the simulator's layout, RELION reading the outputs, and a service whose output folder
is a small, full tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.conftest import missing_component, require_binary
from tests.helpers.service import Inputs, ServiceProcess, write_config


def relion_reads(star: Path, tmp_path: Path) -> None:
    """RELION's ``relion_star_handler`` reads ``star`` without an error."""
    handler = require_binary("relion_star_handler")
    result = subprocess.run(
        [handler, "--i", str(star), "--o", str(tmp_path / "relion_copy.star")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


def mount_tmpfs(target: Path, size: str) -> None:
    """Mount a tmpfs of ``size`` (e.g. ``"24m"``) on ``target`` (needs root)."""
    if os.geteuid() != 0:
        missing_component("a tmpfs mount (the disk-full tests need root)")
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        missing_component(f"a tmpfs mount ({result.stderr.strip()})")


def fill_disk(handle: BinaryIO) -> None:
    """Write to ``handle`` until its file system is full."""
    with pytest.raises(OSError, match="No space left"):  # noqa: PT012 - until the disk is full
        while True:
            handle.write(b"\0" * (1 << 20))
            handle.flush()


@dataclass
class FullDisk:
    """A running service whose output folder is full (see :func:`service_on_a_full_disk`)."""

    output: Path
    files: Inputs
    config: Path
    service: ServiceProcess
    #: The file that fills the disk: removing it gives the space back.
    filler: Path


@contextmanager
def service_on_a_full_disk(tmp_path: Path, *, free_bytes: int = 0) -> Iterator[FullDisk]:
    """A service (no CTF) writing to a 24 MiB tmpfs that ``filler.bin`` fills up to
    ``free_bytes``; its inputs go to ``tmp_path/inputs`` (:class:`Inputs`).

    On exit the service is killed if it still runs and the tmpfs is unmounted; checks of the
    outputs belong inside the block.
    """
    output = tmp_path / "small"
    mount_tmpfs(output, "24m")
    try:
        inputs = tmp_path / "inputs"
        files = Inputs(inputs)
        config = write_config(tmp_path, inputs, output, ctf=False)
        service = ServiceProcess(config, tmp_path / "log")
        service.start()
        try:
            service.wait_running()
            filler = output / "filler.bin"
            with open(filler, "wb") as handle:
                fill_disk(handle)
            if free_bytes:
                os.truncate(filler, filler.stat().st_size - free_bytes)
            yield FullDisk(output, files, config, service, filler)
        finally:
            if service.alive():
                service.kill()
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
