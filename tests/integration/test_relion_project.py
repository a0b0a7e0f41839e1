"""A RELION project folder end to end: ``flybox extract`` writes ``Extract/job005/`` and RELION,
run from the same folder, reads every file and classifies the particles without complaint.

The project is laid out as RELION 3.1 lays it out (``MotionCorr/job002/Movies/``,
``CtfFind/job003/micrographs_ctf.star``, ``AutoPick/job004/Movies/*_autopick.star``), with
micrographs from the project's simulator.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import starfile

from flybox.cli import main
from flybox.config import parse_config
from flybox.daemon.service import Service
from flybox.daemon.systemd import Notifier
from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.sim.microscope import _ctf_row, synthetic_micrograph, write_ctf_table
from tests.conftest import require_binary

pytestmark = pytest.mark.relion

PIXEL = 2.0


def relion_project(root: Path, micrographs: int = 2, particles: int = 20) -> None:
    """Micrographs, picks and a CTF table where RELION's jobs 002-004 would put them."""
    movies = root / "MotionCorr" / "job002" / "Movies"
    picks = root / "AutoPick" / "job004" / "Movies"
    movies.mkdir(parents=True)
    picks.mkdir(parents=True)
    (root / "CtfFind" / "job003").mkdir(parents=True)
    rows = []
    for index in range(micrographs):
        mic = synthetic_micrograph(
            512, particles, pixel_size_a=PIXEL, rng=index, edge_fraction=0.0, snr=0.5
        )
        name = f"MotionCorr/job002/Movies/mic{index:03d}.mrc"
        write_micrograph(root / name, mic.image, PIXEL)
        write_coordinates_star(picks / f"mic{index:03d}_autopick.star", mic.picks)
        rows.append(_ctf_row(name, mic.ctf))
    write_ctf_table(root / "CtfFind" / "job003" / "micrographs_ctf.star", rows, PIXEL)


def relion(command: list[str], cwd: Path) -> str:
    """Run a RELION program from the project folder; its output (stdout + stderr)."""
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ERROR" not in output, output
    return output


def test_relion_reads_and_classifies_what_flybox_extract_writes_in_a_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image_handler = require_binary("relion_image_handler")
    refine = require_binary("relion_refine")
    project = tmp_path / "project"
    relion_project(project)
    monkeypatch.chdir(project)
    code = main(
        [
            "extract",
            "--no-progress",
            "--workers",
            "1",
            "--micrographs",
            "CtfFind/job003/micrographs_ctf.star",
            "--coords",
            "AutoPick/job004/",
            "--coord-suffix",
            "_autopick.star",
            "-o",
            "Extract/job005/",
            "--box",
            "64",
            "--fcrop-small",
            "32",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "extracted 2 micrographs" in out.out
    rows = starfile.read(project / "Extract/job005/particles.star")["particles"]
    assert rows["rlnImageName"].iloc[0] == "000001@Extract/job005/Particles/mic000.mrcs"
    assert rows["rlnMicrographName"].iloc[0] == "MotionCorr/job002/Movies/mic000.mrc"
    relion_reads_and_classifies(project, "Extract/job005", image_handler, refine)


def relion_reads_and_classifies(project: Path, job: str, image_handler: str, refine: str) -> None:
    """From the project folder: ``relion_image_handler --stats`` on both sets, then one
    iteration of 2D classification with ``--ctf``, without error or normalisation warning."""
    for star in ("particles.star", "particles_small.star"):
        stats = relion([image_handler, "--i", f"{job}/{star}", "--stats"], project)
        assert "Cannot read" not in stats
    (project / "Class2D" / "job006").mkdir(parents=True)
    classify = relion(
        [
            refine,
            "--i",
            f"{job}/particles.star",
            "--o",
            "Class2D/job006/run",
            "--K",
            "2",
            "--iter",
            "1",
            "--tau2_fudge",
            "2",
            "--particle_diameter",
            "80",
            "--ctf",
            "--zero_mask",
            "--psi_step",
            "30",
            "--offset_range",
            "2",
            "--offset_step",
            "2",
            "--oversampling",
            "0",
            "--pool",
            "10",
            "--j",
            "1",
            "--random_seed",
            "1",
            "--dont_combine_weights_via_disc",
        ],
        project,
    )
    assert "have not been normalised" not in classify
    assert (project / "Class2D/job006/run_it001_data.star").is_file()


async def test_relion_reads_and_classifies_what_the_service_writes_in_a_project(
    tmp_path: Path,
) -> None:
    image_handler = require_binary("relion_image_handler")
    refine = require_binary("relion_refine")
    project = tmp_path / "project"
    relion_project(project)
    config = parse_config(
        {
            "session": {
                "name": "relion-project",
                "output": str(project / "External" / "job005"),
                "project_dir": str(project),
            },
            "watch": {
                "micrographs": [str(project / "MotionCorr/job002/Movies/*.mrc")],
                "coordinates": [str(project / "AutoPick/job004/Movies/*_autopick.star")],
                "coordinate_suffix": "_autopick.star",
                "ctf": str(project / "CtfFind/job003/micrographs_ctf.star"),
                "settle_seconds": 0.1,
                "rescan_seconds": 0.5,
            },
            "chain": [
                {"step": "extract", "box": 64},
                {"step": "fourier_crop", "outputs": {"particles": 64, "particles_small": 32}},
                {"step": "normalize", "method": "ramp"},
            ],
            "executor": {"workers": 1},
        }
    )
    service = Service(config, notifier=Notifier({}), telemetry=False)
    async with service:
        async with asyncio.timeout(120):
            while service.status_snapshot().counts.done < 2:
                await asyncio.sleep(0.2)
        service.stop()
    rows = starfile.read(project / "External/job005/particles.star")["particles"]
    assert set(rows["rlnImageName"].str.split("@").str[1]) == {
        f"External/job005/Particles/mic00{i}.mrcs" for i in range(2)
    }
    assert rows["rlnMicrographName"].iloc[0].startswith("MotionCorr/job002/Movies/mic00")
    relion_reads_and_classifies(project, "External/job005", image_handler, refine)
