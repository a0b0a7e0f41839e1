"""The completeness state machine, with a fake clock, and real probes of real files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flybox.daemon.intake.complete import (
    Completeness,
    FileState,
    Probe,
    Signature,
    Verdict,
    probe,
)
from flybox.io.mrc import MrcCompleteness, check_complete, write_micrograph

SETTLE, TIMEOUT = 1.0, 10.0


def _sig(size: int, mtime: int = 0, inode: int = 1, ctime: int = 0) -> Signature:
    return Signature(size, mtime, inode, ctime)


def _mrc(complete: bool, expected: int, actual: int, problem: str | None, info: bool = True):
    return MrcCompleteness(complete, expected, actual, object() if info else None, problem)  # type: ignore[arg-type]


@pytest.fixture
def rules() -> Completeness:
    return Completeness(SETTLE, TIMEOUT)


def test_complete_mrc_is_accepted_only_after_settling(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    look = Probe(_sig(2048), mrc=_mrc(True, 2048, 2048, None))
    assert rules.assess(state, look, 0.0).verdict is Verdict.PENDING
    assert rules.assess(state, look, 0.5).verdict is Verdict.PENDING
    assert rules.assess(state, look, 1.0).verdict is Verdict.COMPLETE


def test_growing_mrc_waits_and_each_change_restarts_the_settle_clock(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    now = 0.0
    for size in (1024, 1536, 2048):
        short = size < 2048
        look = Probe(
            _sig(size, mtime=size), mrc=_mrc(not short, 2048, size, "truncated" if short else None)
        )
        assert rules.assess(state, look, now).verdict is Verdict.PENDING
        now += 0.9
    assert rules.assess(state, look, now - 0.1).verdict is Verdict.PENDING  # 0.8 s stable
    assert rules.assess(state, look, now + 0.2).verdict is Verdict.COMPLETE


def test_truncated_mrc_is_quarantined_after_the_timeout_without_change(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    look = Probe(_sig(1500), mrc=_mrc(False, 2048, 1500, "truncated: 1500 of 2048 bytes"))
    assert rules.assess(state, look, 0.0).verdict is Verdict.PENDING
    assert rules.assess(state, look, 9.9).verdict is Verdict.PENDING
    decision = rules.assess(state, look, 10.0)
    assert decision.verdict is Verdict.QUARANTINE
    assert decision.reason == "truncated: 1500 of 2048 bytes"
    assert decision.code == "truncated_mrc"


def test_invalid_header_is_quarantined_once_stable(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    look = Probe(
        _sig(4096), mrc=_mrc(False, 0, 4096, "not an MRC file (bad MAP id b'XXXX')", info=False)
    )
    assert rules.assess(state, look, 0.0).verdict is Verdict.PENDING
    decision = rules.assess(state, look, 1.0)
    assert decision.verdict is Verdict.QUARANTINE
    assert decision.code == "invalid_mrc"
    assert decision.reason is not None
    assert decision.reason.startswith("invalid MRC header: not an MRC file")


def test_oversized_and_unreadable_files_are_quarantined_once_stable(rules: Completeness) -> None:
    big = FileState("b.mrc", "micrograph")
    look = Probe(
        _sig(3000), mrc=_mrc(False, 2048, 3000, "file is 952 bytes larger than its header says")
    )
    rules.assess(big, look, 0.0)
    assert rules.assess(big, look, 1.0).code == "oversized_mrc"
    locked = FileState("c.mrc", "micrograph")
    look = Probe(_sig(3000), mrc=_mrc(False, 0, 3000, "cannot read: Permission denied", info=False))
    rules.assess(locked, look, 0.0)
    decision = rules.assess(locked, look, 1.0)
    assert (decision.code, decision.reason) == ("unreadable", "unreadable: Permission denied")


def test_short_header_is_waited_for_then_quarantined(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    look = Probe(
        _sig(100), mrc=_mrc(False, 0, 100, "only 100 bytes, shorter than an MRC header", info=False)
    )
    assert rules.assess(state, look, 0.0).verdict is Verdict.PENDING
    assert rules.assess(state, look, 5.0).verdict is Verdict.PENDING
    assert rules.assess(state, look, 10.0).code == "truncated_mrc"


def test_a_decided_file_that_changes_is_evaluated_again(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    bad = Probe(_sig(3000), mrc=_mrc(False, 2048, 3000, "larger"))
    rules.assess(state, bad, 0.0)
    assert rules.assess(state, bad, 1.0).verdict is Verdict.QUARANTINE
    assert rules.assess(state, bad, 50.0).verdict is Verdict.QUARANTINE  # stays decided
    chmod = Probe(_sig(3000, ctime=1), mrc=_mrc(True, 3000, 3000, None))  # ctime change counts
    assert rules.assess(state, chmod, 51.0).verdict is Verdict.PENDING
    assert rules.assess(state, chmod, 52.0).verdict is Verdict.COMPLETE


def test_text_file_is_parsed_after_settling_and_quarantined_if_it_never_parses(
    rules: Completeness,
) -> None:
    state = FileState("a_autopick.star", "coordinates")
    look = Probe(_sig(10))
    assert rules.assess(state, look, 0.0).verdict is Verdict.PENDING
    assert rules.assess(state, look, 1.0).verdict is Verdict.PARSE
    state.parse_failed("line 3: not a number", "bad_coordinates")
    assert rules.assess(state, look, 5.0).verdict is Verdict.PENDING
    decision = rules.assess(state, look, 10.0)
    assert (decision.verdict, decision.reason) == (Verdict.QUARANTINE, "line 3: not a number")


def test_text_file_that_parses_is_complete(rules: Completeness) -> None:
    state = FileState("a_autopick.star", "coordinates")
    rules.assess(state, Probe(_sig(10)), 0.0)
    assert rules.assess(state, Probe(_sig(10)), 2.0).verdict is Verdict.PARSE
    assert state.parsed().verdict is Verdict.COMPLETE
    assert rules.assess(state, Probe(_sig(10)), 3.0).verdict is Verdict.COMPLETE


def test_vanished_file_is_gone(rules: Completeness) -> None:
    state = FileState("a.mrc", "micrograph")
    rules.assess(state, Probe(_sig(10)), 0.0)
    assert rules.assess(state, Probe(None), 1.0).verdict is Verdict.GONE


def test_probe_of_real_files(tmp_path: Path) -> None:
    path = tmp_path / "m.mrc"
    write_micrograph(path, np.zeros((16, 16), np.float32), 1.0)
    look = probe(str(path), "micrograph")
    assert look.signature is not None
    assert look.signature.size == 1024 + 16 * 16 * 4
    assert look.mrc is not None
    assert look.mrc.complete
    with open(path, "r+b") as handle:
        handle.truncate(1500)
    truncated = check_complete(path)
    assert truncated.problem == "truncated: 1500 of 2048 bytes"
    assert probe(str(tmp_path / "missing.mrc"), "micrograph") == Probe(None)
    text = probe(str(path), "coordinates")
    assert text.mrc is None
    assert text.signature is not None
    assert text.signature.inode == os.stat(path).st_ino
