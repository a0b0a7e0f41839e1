"""More of issue 9's reproductions against the real service in a subprocess: the MQTT
last-will carries the last counts, a stalled loop shows in ``/healthz``, a full disk in the
middle of a worker's write, a job that hangs on storage, and the smaller items."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flybox.io.coords import read_coordinates, write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.sim.microscope import synthetic_micrograph
from tests.conftest import missing_component
from tests.helpers.hardening import relion_reads, service_on_a_full_disk
from tests.helpers.mqtt_broker import FlyboxRun, Mosquitto, mqtt_settings, parse_sub_line
from tests.helpers.service import (
    PARTICLES,
    Inputs,
    ServiceProcess,
    both_streams_committed,
    check_outputs,
    committed_rows,
    healthz,
    http_base,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

#: Particles per micrograph of the disk-full test: stacks of about 2.5 MB per micrograph.
BIG = 120


def _retained_status(broker: Mosquitto, prefix: str) -> dict[str, object]:
    command = broker.subscriber_command(f"{prefix}/status", "-C", "1", "-W", "5")
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    payload = parse_sub_line(line.strip()).payload
    assert isinstance(payload, dict)
    return payload


def test_after_sigkill_the_retained_offline_status_carries_the_last_counts(
    tmp_path: Path,
) -> None:
    session, done = "will-counts", 4
    prefix = f"flybox/{session}"
    with Mosquitto(tmp_path / "broker") as broker:
        service = FlyboxRun(
            tmp_path / "session", session, mqtt_settings(broker, status_seconds=2), verbose=True
        )
        with service:
            first = _retained_status(broker, prefix)
            assert first["state"] == "running"
            service.acquisition(done, rate_per_minute=240).run()
            wait_for(
                lambda: _retained_status(broker, prefix)["counts"]["done"] == done,  # type: ignore[index]
                90,
                f"the retained status to count {done} done",
            )
            # once idle, the service reconnects with a will of the current counts
            refreshed = f"last-will of the current counts ({done} done,"
            wait_for(lambda: refreshed in service.log.read_text(), 60, "the will's refresh")
            service.stop(signal.SIGKILL)
            wait_for(
                lambda: _retained_status(broker, prefix)["state"] == "offline", 30, "the last-will"
            )
        offline = _retained_status(broker, prefix)
    assert offline["counts"]["done"] == done  # type: ignore[index]
    assert offline["particles"] == {"particles": 30 * done, "particles_small": 30 * done}


class FreezableDisk:
    """An ext4 file system in a file, loop-mounted at ``target``; ``fsfreeze`` makes every
    write to it block in the kernel (as on a hung network mount) until it is thawed."""

    def __init__(self, target: Path, megabytes: int = 64) -> None:
        if os.geteuid() != 0:
            missing_component("a loop mount and fsfreeze (the test needs root)")
        for binary in ("mkfs.ext4", "fsfreeze", "mount"):
            if shutil.which(binary) is None:
                missing_component(f"{binary} (a freezable file system)")
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.image = target.parent / f".{target.name}.ext4"
        subprocess.run(["truncate", "-s", f"{megabytes}M", str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", str(self.image)], check=True)
        target.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-o", "loop", str(self.image), str(target)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            missing_component(f"a loop mount ({mounted.stderr.strip()})")
        self.frozen = False

    def freeze(self) -> None:
        subprocess.run(["fsfreeze", "--freeze", str(self.target)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            subprocess.run(["fsfreeze", "--unfreeze", str(self.target)], check=True)
            self.frozen = False

    def remove(self) -> None:
        self.thaw()
        subprocess.run(["umount", "-l", str(self.target)], check=False)
        self.image.unlink(missing_ok=True)


def _with_executor(config: Path, **settings: object) -> Path:
    text = config.read_text()
    extra = "".join(f"\n{key} = {value}" for key, value in settings.items())
    config.write_text(text.replace("drain_seconds = 20", "drain_seconds = 20" + extra))
    return config


def test_a_job_hung_on_storage_is_abandoned_its_worker_replaced_and_the_unit_retried(
    tmp_path: Path,
) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    files = Inputs(inputs)
    # the workers write their stacks into Particles/: a file system of its own, frozen below
    disk = FreezableDisk(output / "Particles")
    try:
        config = _with_executor(
            write_config(tmp_path, inputs, output, ctf=False), job_timeout_seconds=3
        )
        service = ServiceProcess(config, tmp_path / "log")
        try:
            service.start()
            service.wait_running()
            disk.freeze()  # a worker's write now blocks in the kernel, for good
            files.add("hung", seed=1)
            wait_for(
                lambda: "attempt 1 failed (no result within 3 s" in service.output(),
                90,
                "the job to time out",
            )
            assert "its worker is stopped and replaced" in service.output()
            assert "stopped 2 workers (a job did not finish); starting new ones" in (
                service.output()
            )
            disk.thaw()  # the mount comes back: the retried unit goes through
            files.add("after", seed=2)
            wait_for(lambda: committed_rows(output) == 2 * PARTICLES, 120, "both micrographs")
            assert service.alive(), service.output()
            assert service.terminate() == 0, service.output()
        finally:
            disk.thaw()
            if service.alive():
                service.kill()
        check_outputs(output, {"hung": PARTICLES, "after": PARTICLES})
        service.assert_no_leftovers()
    finally:
        disk.remove()


def test_a_commit_loop_stalled_on_a_frozen_disk_makes_healthz_answer_503_naming_it(
    tmp_path: Path,
) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    files = Inputs(inputs)
    disk = FreezableDisk(output)  # journal, STAR files and stacks: writes block when frozen
    try:
        config = write_config(tmp_path, inputs, output, ctf=False)
        text = config.read_text().replace('name = "test"', 'name = "test"\nstall_seconds = 3')
        config.write_text(text)
        service = ServiceProcess(config, tmp_path / "log")
        try:
            service.start()
            service.wait_running()
            files.add("before", seed=1)
            wait_for(lambda: committed_rows(output) == PARTICLES, 90, "the first micrograph")
            assert healthz(config)[0] == 200
            disk.freeze()
            files.add("during", seed=2)  # journaling it blocks the journal thread for good
            wait_for(lambda: healthz(config)[0] == 503, 90, "/healthz to answer 503")
            code, body = healthz(config)
            assert code == 503, body
            assert "journal loop stalled" in body, body
            assert service.alive()
            assert "the journal loop has made no progress for" in service.output()
            disk.thaw()
            wait_for(lambda: healthz(config)[0] == 200, 90, "/healthz to recover")
            wait_for(
                lambda: "the journal loop makes progress again" in service.output(),
                30,
                "the recovery in the log",
            )
            wait_for(lambda: committed_rows(output) == 2 * PARTICLES, 90, "the second one")
            assert service.terminate() == 0, service.output()
        finally:
            disk.thaw()
            if service.alive():
                service.kill()
        check_outputs(output, {"before": PARTICLES, "during": PARTICLES})
        service.assert_no_leftovers()
    finally:
        disk.remove()


def _metric(config: Path, sample: str) -> float | None:
    """One sample of ``/metrics`` (name and labels as Prometheus prints them)."""
    with urllib.request.urlopen(f"{http_base(config)}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


def _check_journal(output: Path, expected: dict[str, int]) -> None:
    """The journal agrees with the STAR files: each stem's segment once, the committed
    lengths are the files' sizes, every stem done exactly once."""
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        for stream, length, particles in db.execute(
            "SELECT stream, length, particles FROM star_files"
        ):
            assert (output / f"{stream}.star").stat().st_size == length
            assert committed_rows(output, stream) == particles == sum(expected.values())
            segments = dict(
                db.execute("SELECT stem, particles FROM segments WHERE stream = ?", (stream,))
            )
            assert segments == expected, (stream, segments)
        done = db.execute(
            "SELECT stem, COUNT(*) FROM units WHERE state = 'done' GROUP BY stem"
        ).fetchall()
    assert dict(done) == dict.fromkeys(expected, 1)


