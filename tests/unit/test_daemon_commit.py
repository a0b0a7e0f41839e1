"""Service-side commit: appends, replacements, optics groups, and repair after a crash."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from flybox.daemon.work.commit import Committer, remove_temporaries, rows_bytes
from flybox.daemon.work.journal import Journal, UnitRecord
from flybox.io.mrc import read_header, write_micrograph
from flybox.io.star import read_relion_star
from flybox.pipeline.chain import ChainSpec
from flybox.pipeline.job import JobResult, MicrographJob, run_job
from flybox.sim.microscope import synthetic_micrograph
from flybox.types import OpticsGroup

CHAIN = [
    {"step": "extract", "box": 32, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 32, "particles_small": 16}},
]
STREAMS = ["particles", "particles_small"]
GROUP = OpticsGroup(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


class Session:
    """A journal, a committer and a folder of synthetic micrographs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.output = root / "out"
        self.output.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.output / ".flybox" / "journal.sqlite")
        self.committer = Committer(self.output, self.journal, STREAMS)
        self.committer.recover()

    def reopen(self) -> Committer:
        self.journal.close()
        self.journal = Journal(self.output / ".flybox" / "journal.sqlite")
        self.committer = Committer(self.output, self.journal, STREAMS)
        self.committer.recover()
        return self.committer

    def result(
        self,
        stem: str,
        picks: int,
        *,
        seed: int = 0,
        pixel_size_a: float | None = None,
        **extra: object,
    ) -> tuple[UnitRecord, JobResult]:
        mic = synthetic_micrograph(256, picks, rng=seed)
        path = self.root / f"{stem}.mrc"
        write_micrograph(path, mic.image, 1.0)
        table = mic.picks
        for column, value in extra.items():
            table[column] = value
        job = MicrographJob(
            micrograph=str(path),
            name=str(path),
            output_dir=str(self.output),
            chain=ChainSpec.of(CHAIN),
            picks=table,
            optics=GROUP,
            pixel_size_a=pixel_size_a,
            project_dir=str(self.output),
        )
        unit = self.journal.add_unit(stem, str(path), f"key-{stem}-{picks}-{seed}", {})
        return unit, run_job(job)

    def commit(self, stem: str, picks: int, **options: object) -> UnitRecord:
        unit, result = self.result(stem, picks, **options)  # type: ignore[arg-type]
        self.committer.commit(unit, result, GROUP)
        return unit

    def rows(self, stream: str = "particles") -> pd.DataFrame:
        return read_relion_star(self.output / f"{stream}.star", "particles").rows

    def counts(self, stream: str = "particles") -> dict[str, int]:
        rows = self.rows(stream)
        return rows["rlnMicrographName"].map(lambda p: Path(str(p)).stem).value_counts().to_dict()


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(tmp_path)


def _file_matches_journal(session: Session) -> None:
    for stream, record in session.journal.star_files().items():
        assert (session.output / f"{stream}.star").stat().st_size == record.length


def test_commits_append_rows_after_a_fixed_header(session: Session) -> None:
    session.commit("a", 7)
    header = (session.output / "particles.star").read_bytes()[
        : session.committer.files["particles"].header_bytes
    ]
    session.commit("b", 5, seed=1)
    assert session.counts() == {"a": 7, "b": 5}
    assert session.counts("particles_small") == {"a": 7, "b": 5}
    assert (session.output / "particles.star").read_bytes().startswith(header)
    star = starfile.read(session.output / "particles.star")
    assert len(star["particles"]) == 12
    assert star["optics"]["rlnImageSize"].tolist() == [32]
    small = starfile.read(session.output / "particles_small.star")
    assert small["optics"]["rlnImagePixelSize"].tolist() == [2.0]
    _file_matches_journal(session)
    segments = session.journal.segments("particles")
    assert [(s.stem, s.particles) for s in segments] == [("a", 7), ("b", 5)]
    assert segments[1].offset == segments[0].length


def test_a_new_version_replaces_the_old_rows(session: Session) -> None:
    session.commit("a", 8)
    session.commit("b", 5, seed=1)
    session.commit("a", 3, seed=2)
    assert session.counts() == {"a": 3, "b": 5}
    rows = session.rows()
    names = rows.loc[rows["rlnMicrographName"].str.endswith("a.mrc"), "rlnImageName"].tolist()
    assert names == [f"{i:06d}@Particles/a.mrcs" for i in (1, 2, 3)]
    assert read_header(session.output / "Particles" / "a.mrcs").nz == 3
    record = session.journal.star_files()["particles"]
    assert (record.particles, record.micrographs, record.pending) == (8, 2, None)
    _file_matches_journal(session)
    assert not list(session.output.glob(".*.tmp"))


