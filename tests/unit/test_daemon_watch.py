"""Glob matching, reconciliation scans and inotify hints on real folders."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flybox.daemon.intake.watch import Watcher, WatchUpdate, compile_pattern, is_temporary, scan


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/d/**/*.mrc", "/d/a.mrc", True),
        ("/d/**/*.mrc", "/d/x/y/a.mrc", True),
        ("/d/**/*.mrc", "/d/x/a.mrcs", False),
        ("/d/*.mrc", "/d/x/a.mrc", False),
        ("/d/mic_??.mrc", "/d/mic_01.mrc", True),
        ("/d/mic_[0-4]*.mrc", "/d/mic_5.mrc", False),
        ("/d/mic_[!0-4]*.mrc", "/d/mic_5.mrc", True),
        ("/d/Grid*/Data/*.mrc", "/d/Grid2/Data/a.mrc", True),
        ("/d/*.mrc", "/d/.a.mrc", False),
        ("/d/*.mrc", "/d/a.mrc.tmp", False),
        ("/d/*", "/d/a_downloading.mrc", False),
    ],
)
def test_glob_matching(pattern: str, path: str, matches: bool) -> None:
    assert compile_pattern("micrograph", pattern).matches(path) is matches


def test_pattern_roots_and_depths() -> None:
    deep = compile_pattern("micrograph", "/data/krios/**/*.mrc")
    assert (deep.root, deep.max_depth) == ("/data/krios", None)
    flat = compile_pattern("coordinates", "/data/picks/*_autopick.star")
    assert (flat.root, flat.max_depth) == ("/data/picks", 1)
    fixed = compile_pattern("ctf", "/data/ctf/micrographs_ctf.star")
    assert (fixed.root, fixed.max_depth) == ("/data/ctf", 1)


def test_temporary_names() -> None:
    assert is_temporary(".mic.mrc")
    assert is_temporary("mic.mrc.tmp")
    assert is_temporary("mic.mrc.Downloading")
    assert not is_temporary("mic.mrc")


def test_scan_lists_matching_files_with_their_kind(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/m1.mrc", "a/b/m2.mrc", "a/b/m2_autopick.star", ".hidden/m3.mrc", "a/.m4.mrc"):
        (tmp_path / name).write_bytes(b"x")
    patterns = [
        compile_pattern("micrograph", f"{tmp_path}/**/*.mrc"),
        compile_pattern("coordinates", f"{tmp_path}/**/*_autopick.star"),
    ]
    found = scan(patterns)
    assert {Path(p).relative_to(tmp_path).as_posix(): k for p, (k, _) in found.items()} == {
        "a/m1.mrc": "micrograph",
        "a/b/m2.mrc": "micrograph",
        "a/b/m2_autopick.star": "coordinates",
    }
    assert scan([compile_pattern("micrograph", f"{tmp_path}/missing/*.mrc")]) == {}


async def _next(watcher: Watcher, timeout: float = 10.0) -> WatchUpdate:
    return await asyncio.wait_for(watcher.next_update(), timeout)


async def test_inotify_hints_arrive_long_before_the_next_scan(tmp_path: Path) -> None:
    pattern = compile_pattern("micrograph", f"{tmp_path}/**/*.mrc")
    async with Watcher([pattern], mode="auto", rescan_seconds=600) as watcher:
        first = await _next(watcher)
        assert first.listing == {}
        (tmp_path / "sub").mkdir()
        await asyncio.sleep(0.5)  # the new folder is watched (recursive watch)
        (tmp_path / "sub" / "new.mrc").write_bytes(b"data")
        (tmp_path / "sub" / "ignored.txt").write_bytes(b"data")
        hints: dict[str, str] = {}
        while str(tmp_path / "sub" / "new.mrc") not in hints:
            update = await _next(watcher)
            hints.update(update.hints)
        assert str(tmp_path / "sub" / "ignored.txt") not in hints
        assert watcher.scans <= 2  # the first scan, and one for the new folder


async def test_folders_created_after_the_start_are_watched_without_waiting_for_a_scan(
    tmp_path: Path,
) -> None:
    # The session folder often appears after the service starts (two levels missing here).
    root = tmp_path / "session" / "MotionCorr"
    pattern = compile_pattern("micrograph", f"{root}/**/*.mrc")
    async with Watcher([pattern], mode="auto", rescan_seconds=600) as watcher:
        assert (await _next(watcher)).listing == {}
        root.mkdir(parents=True)
        await asyncio.sleep(1.0)  # each new level triggers a scan that watches the next one
        (root / "mic.mrc").write_bytes(b"data")
        seen: set[str] = set()
        while str(root / "mic.mrc") not in seen:
            update = await _next(watcher, timeout=5.0)
            seen.update(update.hints)
            seen.update(update.listing or {})
        assert watcher.scans < 10  # found through folder events, not the 600 s rescans


async def test_poll_mode_finds_files_by_scanning(tmp_path: Path) -> None:
    pattern = compile_pattern("micrograph", f"{tmp_path}/*.mrc")
    async with Watcher([pattern], mode="poll", poll_seconds=0.2) as watcher:
        assert (await _next(watcher)).listing == {}
        (tmp_path / "a.mrc").write_bytes(b"data")
        update = await _next(watcher)
        while not update.listing:
            update = await _next(watcher)
        assert list(update.listing) == [str(tmp_path / "a.mrc")]
        assert update.hints == {}
    assert all(t.get_name() != "watch-scan" for t in asyncio.all_tasks())