def test_a_disk_that_fills_during_worker_writes_and_commits_pauses_and_the_session_finishes(
    tmp_path: Path,
) -> None:
    # About 1 MiB free, and stacks of about 2.5 MB per micrograph: the first worker's stack
    # write fails in the middle (and later commits' STAR appends or journal writes).
    with service_on_a_full_disk(tmp_path, free_bytes=1 << 20) as disk:
        output, files, config, service = disk.output, disk.files, disk.config, disk.service
        stems = [f"m{index}" for index in range(6)]
        for index, stem in enumerate(stems):
            mic = synthetic_micrograph(512, BIG, rng=index)
            write_micrograph(files.staging / f"{stem}.mrc", mic.image, 1.0)
            write_coordinates_star(files.picks / f"{stem}_autopick.star", mic.picks)
            shutil.copyfile(files.staging / f"{stem}.mrc", files.micrographs / f"{stem}.mrc")
        wait_for(lambda: "disk full" in service.output(), 120, "the service to see ENOSPC")
        wait_for(lambda: healthz(config)[0] == 503, 60, "/healthz to answer 503")
        assert "disk full" in healthz(config)[1]
        # the alert event, as the metrics saw it
        assert _metric(config, 'flybox_alert_active{rule="disk_full"}') == 1.0
        with urllib.request.urlopen(f"{http_base(config)}/api/status", timeout=10) as response:
            status = json.load(response)
        assert status["health"]["disk_full"] is True, status["health"]
        assert service.alive(), service.output()
        assert committed_rows(output) < len(stems) * BIG
        # a stack write (or a STAR append) ran out of space, not the journal; the units
        # that hit it wait for space (they are not failed)
        full = next(line for line in service.output().splitlines() if "disk full (" in line)
        assert "OSError: [Errno 28] No space left on device" in full, full
        disk.filler.unlink()
        wait_for(
            lambda: both_streams_committed(output, len(stems) * BIG),
            180,
            "every particle after space returned",
        )
        resumed = next(
            line for line in service.output().splitlines() if "committing resumes" in line
        )
        assert "(0 micrographs waiting)" not in resumed, resumed
        wait_for(lambda: healthz(config)[0] == 200, 30, "/healthz to recover")
        assert _metric(config, 'flybox_alert_active{rule="disk_full"}') == 0.0
        assert service.terminate() == 0, service.output()
        expected = {
            stem: len(read_coordinates(files.picks / f"{stem}_autopick.star")) for stem in stems
        }
        check_outputs(output, expected)
        _check_journal(output, expected)
        for stream in ("particles", "particles_small"):
            relion_reads(output / f"{stream}.star", tmp_path)
        service.assert_no_leftovers()


