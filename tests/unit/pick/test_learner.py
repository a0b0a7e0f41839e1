"""The learner: features, proposals, quality on synthetic data, and the model file."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from flybox.errors import InputError
from flybox.pick.features import FEATURE_NAMES, prepare, window_features
from flybox.pick.learner import LabelledMicrograph, non_maximum_suppression, train
from flybox.pick.model_file import load_model, save_model
from flybox.pick.synthetic import SyntheticMicrograph, match_picks
from tests.unit.pick.conftest import PARTICLE_SIZE


def _f1(model, mics: list[SyntheticMicrograph], threshold: float = 0.5) -> float:
    tp = fp = fn = 0
    for mic in mics:
        proposals = model.propose(prepare(mic.image, PARTICLE_SIZE), min_score=threshold)
        a, b, c = match_picks(proposals.xy, mic.particles, PARTICLE_SIZE)
        tp, fp, fn = tp + a, fp + b, fn + c
    return 2 * tp / (2 * tp + fp + fn)


def test_window_features_do_not_change_when_the_micrograph_is_rotated(
    synthetic_set: list[SyntheticMicrograph],
) -> None:
    prepared = prepare(synthetic_set[0].image[:512, :512], PARTICLE_SIZE)
    rotated = replace(
        prepared,
        coarse=np.rot90(prepared.coarse).copy(),
        fine=np.rot90(prepared.fine).copy(),
        log_stack=np.rot90(prepared.log_stack, axes=(1, 2)).copy(),
    )
    nx = prepared.coarse.shape[1]
    centres = np.array([[100, 120], [60, 200], [300, 301]])
    # rot90 (counter-clockwise) sends (x, y) to (y, nx − 1 − x).
    turned = np.stack([centres[:, 1], nx - 1 - centres[:, 0]], axis=1)
    correlation = np.zeros_like(prepared.coarse)
    a = window_features(prepared, correlation, centres)
    b = window_features(rotated, np.rot90(correlation).copy(), turned)
    assert a.shape == (3, len(FEATURE_NAMES))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_non_maximum_suppression_keeps_the_best_of_close_points() -> None:
    xy = np.array([[0.0, 0.0], [5.0, 0.0], [50.0, 0.0]])
    kept = non_maximum_suppression(xy, np.array([0.5, 0.9, 0.7]), distance=10)
    assert kept.tolist() == [1, 2]


def test_learner_after_one_correction_round_beats_the_quality_target(
    synthetic_set: list[SyntheticMicrograph],
) -> None:
    """Xmipp's loop: picks on one micrograph, autopick the second and correct it (wrong
    proposals discarded, missed particles added), retrain; judge on two others."""
    first, second, *tests = synthetic_set
    labelled = LabelledMicrograph("a", prepare(first.image, PARTICLE_SIZE), first.particles)
    model = train([labelled], PARTICLE_SIZE)
    prepared = prepare(second.image, PARTICLE_SIZE)
    proposals = model.propose(prepared, min_score=0.5)
    distance, _ = cKDTree(second.particles).query(proposals.xy)
    wrong = proposals.xy[distance > PARTICLE_SIZE / 2]
    corrected = LabelledMicrograph("b", prepared, second.particles, wrong)
    retrained = train([labelled, corrected], PARTICLE_SIZE)
    assert _f1(retrained, tests) >= 0.9


def test_training_refuses_fewer_than_fifteen_picks(
    synthetic_set: list[SyntheticMicrograph],
) -> None:
    mic = synthetic_set[0]
    example = LabelledMicrograph("a", prepare(mic.image, PARTICLE_SIZE), mic.particles[:14])
    with pytest.raises(ValueError, match="15"):
        train([example], PARTICLE_SIZE)


def test_model_file_round_trip_gives_the_same_proposals(
    tmp_path: Path, synthetic_set: list[SyntheticMicrograph]
) -> None:
    mic = synthetic_set[0]
    prepared = prepare(mic.image, PARTICLE_SIZE)
    model = train([LabelledMicrograph("a", prepared, mic.particles)], PARTICLE_SIZE)
    path = tmp_path / "model.flypick"
    save_model(path, model)
    loaded = load_model(path)
    assert loaded.particle_size == PARTICLE_SIZE
    target = prepare(synthetic_set[1].image, PARTICLE_SIZE)
    a, b = model.propose(target), loaded.propose(target)
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_allclose(a.score, b.score, atol=1e-9)
    with np.load(path, allow_pickle=False) as archive:
        assert int(archive["format_version"]) == 1
        assert float(archive["particle_size"]) == PARTICLE_SIZE


def test_model_file_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.flypick"
    np.savez(path.with_suffix(""), kind=np.array([{"a": 1}], dtype=object))
    path.with_suffix("").with_suffix(".npz").rename(path)
    with pytest.raises(InputError, match="not a flybox picker model"):
        load_model(path)


def test_model_file_from_a_newer_flybox_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.flypick"
    with zipfile.ZipFile(path, "w"):
        pass
    with pytest.raises(InputError):
        load_model(path)
    with open(path, "wb") as fh:
        np.savez(
            fh,
            kind=np.array("flybox-pick-model"),
            format_version=np.array(99),
            particle_size=np.array(1.0),
            feature_names=np.array(FEATURE_NAMES),
            template=np.zeros((3, 3)),
            features=np.zeros((2, 2)),
            labels=np.array([0, 1]),
        )
    with pytest.raises(InputError, match="newer"):
        load_model(path)
