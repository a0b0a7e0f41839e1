"""Pairing micrographs, coordinates and CTF in every arrival order."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from flybox.daemon.intake.pairing import (
    CoordinatesInput,
    MicrographInput,
    Pairing,
    micrograph_stem,
)
from flybox.errors import DuplicateStemError
from flybox.types import CtfParams

PICKS = pd.DataFrame({"rlnCoordinateX": [10.0], "rlnCoordinateY": [20.0]})
CTF = CtfParams(10000.0, 11000.0, 30.0, 300.0, 2.7, 0.1)


def _mic(path: str = "/in/Micrographs/mic001.mrc", at: float = 0.0) -> MicrographInput:
    return MicrographInput(path, "sha256:mic", at)


def _coords(path: str = "/in/AutoPick/mic001_autopick.star", digest: str = "a") -> CoordinatesInput:
    return CoordinatesInput(path, digest, PICKS, 0.0)


@pytest.mark.parametrize("order", list(itertools.permutations(["mic", "coords", "ctf"])))
def test_inputs_pair_in_any_arrival_order(order: tuple[str, ...]) -> None:
    pairing = Pairing(needs_ctf=True, coordinate_suffix="_autopick.star")
    for index, what in enumerate(order):
        if what == "mic":
            changed = {pairing.set_micrograph(_mic())}
        elif what == "coords":
            changed = {pairing.set_coordinates(_coords())}
        else:
            changed = pairing.set_ctf_source("/in/ctf.star", {"Micrographs/mic001.mrc": CTF})
        ready = [stem for stem in changed if pairing.pair(stem) is not None]
        assert ready == (["mic001"] if index == 2 else [])
    pair = pairing.pair("mic001")
    assert pair is not None
    assert pair.ctf == CTF
    assert pair.coordinates.path.endswith("mic001_autopick.star")


def test_without_a_ctf_source_micrograph_and_coordinates_are_enough() -> None:
    pairing = Pairing(needs_ctf=False, coordinate_suffix=None)
    pairing.set_coordinates(_coords("/in/mic001.box"))
    assert pairing.missing("mic001") is None  # no micrograph yet: nothing is waiting
    pairing.set_micrograph(_mic())
    pair = pairing.pair("mic001")
    assert pair is not None
    assert pair.ctf is None


def test_missing_inputs_are_named() -> None:
    pairing = Pairing(needs_ctf=True, coordinate_suffix="_autopick.star")
    pairing.set_micrograph(_mic())
    assert pairing.missing("mic001") == "coordinates"
    pairing.set_coordinates(_coords())
    assert pairing.missing("mic001") == "ctf"
    assert pairing.pair("mic001") is None


def test_rewritten_coordinates_replace_the_old_ones() -> None:
    pairing = Pairing(needs_ctf=False, coordinate_suffix="_autopick.star")
    pairing.set_micrograph(_mic())
    pairing.set_coordinates(_coords(digest="old"))
    pairing.set_coordinates(_coords(digest="new"))
    pair = pairing.pair("mic001")
    assert pair is not None
    assert pair.coordinates.digest == "new"


def test_ctf_updates_report_only_changed_stems() -> None:
    pairing = Pairing(needs_ctf=True, coordinate_suffix="_autopick.star")
    pairing.set_micrograph(_mic())
    pairing.set_micrograph(_mic("/in/Micrographs/mic002.mrc"))
    first = pairing.set_ctf_source("/in/ctf.star", {"Micrographs/mic001.mrc": CTF})
    assert first == {"mic001"}
    grown = {"Micrographs/mic001.mrc": CTF, "Micrographs/mic002.mrc": CTF}
    assert pairing.set_ctf_source("/in/ctf.star", grown) == {"mic002"}
    assert pairing.set_ctf_source("/in/ctf.star", grown) == set()


def test_ambiguous_ctf_names_match_nothing() -> None:
    pairing = Pairing(needs_ctf=True, coordinate_suffix=None)
    pairing.set_micrograph(_mic())
    pairing.set_ctf_source("/a.star", {"a/mic001.mrc": CTF, "b/mic001.mrc": CTF})
    assert pairing.ctf_for("mic001") is None
    pairing.set_ctf_source("/a.star", {"/in/Micrographs/mic001.mrc": CTF, "b/mic001.mrc": CTF})
    assert pairing.ctf_for("mic001") == CTF  # the exact path wins


def test_two_micrographs_with_one_stem_collide() -> None:
    pairing = Pairing(needs_ctf=False)
    pairing.set_micrograph(_mic("/in/a/mic001.mrc"))
    with pytest.raises(DuplicateStemError, match="outputs would collide"):
        pairing.set_micrograph(_mic("/in/b/mic001.mrc"))
    assert pairing.remove_micrograph("/in/b/mic001.mrc") is None
    assert pairing.remove_micrograph("/in/a/mic001.mrc") == "mic001"


def test_overdue_micrographs_are_reported_once_per_missing_input() -> None:
    pairing = Pairing(needs_ctf=True, coordinate_suffix="_autopick.star")
    pairing.set_micrograph(_mic(at=0.0))
    assert pairing.overdue(5.0, 10.0) == []
    late = pairing.overdue(11.0, 10.0)
    assert [(item.path, missing) for item, missing, _ in late] == [
        ("/in/Micrographs/mic001.mrc", "coordinates")
    ]
    assert pairing.overdue(12.0, 10.0) == []
    pairing.set_coordinates(_coords())
    assert [missing for _, missing, _ in pairing.overdue(13.0, 10.0)] == ["ctf"]


def test_stems_and_default_suffixes() -> None:
    assert micrograph_stem("/a/b/mic.001.mrc") == "mic.001"
    pairing = Pairing(needs_ctf=False)
    assert pairing.coordinates_stem("/x/mic001_autopick.star") == "mic001"
    assert pairing.coordinates_stem("/x/mic001.box") == "mic001"
    custom = Pairing(needs_ctf=False, coordinate_suffix="_picks.txt")
    assert custom.coordinates_stem("/x/mic001_picks.txt") == "mic001"