def test_same_names_in_two_folders_and_binary_pick_files_get_records_of_their_own(
    tmp_path: Path,
) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    files = Inputs(inputs)
    config = write_config(tmp_path, inputs, output, ctf=False)
    text = config.read_text()
    text = text.replace(f'"{inputs}/Micrographs/*.mrc"', f'"{inputs}/Micrographs/**/*.mrc"')
    text = text.replace(
        f'coordinates = ["{inputs}/AutoPick/*_autopick.star"]',
        f'coordinates = ["{inputs}/AutoPick/*_autopick.star", "{inputs}/Picks/*.cbox", '
        f'"{inputs}/Picks/*.pos"]',
    )
    text = text.replace('coordinate_suffix = "_autopick.star"\n', "")
    config.write_text(text)
    service = ServiceProcess(config, tmp_path / "log")
    garbage = bytes(range(256)) * 64
    try:
        service.start()
        service.wait_running()
        # the same name in two folders, both unreadable: two records, one per file
        for folder in ("a", "b"):
            (files.micrographs / folder).mkdir()
            (files.micrographs / folder / "dup.mrc").write_bytes(garbage)
        # the same name in two folders, both valid: one is processed, the other set aside
        source, picks = files.source("same", seed=1)
        write_coordinates_star(files.picks / "same_autopick.star", picks)
        for folder in ("a", "b"):
            shutil.copyfile(source, files.micrographs / folder / "same.mrc")
        # binary garbage named like crYOLO and .pos pick files, with good micrographs
        (inputs / "Picks").mkdir()
        for stem, suffix in (("cb", ".cbox"), ("po", ".pos")):
            source, _ = files.source(stem, seed=2 if stem == "cb" else 3)
            shutil.copyfile(source, files.micrographs / f"{stem}.mrc")
            (inputs / "Picks" / f"{stem}{suffix}").write_bytes(garbage)
        files.add("good", seed=4)

        def paths() -> dict[str, dict[str, str]]:
            found = {}
            for record in (output / "quarantine").glob("*.json"):
                content = json.loads(record.read_text())
                found[content["path"]] = content
            return found

        wanted = {
            str(files.micrographs / "a" / "dup.mrc"),
            str(files.micrographs / "b" / "dup.mrc"),
            str(inputs / "Picks" / "cb.cbox"),
            str(inputs / "Picks" / "po.pos"),
        }
        wait_for(lambda: wanted <= set(paths()), 90, f"records of {sorted(wanted)}")
        wait_for(lambda: committed_rows(output) == 2 * PARTICLES, 90, "same and good")
        found = paths()
        same = {p for p in found if p.endswith("same.mrc")}
        assert len(same) == 1, sorted(found)  # the other same.mrc was processed
        assert "same" in found[same.pop()]["reason"]
        for name in ("cb.cbox", "po.pos"):
            reason = found[str(inputs / "Picks" / name)]["reason"]
            assert "not a text file" in reason, reason
        assert service.alive(), service.output()
        assert service.terminate() == 0, service.output()
    finally:
        if service.alive():
            service.kill()
    check_outputs(output, {"same": PARTICLES, "good": PARTICLES})
    service.assert_no_leftovers()


