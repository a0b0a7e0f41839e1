"""Atomic writes: the final path holds either nothing, the old file, or the complete new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flybox.io.atomic import atomic_write, fsync_directory, rename_into_place, temp_path_for


def test_temp_path_is_hidden_tmp_in_same_folder(tmp_path: Path) -> None:
    final = tmp_path / "Particles" / "mic_001.mrcs"
    temp = temp_path_for(final)
    assert temp.parent == final.parent
    assert temp.name.startswith(".mic_001.mrcs.")
    assert temp.name.endswith(".tmp")
    assert temp != temp_path_for(final)


def test_atomic_write_binary_creates_complete_file(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with atomic_write(final) as fh:
        fh.write(b"abc")
        assert not final.exists()
    assert final.read_bytes() == b"abc"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_write_text_replaces_existing_file(tmp_path: Path) -> None:
    final = tmp_path / "out.star"
    final.write_text("old\n")
    with atomic_write(final, "w") as fh:
        fh.write("new ✓\n")
        assert final.read_text() == "old\n"
    assert final.read_text(encoding="utf-8") == "new ✓\n"


def write_then_fail(final: Path, exc: Exception) -> None:
    with atomic_write(final) as fh:
        fh.write(b"partial")
        raise exc


def test_exception_inside_atomic_write_leaves_no_final_and_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail(final, RuntimeError("boom"))
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_previous_version(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"v1")
    with pytest.raises(ValueError, match="bad"):
        write_then_fail(final, ValueError("bad"))
    assert final.read_bytes() == b"v1"
    assert list(tmp_path.iterdir()) == [final]


def test_atomic_write_rejects_append_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modes"), atomic_write(tmp_path / "x", "ab"):
        pass


def test_atomic_write_respects_umask_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "x") as fh:
            fh.write(b"1")
    finally:
        os.umask(old)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o644


def test_publish_renames_temp_onto_final(tmp_path: Path) -> None:
    final = tmp_path / "a.mrcs"
    temp = temp_path_for(final)
    temp.write_bytes(b"data")
    final.write_bytes(b"old")
    rename_into_place(temp, final)
    assert final.read_bytes() == b"data"
    assert not temp.exists()


def test_fsync_directory_accepts_folder(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_directory(tmp_path / "missing")