def test_a_new_version_without_particles_removes_rows_and_files(session: Session) -> None:
    session.commit("a", 4)
    session.commit("a", 0, seed=3)
    assert session.journal.star_files()["particles"].particles == 0
    assert session.rows().empty
    assert not (session.output / "Particles" / "a.mrcs").exists()


def test_a_different_pixel_size_gets_its_own_optics_group(session: Session) -> None:
    session.commit("a", 4)
    session.commit("b", 4, seed=1, pixel_size_a=2.0)
    star = starfile.read(session.output / "particles.star")
    optics = star["optics"]
    assert optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert optics["rlnImagePixelSize"].tolist() == [1.0, 2.0]
    groups = star["particles"].groupby("rlnOpticsGroup").size().to_dict()
    assert groups == {1: 4, 2: 4}


def test_rows_with_other_columns_are_conformed(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    session.commit("a", 3)
    with caplog.at_level(logging.WARNING):
        session.commit("b", 3, seed=1, rlnAutopickFigureOfMerit=0.5)
    assert "rlnAutopickFigureOfMerit" in caplog.text
    assert "rlnAutopickFigureOfMerit" not in session.rows().columns
    assert (
        "rlnAutopickFigureOfMerit"
        in read_relion_star(session.output / "Particles" / "b.star", "particles").rows
    )


def test_an_unfinished_append_is_cut_at_restart(session: Session) -> None:
    session.commit("a", 5)
    path = session.output / "particles.star"
    committed = path.read_bytes()
    with open(path, "ab") as handle:  # a crash after the append, before the journal
        handle.write(b"   1.0   2.0 000001@Particles/x.mrcs half a li")
    (session.output / "Particles" / ".x.mrcs.abc.tmp").write_bytes(b"partial")
    session.reopen()
    assert path.read_bytes() == committed
    assert not list(session.output.rglob("*.tmp"))
    session.commit("b", 2, seed=1)
    assert session.counts() == {"a": 5, "b": 2}


def test_a_rewrite_interrupted_before_its_rename_is_finished_at_restart(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    session.commit("a", 6)
    session.commit("b", 4, seed=1)

    def crash(record: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(session.committer, "_install", crash)
    unit, result = session.result("a", 2, seed=5)
    with pytest.raises(KeyboardInterrupt):
        session.committer.commit(unit, result, GROUP)
    assert session.journal.star_files()["particles"].pending is not None
    session.reopen()
    assert session.counts() == {"a": 2, "b": 4}
    assert session.journal.star_files()["particles"].pending is None
    _file_matches_journal(session)


def test_a_lost_file_is_rebuilt_from_the_micrograph_star_files(session: Session) -> None:
    session.commit("a", 3)
    session.commit("b", 4, seed=1, pixel_size_a=2.0)
    before = session.rows("particles_small")
    (session.output / "particles_small.star").unlink()
    session.reopen()
    assert session.counts("particles_small") == {"a": 3, "b": 4}
    rebuilt = session.rows("particles_small")
    assert (
        rebuilt["rlnOpticsGroup"].tolist() == before["rlnOpticsGroup"].tolist() == [1] * 3 + [2] * 4
    )
    _file_matches_journal(session)


def test_files_without_committed_rows_are_removed_at_restart(session: Session) -> None:
    (session.output / "particles.star").write_text("data_\n")
    (session.output / ".particles.star.123.tmp").write_text("x")
    session.reopen()
    assert not (session.output / "particles.star").exists()
    assert remove_temporaries(session.output, STREAMS) == 0


def test_rows_bytes_are_loop_lines_only() -> None:
    rows = pd.DataFrame({"rlnCoordinateX": [1.0, 2.0], "rlnImageName": ["1@a", "2@a"]})
    text = rows_bytes(rows).decode()
    assert text.count("\n") == 2
    assert "loop_" not in text
    assert np.allclose([float(line.split()[0]) for line in text.splitlines()], [1.0, 2.0])
