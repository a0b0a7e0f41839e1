"""The synthetic microscope: layout, non-atomic writes, ``flybox simulate``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from flybox.io.coords import read_coordinates
from flybox.io.ctf import read_micrographs_star
from flybox.io.mrc import check_complete
from flybox.sim.microscope import Acquisition, AcquisitionSettings, copy_slowly


def test_acquisition_writes_micrographs_picks_and_a_growing_ctf_table(tmp_path: Path) -> None:
    settings = AcquisitionSettings(
        micrographs=5, rate_per_minute=6000, size=128, particles=7, picks_first_every=2, pool=2
    )
    written = Acquisition(tmp_path, settings).run()
    assert [w.index for w in written] == list(range(5))
    for item in written:
        assert check_complete(item.path).complete
        assert len(read_coordinates(item.picks_path)) == item.picks == 7
    rows, groups, ctfs = read_micrographs_star(tmp_path / "micrographs_ctf.star")
    assert list(rows["rlnMicrographName"]) == [f"Micrographs/mic{i:04d}.mrc" for i in range(5)]
    assert groups[1].voltage_kv == 300.0
    assert len(ctfs) == 5


def test_micrographs_are_visible_while_incomplete(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 4000)
    target = tmp_path / "target.bin"
    sizes: list[int] = []
    writer = threading.Thread(
        target=copy_slowly, args=(source, target), kwargs={"chunks": 4, "pause_seconds": 0.2}
    )
    writer.start()
    while writer.is_alive():
        if target.exists():
            sizes.append(target.stat().st_size)
        time.sleep(0.05)
    assert target.read_bytes() == source.read_bytes()
    assert any(0 < size < 4000 for size in sizes)


def test_stop_ends_an_acquisition_early(tmp_path: Path) -> None:
    acquisition = Acquisition(
        tmp_path, AcquisitionSettings(micrographs=100, rate_per_minute=60, size=64)
    )
    runner = threading.Thread(target=acquisition.run)
    runner.start()
    time.sleep(0.5)
    acquisition.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert len(acquisition.written) < 100


def test_flybox_simulate_command(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flybox",
            "simulate",
            str(tmp_path),
            "--micrographs",
            "3",
            "--rate",
            "600",
            "--size",
            "128",
            "--particles",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "Micrographs").iterdir()) == [
        "mic0000.mrc",
        "mic0001.mrc",
        "mic0002.mrc",
    ]
    assert len(list((tmp_path / "AutoPick").glob("*_autopick.star"))) == 3
    assert "wrote 3 micrographs" in done.stderr
