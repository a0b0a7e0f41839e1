"""Issue 9's reproductions against the real service in a subprocess: no input, neighbour or
full disk stops it or loses a particle. Each bad input ends with a quarantine record and its
reason, later good micrographs are committed, and RELION reads the outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.sim.microscope import synthetic_micrograph
from tests.helpers.hardening import relion_reads, service_on_a_full_disk
from tests.helpers.service import (
    PARTICLES,
    Inputs,
    ServiceProcess,
    both_streams_committed,
    check_outputs,
    committed_rows,
    healthz,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def records(output: Path) -> dict[str, dict[str, str]]:
    """Quarantine records by the input's file name (as the record stores it)."""
    found = {}
    for path in (output / "quarantine").glob("*.json"):
        with open(path) as handle:
            content = json.load(handle)
        found[os.path.basename(content["path"])] = content
    return found


def test_no_bad_input_stops_the_service_and_each_is_quarantined_with_its_reason(
    tmp_path: Path,
) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    files = Inputs(inputs)
    config = write_config(tmp_path, inputs, output, ctf=False)
    service = ServiceProcess(config, tmp_path / "log")
    expected: dict[str, str] = {}
    try:
        service.start()
        service.wait_running()
        # (2) a picks STAR file with a duplicated column
        files.add("dupcol", seed=1)
        (files.picks / "dupcol_autopick.star").write_text(
            "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
            "100 101 102\n200 201 202\n"
        )
        expected["dupcol_autopick.star"] = "appears twice"
        # (2) a name that is not UTF-8; a name too long for the outputs' temporary names
        files.add(os.fsdecode(b"mic\xff"), seed=2)
        expected["mic\\xff.mrc"] = "not valid UTF-8"
        source, _ = files.source("long", seed=3)  # its picks' name would not fit NAME_MAX
        shutil.copyfile(source, files.micrographs / ("L" * 240 + ".mrc"))
        expected["L" * 240 + ".mrc"] = "bytes long"
        # (3) a FIFO and a symbolic link to one, named like micrographs
        os.mkfifo(files.micrographs / "fifo.mrc")
        os.mkfifo(tmp_path / "elsewhere.fifo")
        (files.micrographs / "linked.mrc").symlink_to(tmp_path / "elsewhere.fifo")
        expected["fifo.mrc"] = "not a regular file (FIFO)"
        expected["linked.mrc"] = "not a regular file (FIFO)"
        # (4) a newline and another control character in a name
        files.add("new\nline", seed=4)
        expected["new\nline.mrc"] = "newline"
        files.add("bell\x07", seed=5)
        expected["bell\x07.mrc"] = "control character U+0007"
        # (5) one row of a million values in a coordinate file
        files.add("wide", seed=6)
        row = " ".join(["1.0"] * 1_000_000)
        (files.picks / "wide_autopick.star").write_text(
            f"data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{row}\n"
        )
        expected["wide_autopick.star"] = "longer than"
        # (8) non-finite pixels
        source, picks = files.source("nan", seed=7)
        image = synthetic_micrograph(512, PARTICLES, rng=7).image.copy()
        image[10:20, 10:20] = np.nan
        write_micrograph(files.staging / "nan.mrc", image, 1.0)
        write_coordinates_star(files.picks / "nan_autopick.star", picks)
        shutil.copyfile(files.staging / "nan.mrc", files.micrographs / "nan.mrc")
        expected["nan.mrc"] = "non-finite pixel values"
        # (10) extra columns of a picks file stay out of the particle STAR file
        source, picks = files.source("extra", seed=8)
        picks = picks.assign(rlnCtfImage="elsewhere/ctf.mrc")
        from flybox.io.star import write_star

        write_star(files.picks / "extra_autopick.star", {"": picks})
        shutil.copyfile(source, files.micrographs / "extra.mrc")
        # later good micrographs
        for index in range(3):
            files.add(f"good{index}", seed=20 + index)
        wait_for(
            lambda: set(expected) <= set(records(output)),
            90,
            f"quarantine records of {sorted(expected)}",
        )
        wait_for(lambda: committed_rows(output) == 4 * PARTICLES, 90, "the good micrographs")
        assert service.alive(), service.output()
        # (2) the service restarts with these inputs in place (no crash on every start), and
        # (9) keeps every record, announcing nothing again for unchanged files
        assert service.terminate() == 0, service.output()
        before = records(output)
        service.start()
        service.wait_running()
        wait_for(lambda: committed_rows(output) == 4 * PARTICLES, 60, "the committed state")
        assert service.alive(), service.output()
        assert service.terminate() == 0, service.output()
    finally:
        if service.alive():
            service.kill()
    log = service.output()
    found = records(output)
    assert set(found) == set(before)
    for name, reason in expected.items():
        assert reason in found[name]["reason"], (name, found[name])
    assert "out of quarantine" not in log
    second = log[log.rindex(": running (") :]
    assert ": quarantined: " not in second, second
    # (4) names are escaped in the log: one line per event
    assert "new\\nline.mrc: quarantined: file name contains a newline" in log
    check_outputs(output, {**{f"good{i}": PARTICLES for i in range(3)}, "extra": PARTICLES})
    header = (output / "particles.star").read_text()
    assert "rlnCtfImage" not in header
    for stream in ("particles", "particles_small"):
        relion_reads(output / f"{stream}.star", tmp_path)
    service.assert_no_leftovers()


