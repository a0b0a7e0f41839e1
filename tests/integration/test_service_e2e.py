"""End to end: ``python -m flybox run`` in a subprocess on real folders."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flybox.io.mrc import read_header
from flybox.sim.microscope import Acquisition, AcquisitionSettings
from tests.conftest import IN_CI
from tests.helpers.service import (
    FOREIGN_UID,
    PARTICLES,
    Inputs,
    ServiceProcess,
    both_streams_committed,
    check_outputs,
    committed_rows,
    expected_picks,
    unprivileged_root_prefix,
    wait_for,
    write_config,
    write_halves,
)

pytestmark = pytest.mark.slow


def _units(output: Path) -> list[tuple[str, int, str]]:
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        rows = db.execute("SELECT stem, version, state FROM units ORDER BY stem, version")
        return [(str(s), int(v), str(t)) for s, v, t in rows.fetchall()]


def _started(service: ServiceProcess) -> bool:
    assert service.alive(), service.output()
    return service.running()


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Inputs]:
    return tmp_path / "inputs", tmp_path / "output", Inputs(tmp_path / "inputs")


def test_a_micrograph_written_in_two_halves_is_processed_once_after_completion(
    tmp_path: Path, folders: tuple[Path, Path, Inputs]
) -> None:
    inputs, output, files = folders
    service = ServiceProcess(write_config(tmp_path, inputs, output, ctf=False), tmp_path / "log")
    service.start()
    try:
        wait_for(lambda: _started(service), 60, "the service to start")
        source, picks = files.source("half")
        files.write_picks("half", picks)
        writer = threading.Thread(
            target=write_halves, args=(source, files.micrographs / "half.mrc", 3.0)
        )
        writer.start()
        time.sleep(2.0)  # half the file is there, unchanged for longer than settle_seconds
        assert committed_rows(output) == 0
        writer.join()
        wait_for(lambda: committed_rows(output) == PARTICLES, 60, "the micrograph")
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    assert _units(output) == [("half", 1, "done")]
    check_outputs(output, {"half": PARTICLES})
    service.assert_no_leftovers()


def test_bad_inputs_are_quarantined_with_reasons_while_later_inputs_are_processed(
    tmp_path: Path, folders: tuple[Path, Path, Inputs]
) -> None:
    inputs, output, files = folders
    # An unreadable micrograph: mode 0 for an unprivileged run; as root (CI), the service runs
    # in a user namespace where a file of another user with mode 0 is unreadable to it.
    prefix = None
    if os.geteuid() == 0:
        prefix = unprivileged_root_prefix()
    can_lock = os.geteuid() != 0 or prefix is not None
    if IN_CI:
        assert can_lock, "CI runs as root without user namespaces: unreadable input untested"
    config = write_config(tmp_path, inputs, output, ctf=False)
    service = ServiceProcess(config, tmp_path / "log", prefix=prefix)
    service.start()
    bad = {
        "truncated.mrc": "truncated: ",
        "corrupt.mrc": "invalid MRC header: ",
        "oversized.mrc": "bytes larger than its header says",
        "badpicks_autopick.star": "",
    }
    try:
        wait_for(lambda: _started(service), 60, "the service to start")
        source, picks = files.source("truncated")
        data = source.read_bytes()
        (files.micrographs / "truncated.mrc").write_bytes(data[: len(data) * 3 // 5])
        files.write_picks("truncated", picks)
        (files.micrographs / "corrupt.mrc").write_bytes(b"\x00\x01garbage" * 400)
        (files.micrographs / "oversized.mrc").write_bytes(data + b"\x00" * 100)
        files.add("badpicks", seed=3)
        (files.picks / "badpicks_autopick.star").write_text("data_\nloop_\n_rlnFoo #1\nbar\n")
        if can_lock:  # locked before it appears (a rename), so never read while readable
            locked, locked_picks = files.source("locked", seed=4)
            if os.geteuid() == 0:
                os.chown(locked, FOREIGN_UID, FOREIGN_UID)
            locked.chmod(0)
            locked.rename(files.micrographs / "locked.mrc")
            files.write_picks("locked", locked_picks)
            bad["locked.mrc"] = "unreadable: Permission denied"
        for index in range(3):
            files.add(f"good{index}", seed=10 + index)
        records = output / "quarantine"
        wait_for(
            lambda: all((records / f"{name}.json").exists() for name in bad),
            60,
            "every bad input to be quarantined",
        )
        wait_for(lambda: committed_rows(output) == 3 * PARTICLES, 60, "the good micrographs")
        assert service.alive()
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    for name, reason in bad.items():
        record = json.loads((output / "quarantine" / f"{name}.json").read_text())
        assert reason in record["reason"], record
        assert record["path"].endswith(name)
        assert f"{name}: quarantined: " in service.output()
    assert (files.micrographs / "corrupt.mrc").exists()  # inputs are never moved
    check_outputs(output, {f"good{i}": PARTICLES for i in range(3)})


def test_picks_before_the_micrograph_and_rewritten_picks_make_a_new_version(
    tmp_path: Path, folders: tuple[Path, Path, Inputs]
) -> None:
    inputs, output, files = folders
    config = write_config(tmp_path, inputs, output, ctf=False)
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    try:
        wait_for(lambda: _started(service), 60, "the service to start")
        source, picks = files.source("early")
        files.write_picks("early", picks)
        time.sleep(1.0)
        shutil.copyfile(source, files.micrographs / "early.mrc")
        files.add("other", seed=5)
        wait_for(lambda: committed_rows(output) == 2 * PARTICLES, 60, "both micrographs")
        files.write_picks("early", picks.iloc[:7])
        wait_for(
            lambda: both_streams_committed(output, PARTICLES + 7),
            60,
            "the new version",
        )
        assert service.terminate() == 0
        service.start()  # a restart processes nothing again
        wait_for(lambda: service.output().count(": running (") == 2, 60, "the restart")
        time.sleep(1.5)
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    assert _units(output) == [("early", 1, "done"), ("early", 2, "done"), ("other", 1, "done")]
    check_outputs(output, {"early": 7, "other": PARTICLES})
    assert read_header(output / "ParticlesSmall" / "early.mrcs").nz == 7


def test_poll_mode_processes_a_stream(tmp_path: Path) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    config = write_config(tmp_path, inputs, output, mode="poll")
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(micrographs=6, rate_per_minute=300, size=512, particles=PARTICLES),
    )
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    try:
        acquisition.run()
        wait_for(lambda: committed_rows(output) == 6 * PARTICLES, 60, "all micrographs")
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    assert "poll mode" in service.output()
    check_outputs(output, expected_picks(inputs))


def test_sigterm_drains_and_exits_zero_within_the_timeout(tmp_path: Path) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    config = write_config(tmp_path, inputs, output)
    acquisition = Acquisition(
        inputs,
        AcquisitionSettings(micrographs=12, rate_per_minute=600, size=512, particles=PARTICLES),
    )
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    try:
        wait_for(lambda: _started(service), 60, "the service to start")
        acquisition.run()
        wait_for(lambda: committed_rows(output) > 0, 60, "a first commit")
        assert service.process is not None
        service.process.terminate()
        assert service.process.wait(30) == 0  # drain_seconds = 20
        with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
            running = db.execute("SELECT COUNT(*) FROM units WHERE state = 'running'")
            assert running.fetchone()[0] == 0
        service.assert_no_leftovers()
        service.start()
        wait_for(lambda: committed_rows(output) == 12 * PARTICLES, 60, "the rest after restart")
        wait_for(lambda: service.output().count(": running (") == 2, 60, "the restart")
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    assert "draining" in service.output() or "stopped" in service.output()
    check_outputs(output, expected_picks(inputs))


def test_sd_notify_messages_reach_a_test_socket(tmp_path: Path) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(60)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        service = ServiceProcess(write_config(tmp_path, inputs, output), tmp_path / "log", env)
        service.start()
        try:
            messages: list[str] = []
            while not any("READY=1" in m for m in messages):
                messages.append(sock.recv(4096).decode())
            while not any(m == "WATCHDOG=1" for m in messages):
                messages.append(sock.recv(4096).decode())
            assert service.terminate() == 0
            sock.settimeout(1)
            try:
                while True:
                    messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        finally:
            if service.alive():
                service.kill()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=running" in ready
    assert any(m.startswith("STOPPING=1") for m in messages)
    assert any("STATUS=stopped" in m for m in messages)


def test_a_changed_chain_is_refused_with_a_clear_message(
    tmp_path: Path, folders: tuple[Path, Path, Inputs]
) -> None:
    inputs, output, files = folders
    config = write_config(tmp_path, inputs, output, ctf=False)
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    try:
        files.add("m1")
        wait_for(lambda: committed_rows(output) == PARTICLES, 60, "a commit")
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    config.write_text(config.read_text().replace("box = 64", "box = 48"))
    service.start()
    assert service.process is not None
    assert service.process.wait(60) == 2
    assert "use a new [session] output folder" in service.output()
