"""Dask executor pieces that need no cluster: the ``[executor] address`` check, the worker
fingerprint and its verdict, task keys and per-attempt temporary files, the status fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from flybox.config.models import ExecutorConfig
from flybox.daemon.telemetry.events import ExecutorStatus, StatusEvent
from flybox.daemon.telemetry.progress import Progress
from flybox.pipeline.dask import (
    discard_attempt,
    fingerprint,
    judge,
    mismatch,
    tagged,
    task_key,
)
from flybox.pipeline.job import MicrographJob


@pytest.mark.parametrize("address", ["local", "tcp://127.0.0.1:8786", "tls://[::1]:8786", None])
def test_executor_addresses_that_are_accepted(address: str | None) -> None:
    assert ExecutorConfig(address=address).address == address


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "http://h:1", "tcp://h", "tcp://h:0"])
def test_executor_addresses_that_are_refused_say_what_to_give(address: str) -> None:
    with pytest.raises(ValueError, match=r"tcp://host:port"):
        ExecutorConfig(address=address)


def test_fingerprint_names_version_plugins_and_python() -> None:
    mine = fingerprint()
    assert set(mine) == {"flybox", "plugins", "python"}
    assert "extract=flybox.processors.extract:ExtractStep" in mine["plugins"]
    assert mismatch(mine, dict(mine)) is None
    other = {**mine, "flybox": "9.9"}
    assert "flybox '9.9'" in (mismatch(mine, other) or "")


def test_judge_refuses_other_versions_and_workers_without_flybox() -> None:
    mine = fingerprint()
    replies = {
        "tcp://a:1": dict(mine),
        "tcp://b:1": {**mine, "plugins": "extract=elsewhere:Step"},
        "tcp://c:1": ModuleNotFoundError("No module named 'flybox'"),
    }
    accepted, refused = judge(mine, set(replies), replies)
    assert accepted == {"tcp://a:1"}
    assert refused == ["tcp://b:1", "tcp://c:1"]


def test_every_submission_gets_its_own_key_and_temporary_names(tmp_path: Path) -> None:
    job = MicrographJob(
        micrograph=str(tmp_path / "mic1.mrc"),
        name="mic1.mrc",
        output_dir=str(tmp_path / "out"),
        chain=None,  # type: ignore[arg-type]
        unit="0123456789abcdef-2",
    )
    first, second = task_key(job), task_key(job)
    assert first != second
    assert first.startswith("flybox-0123456789abcdef-2-")
    a, b = tagged(job, first), tagged(job, second)
    assert a.temp_tag != b.temp_tag
    # What a worker that died mid-task leaves behind is found by its tag, and only that.
    folder = tmp_path / "out" / "Particles"
    folder.mkdir(parents=True)
    mine = folder / f".mic1.mrcs.{a.temp_tag}.tmp"
    star = tmp_path / "out" / "Particles" / f".mic1.star.{a.temp_tag}.tmp"
    theirs = folder / f".mic1.mrcs.{b.temp_tag}.tmp"
    final = folder / "mic1.mrcs"
    for path in (mine, star, theirs, final):
        path.write_bytes(b"x")
    assert discard_attempt(a) == 2
    assert not mine.exists()
    assert not star.exists()
    assert theirs.exists()
    assert final.exists()


def test_status_shows_the_executor() -> None:
    progress = Progress("s", ["particles"], 2)
    assert progress.snapshot("running").executor == ExecutorStatus()
    progress.executor = lambda: ExecutorStatus(kind="dask", connected=False, workers=3)
    event = progress.snapshot("running")
    assert event.executor.kind == "dask"
    assert not event.executor.connected
    parsed = StatusEvent.model_validate_json(event.model_dump_json())
    assert parsed.executor.workers == 3
