"""The session store (saved as it happens, resumed on restart) and the export formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flybox.errors import ConfigError
from flybox.io.coords import read_coordinates
from flybox.pick.export import export_session
from flybox.pick.store import Pick, PickStore, StalePicksError
from tests.unit.pick.conftest import PARTICLE_SIZE


def test_picks_are_saved_at_once_and_a_restart_resumes(
    tmp_path: Path, micrograph_files: list[Path]
) -> None:
    folder = tmp_path / "Picks"
    store = PickStore(micrograph_files, folder, particle_size=PARTICLE_SIZE)
    store.set_picks(
        "mic1",
        [Pick(100.0, 120.0), Pick(300.5, 200.25, "auto", 0.875)],
        [Pick(50.0, 60.0, "auto", 0.4)],
        state="corrected",
    )
    store.update_session(last_micrograph="mic1", threshold=0.7)
    table = read_coordinates(folder / "mic1_manualpick.star")
    assert table["rlnCoordinateX"].tolist() == [100.0, 300.5]
    assert table["flyboxPickOrigin"].tolist() == ["manual", "auto"]
    assert table["rlnAutopickFigureOfMerit"].tolist() == [-1.0, 0.875]
    session = json.loads((folder / "picking.json").read_text())
    assert session["manual"] == 1
    assert session["automatic"] == 1
    assert session["discarded"] == 1
    assert session["last_micrograph"] == "mic1"
    assert session["labels_needed"] == 14

    again = PickStore(micrograph_files, folder)  # no --particle-size: the session's
    assert again.particle_size == PARTICLE_SIZE
    assert again.threshold == 0.7
    assert again.last_micrograph == "mic1"
    record = again.get("mic1")
    assert record.state == "corrected"
    assert record.picks == [Pick(100.0, 120.0), Pick(300.5, 200.25, "auto", 0.875)]
    assert record.discarded == [Pick(50.0, 60.0, "auto", 0.4)]
    assert record.etag == store.get("mic1").etag
    with pytest.raises(StalePicksError):
        again.set_picks("mic1", [], [], if_match='"old"')


def test_a_new_session_needs_a_particle_size(tmp_path: Path, micrograph_files: list[Path]) -> None:
    with pytest.raises(ConfigError, match="particle-size"):
        PickStore(micrograph_files, tmp_path / "Picks")


def test_existing_picks_are_imported_for_review(
    tmp_path: Path, micrograph_files: list[Path]
) -> None:
    picks = tmp_path / "AutoPick"
    picks.mkdir()
    (picks / "mic0.box").write_text("90\t100\t40\t40\n190\t200\t40\t40\n")
    store = PickStore(micrograph_files, tmp_path / "Picks", particle_size=40, picks=picks)
    record = store.get("mic0")
    assert [(p.x, p.y, p.origin) for p in record.picks] == [(110, 120, "auto"), (210, 220, "auto")]
    assert record.state == "proposed"
    assert store.get("mic1").picks == []


def test_export_writes_star_eman_box_and_xmipp_pos(
    tmp_path: Path, micrograph_files: list[Path]
) -> None:
    folder = tmp_path / "Picks"
    store = PickStore(micrograph_files, folder, particle_size=PARTICLE_SIZE)
    store.set_picks("mic0", [Pick(100.0, 120.0), Pick(200.0, 220.0, "auto", 0.9)], [])
    for fmt in ("star", "box", "pos"):
        assert export_session(folder, fmt, tmp_path / fmt) == 1  # type: ignore[arg-type]
        table = read_coordinates(tmp_path / fmt / f"mic0.{fmt}")
        assert table["rlnCoordinateX"].tolist() == [100.0, 200.0]
        assert table["rlnCoordinateY"].tolist() == [120.0, 220.0]
    box = (tmp_path / "box" / "mic0.box").read_text().split()
    assert box[:4] == ["76", "96", "48", "48"]
    assert table.attrs.get("box_size") in (None, 48)


def _proposals_file(folder: Path, name: str, xs: list[float]) -> Path:
    """An automatic picks file as the service writes them (origin ``auto``)."""
    from flybox.io.coords import write_coordinates_star
    from flybox.pick.store import ORIGIN_COLUMN
    from flybox.processors.extract import picks_frame

    path = folder / f"{name}_autopick.star"
    table = picks_frame(xs, [100.0] * len(xs)).assign(**{ORIGIN_COLUMN: "auto"})
    write_coordinates_star(path, table)
    return path


def test_in_the_service_unreviewed_proposals_never_become_labels(
    tmp_path: Path, micrograph_files: list[Path]
) -> None:
    # The service's picker (micrographs join with add_micrograph): proposals that nobody
    # reviewed stay proposals when the micrograph joins again, after a restart or because a
    # newer model picked it again, and are never training labels.
    folder, autopick = tmp_path / "Picks", tmp_path / "AutoPick"
    autopick.mkdir()
    store = PickStore([], folder, particle_size=PARTICLE_SIZE, allow_empty=True)
    mic0, mic1, mic2 = micrograph_files
    for path in micrograph_files:
        store.add_micrograph(path)
    assert store.set_proposals("mic0", [Pick(100.0, 100.0, "auto", 0.9)])  # Autopick all
    assert store.set_proposals("mic2", [Pick(150.0, 100.0, "auto", 0.8)])
    store.set_picks("mic1", [Pick(200.0, 100.0)], [])  # a review
    assert [r.name for r, _, _ in store.labels()] == ["mic1"]

    # A newer model picked mic2 again: its picks replace the proposals (and their file).
    store.add_micrograph(mic2, _proposals_file(autopick, "mic2", [300.0, 310.0]))
    assert store.get("mic2").state == "proposed"
    assert [p.x for p in store.get("mic2").picks] == [300.0, 310.0]
    assert not store.picks_path("mic2").exists()
    assert [r.name for r, _, _ in store.labels()] == ["mic1"]

    # Restart: mic0's saved proposals come back as proposals; new picks, when the service
    # has them, are shown instead.
    for picks, expected in ((None, [100.0]), (_proposals_file(autopick, "mic0", [5.0]), [5.0])):
        again = PickStore([], folder, allow_empty=True)
        for path in (mic1, mic2):
            again.add_micrograph(path)
        again.add_micrograph(mic0, picks)
        record = again.get("mic0")
        assert (record.state, [p.x for p in record.picks]) == ("proposed", expected)
        assert {p.origin for p in record.picks} == {"auto"}
        assert again.get("mic1").state == "picked"
        assert [r.name for r, _, _ in again.labels()] == ["mic1"]
