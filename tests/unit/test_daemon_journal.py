"""The SQLite journal: units, versions, inputs, recovery, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from flybox.daemon.service import check_settings
from flybox.daemon.work.journal import Journal, SegmentRecord, StarFileRecord
from flybox.errors import ConfigError


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / ".flybox" / "journal.sqlite")


def test_journal_uses_wal_and_full_synchronous(journal: Journal) -> None:
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_new_inputs_make_new_versions_and_supersede_unfinished_ones(journal: Journal) -> None:
    first = journal.add_unit("mic1", "/in/mic1.mrc", "k1", {"coordinates": "a"})
    assert (first.version, first.state, first.attempts) == (1, "queued", 0)
    second = journal.add_unit("mic1", "/in/mic1.mrc", "k2", {})
    assert second.version == 2
    assert journal.unit(first.id).state == "superseded"
    assert journal.latest("mic1") == second
    assert journal.add_unit("mic2", "/in/mic2.mrc", "k3", {}).version == 1


def test_running_units_are_queued_again_on_recovery(journal: Journal) -> None:
    unit = journal.add_unit("mic1", "/in/mic1.mrc", "k1", {})
    journal.set_state(unit.id, "running", attempt=True)
    assert journal.recover() == 1
    again = journal.unit(unit.id)
    assert (again.state, again.attempts) == ("queued", 1)


def test_transient_failures_are_queued_again_at_start_deterministic_ones_are_not(
    journal: Journal,
) -> None:
    crashed = journal.add_unit("mic1", "/in/mic1.mrc", "k1", {})
    disk_full = journal.add_unit("mic2", "/in/mic2.mrc", "k2", {})
    too_big = journal.add_unit("mic3", "/in/mic3.mrc", "k3", {})
    for unit, code in ((crashed, "worker_crash"), (disk_full, "io_error"), (too_big, "processing")):
        for _ in range(3):
            journal.set_state(unit.id, "running", attempt=True)
        journal.set_state(unit.id, "failed", error="why", code=code)
    assert journal.retry_failed(("worker_crash", "io_error", "internal")) == 2
    after = [journal.unit(u.id) for u in (crashed, disk_full, too_big)]
    assert [(u.state, u.attempts) for u in after] == [("queued", 0), ("queued", 0), ("failed", 3)]
    assert journal.retry_failed(()) == 0


def test_done_units_become_current_with_their_segments(journal: Journal) -> None:
    unit = journal.add_unit("mic1", "/in/mic1.mrc", "k1", {})
    star = StarFileRecord("particles", "particles.star", "HEADER", ("a",), ({"x": 1},), 20, 3, 1)
    segment = SegmentRecord("particles", "mic1", unit.id, 0, 14, 3)
    journal.record_done(unit, {"picks": 3}, [star], [segment], [])
    assert journal.current("mic1") == journal.unit(unit.id)
    assert journal.unit(unit.id).result == {"picks": 3}
    assert journal.star_files()["particles"] == star
    assert journal.segment("particles", "mic1") == segment
    assert journal.stem_states() == {"mic1": "done"}


def test_removing_a_segment_shifts_the_later_ones(journal: Journal) -> None:
    units = [journal.add_unit(s, s, s, {}) for s in ("a", "b", "c")]
    segments = [
        SegmentRecord("particles", u.stem, u.id, 10 * i, 10, 1) for i, u in enumerate(units)
    ]
    star = StarFileRecord("particles", "particles.star", "H", (), (), 31, 3, 3)
    journal.record_done(units[0], {}, [star], segments, [])
    new_a = journal.add_unit("a", "a", "a2", {})
    journal.record_done(
        new_a, {}, [star], [SegmentRecord("particles", "a", new_a.id, 20, 10, 1)], [segments[0]]
    )
    assert [(s.stem, s.offset) for s in journal.segments("particles")] == [
        ("b", 0),
        ("c", 10),
        ("a", 20),
    ]


def test_inputs_and_units_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    journal.save_input("/in/a.mrc", "micrograph", "1:2:3:4", "sha256:x", "complete")
    journal.save_input(
        "/in/b.mrc", "micrograph", "5:6:7:8", None, "quarantined", "bad", "invalid_mrc"
    )
    unit = journal.add_unit("a", "/in/a.mrc", "k", {"x": 1})
    journal.close()
    again = Journal(path)
    record = again.input("/in/a.mrc")
    assert record is not None
    assert (record.fingerprint, record.state) == ("sha256:x", "complete")
    assert again.quarantined_inputs() == 1
    assert again.unit(unit.id).inputs == {"x": 1}
    again.close()


def test_an_output_folder_refuses_other_settings_once_it_has_particles(journal: Journal) -> None:
    out = Path("/out")
    check_settings(journal, "hash1", "{}", out)
    check_settings(journal, "hash2", "{}", out)  # nothing committed yet: allowed
    assert journal.get_meta("settings_hash") == "hash2"
    star = StarFileRecord("particles", "particles.star", "H", (), (), 1, 0, 0)
    unit = journal.add_unit("a", "a", "a", {})
    journal.record_done(unit, {}, [star], [], [])
    with pytest.raises(ConfigError, match="use a new \\[session\\] output folder"):
        check_settings(journal, "hash3", "{}", out)
    check_settings(journal, "hash2", "{}", out)
