"""Paths in STAR files: relative to the project folder when inside it, absolute otherwise; read
relative to the project folder or to the STAR file's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from flybox.pipeline.layout import project_path, resolve_star_path


def test_paths_inside_the_project_are_relative_outside_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert project_path("Extract/job005/Particles/a.mrcs") == "Extract/job005/Particles/a.mrcs"
    assert project_path(tmp_path / "Extract" / "a.mrcs") == "Extract/a.mrcs"
    assert project_path("/elsewhere/a.mrcs") == "/elsewhere/a.mrcs"
    assert project_path("../sibling/a.mrcs") == f"{tmp_path.parent}/sibling/a.mrcs"
    project = tmp_path / "project"
    assert project_path(project / "Extract" / "a.mrcs", project) == "Extract/a.mrcs"
    assert project_path("Extract/a.mrcs", project) == f"{tmp_path}/Extract/a.mrcs"


def test_star_paths_are_found_relative_to_the_project_or_the_star_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "Extract").mkdir(parents=True)
    (project / "Extract" / "a.mrcs").write_bytes(b"")
    star = project / "Extract" / "particles.star"
    monkeypatch.chdir(project)
    assert resolve_star_path("Extract/a.mrcs", star) == project / "Extract" / "a.mrcs"
    assert resolve_star_path("a.mrcs", star) == project / "Extract" / "a.mrcs"  # STAR's folder
    monkeypatch.chdir(tmp_path)
    assert resolve_star_path("Extract/a.mrcs", star, project) == project / "Extract" / "a.mrcs"
    assert resolve_star_path("missing.mrcs", star) is None
    assert resolve_star_path(str(project / "Extract" / "a.mrcs"), star) is not None