def test_a_start_up_os_error_names_the_file_that_failed_not_the_configuration(
    tmp_path: Path,
) -> None:
    inputs = tmp_path / "inputs"
    Inputs(inputs)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder's parent should be\n")
    config = write_config(tmp_path, inputs, blocker / "output", ctf=False)
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    assert service.process is not None
    try:
        assert service.process.wait(60) == 1
    finally:
        if service.alive():
            service.kill()
    lines = [line for line in service.output().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, service.output()
    assert str(blocker / "output") in lines[0], lines
    assert str(config) not in lines[0], lines
    assert "Traceback" not in service.output()


def test_relative_paths_resolve_from_the_working_directory_as_the_readme_says(
    tmp_path: Path,
) -> None:
    work = tmp_path / "project"
    files = Inputs(work / "inputs")
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    config = write_config(elsewhere, Path("inputs"), Path("output"), ctf=False)
    service = ServiceProcess(config, tmp_path / "log", cwd=work)
    try:
        service.start()
        service.wait_running()
        files.add("rel", seed=1)
        wait_for(lambda: committed_rows(work / "output") == PARTICLES, 90, "the micrograph")
        assert service.terminate() == 0, service.output()
    finally:
        if service.alive():
            service.kill()
    assert f"relative paths are taken from the working directory {work}" in service.output()
    assert not (elsewhere / "output").exists()
    check_outputs(work / "output", {"rel": PARTICLES})
    star = (work / "output" / "particles.star").read_text()
    assert "output/Particles/rel.mrcs" in star  # from the project folder (the working dir)
