"""Issue 9's smaller guarantees, in-process: heartbeats, disk-full detection, the output
lock, quarantine record names, input-name checks, configuration bounds."""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from flybox.config import FlyboxConfig
from flybox.daemon.intake.quarantine import (
    clear_quarantine,
    name_problem,
    quarantine_path,
    shown,
    write_quarantine,
)
from flybox.daemon.lock import OutputLock, OutputLockedError
from flybox.daemon.state import Heartbeats, is_disk_full
from flybox.daemon.work.journal import Journal
from flybox.errors import ConfigError


def test_a_loop_without_beats_is_stalled() -> None:
    beats = Heartbeats()
    beats.register("intake", 10.0)
    beats.register("work", 10.0)
    now = beats._last["intake"]
    beats._last["work"] = now + 15.0
    assert beats.stalled(now + 11.0) == {"intake": 11.0}
    beats.unregister("intake")
    assert beats.stalled(now + 11.0) == {}


def test_disk_full_errors_are_recognised() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert is_disk_full(wrapped)


def test_the_output_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    with (
        OutputLock(tmp_path),
        pytest.raises(OutputLockedError, match=r"in use by .*pid \d+ on .*started "),
    ):
        OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path):  # released with the first
        pass


def test_quarantine_records_of_two_inputs_with_one_name_do_not_collide(tmp_path: Path) -> None:
    first = write_quarantine(tmp_path, "/in/a/dup.mrc", "micrograph", "bad a", "x", "1")
    second = write_quarantine(tmp_path, "/in/b/dup.mrc", "micrograph", "bad b", "x", "2")
    assert first.name == "dup.mrc.json"
    assert second != first
    assert json.loads(first.read_text())["reason"] == "bad a"
    assert json.loads(second.read_text())["reason"] == "bad b"
    assert quarantine_path(tmp_path, "/in/b/dup.mrc") == second
    assert clear_quarantine(tmp_path, "/in/b/dup.mrc")
    assert first.exists()
    assert not second.exists()


def test_quarantine_records_of_odd_names_fit_the_file_system(tmp_path: Path) -> None:
    for name in ("L" * 250 + ".mrc", "new\nline.mrc", "mic\udcff.mrc"):
        record = write_quarantine(tmp_path, f"/in/{name}", "micrograph", "bad", "x", None)
        assert len(record.name.encode()) <= 200
        assert record.name.isprintable()
        assert json.loads(record.read_text())["reason"] == "bad"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("ok.mrc", None),
        ("new\nline.mrc", "newline"),
        ("tab\there.mrc", "tab"),
        ("bell\x07.mrc", "U+0007"),
        ("c1\x85.mrc", "U+0085"),
        ("mic\udcff.mrc", "not valid UTF-8"),
        ("L" * 201 + ".mrc", "bytes long"),
    ],
)
def test_names_relion_cannot_carry_are_refused(name: str, problem: str | None) -> None:
    found = name_problem(f"/in/{name}")
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_names_are_escaped_for_one_log_line() -> None:
    assert shown("/in/new\nline.mrc") == "/in/new\\nline.mrc"
    assert shown("/in/mic\udcff.mrc") == "/in/mic\\xff.mrc"
    assert shown("/in/plain.mrc") == "/in/plain.mrc"


def test_the_journal_stores_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    journal.save_input("/in/mic\udcff.mrc", "micrograph", "1:2:3:4", None, "quarantined", "bad")
    record = journal.input("/in/mic\udcff.mrc")
    assert record is not None
    assert record.state == "quarantined"
    journal.close()


def _config(**watch: object) -> dict[str, object]:
    return {
        "session": {"name": "s", "output": "/tmp/out"},
        "watch": {"micrographs": ["/tmp/in/*.mrc"], **watch},
    }


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("watch", {"settle_seconds": float("inf")}, "settle_seconds"),
        ("watch", {"rescan_seconds": 1e-9}, "rescan_seconds"),
        ("watch", {"incomplete_timeout_seconds": float("nan")}, "incomplete_timeout_seconds"),
        ("mqtt", {"topic_prefix": "site/#"}, "topic_prefix"),
        ("mqtt", {"topic_prefix": "site/+/x"}, "topic_prefix"),
        ("executor", {"workers": 512}, "workers"),
        ("executor", {"job_timeout_seconds": float("inf")}, "job_timeout_seconds"),
        ("executor", {"job_timeout_seconds": 0.01}, "job_timeout_seconds"),
        ("session", {"stall_seconds": 0}, "stall_seconds"),
    ],
)
def test_odd_settings_are_refused(section: str, values: dict[str, object], key: str) -> None:
    data = _config()
    if section == "watch":
        data = _config(**values)
    elif section == "session":
        data[section] = {**data[section], **values}
    else:
        data[section] = values
    with pytest.raises((ConfigError, ValueError), match=key):
        FlyboxConfig.model_validate(data)


def test_thousands_of_parser_warnings_on_one_file_make_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import warnings

    from flybox.daemon.intake.reading import _summarise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for row in range(5000):  # as pandas gives one per bad row
            warnings.warn(f"row {row}: value out of range", RuntimeWarning, stacklevel=1)
    with caplog.at_level(logging.WARNING, logger="flybox.daemon.intake.reading"):
        _summarise("/in/bad\nname.star", caught)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert line == (
        "/in/bad\\nname.star: 5000 warning(s) while parsing, first: RuntimeWarning: "
        "row 0: value out of range"
    )