def test_a_second_service_on_the_same_output_is_refused_and_the_first_goes_on(
    tmp_path: Path,
) -> None:
    inputs, output = tmp_path / "inputs", tmp_path / "output"
    files = Inputs(inputs)
    first = ServiceProcess(write_config(tmp_path, inputs, output, ctf=False), tmp_path / "log1")
    other = tmp_path / "other"
    other.mkdir()
    second = ServiceProcess(write_config(other, inputs, output, ctf=False), tmp_path / "log2")
    try:
        first.start()
        first.wait_running()
        files.add("one", seed=1)
        second.start()
        assert second.process is not None
        assert second.process.wait(60) == 2
        refusal = [line for line in second.output().splitlines() if "in use by" in line]
        assert len(refusal) == 1, second.output()
        assert f"pid {first.process.pid if first.process else 0} on " in refusal[0]
        assert "started " in refusal[0]
        files.add("two", seed=2)
        wait_for(lambda: committed_rows(output) == 2 * PARTICLES, 90, "both micrographs")
        assert first.alive()
        assert first.terminate() == 0, first.output()
    finally:
        for service in (first, second):
            if service.alive():
                service.kill()
    check_outputs(output, {"one": PARTICLES, "two": PARTICLES})
    first.assert_no_leftovers()


def test_an_output_folder_inside_the_watched_tree_is_refused(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    Inputs(inputs)
    config = write_config(tmp_path, inputs, inputs / "AutoPick", ctf=False)
    service = ServiceProcess(config, tmp_path / "log")
    service.start()
    assert service.process is not None
    try:
        assert service.process.wait(60) == 2
    finally:
        if service.alive():
            service.kill()
    assert "session.output: " in service.output()
    assert "inside the watched tree" in service.output()


def test_a_full_disk_pauses_commits_and_the_session_finishes_when_space_returns(
    tmp_path: Path,
) -> None:
    with service_on_a_full_disk(tmp_path) as disk:  # every byte: nothing fits until it is freed
        output, service = disk.output, disk.service
        stems = [f"m{index}" for index in range(8)]
        for index, stem in enumerate(stems):
            disk.files.add(stem, seed=index)
        wait_for(lambda: "disk full" in service.output(), 90, "the service to see ENOSPC")
        assert service.alive(), service.output()
        code, body = healthz(disk.config)
        assert code == 503, body
        assert "disk full" in body
        disk.filler.unlink()
        wait_for(
            lambda: both_streams_committed(output, len(stems) * PARTICLES),
            120,
            "every particle after space returned",
        )
        assert "committing resumes" in service.output()
        assert healthz(disk.config)[0] == 200
        assert service.terminate() == 0, service.output()
        check_outputs(output, dict.fromkeys(stems, PARTICLES))
        relion_reads(output / "particles.star", tmp_path)
        service.assert_no_leftovers()
