"""The supervised picker: Xmipp's design (PICKING.md §1), improved.

Training takes labelled micrographs (positives: manual picks and kept proposals; negatives:
discarded proposals, plus random positions away from every pick as Xmipp samples them):

1. the template is the rotational average of the positives' coarse windows (rotation
   averaging makes alignment unnecessary);
2. every labelled position is snapped to the nearest correlation peak within a third of the
   radius, so that training windows are centred the way proposals are;
3. rotation-invariant features (:func:`flybox.pick.features.window_features`) feed an RBF
   support-vector classifier with Platt-scaled probabilities (balanced classes, seeded).

Proposals: local maxima of the template correlation, classified; those with a probability
above ``min_score`` are kept after non-maximum suppression at 0.8 × the particle diameter.
With no template yet (too few picks) candidates come from a LoG at the particle size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree

from flybox.pick.features import (
    FEATURE_NAMES,
    Float32Array,
    FloatArray,
    Prepared,
    candidate_peaks,
    correlation_map,
    extract_windows,
    rotational_average,
    window_features,
    window_half,
)

__all__ = [
    "MIN_MANUAL_PICKS",
    "LabelledMicrograph",
    "PickModel",
    "Proposals",
    "non_maximum_suppression",
    "train",
]

#: Supervised mode starts at this many manual picks (Xmipp's rule).
MIN_MANUAL_PICKS = 15
#: Picks closer than this fraction of the diameter are duplicates.
NMS_FRACTION = 0.8
#: Random negatives are at least this fraction of the diameter away from every labelled point.
NEGATIVE_DISTANCE_FRACTION = 0.75
SVC_C = 4.0


@dataclass(frozen=True)
class LabelledMicrograph:
    """Labels on one prepared micrograph, in micrograph pixels.

    Attributes
    ----------
    name
        Micrograph name (seeds its random negatives, so training is reproducible).
    prepared
        The micrograph (:func:`flybox.pick.features.prepare`).
    positives
        ``(n, 2)`` picks kept by the user.
    negatives
        ``(m, 2)`` proposals the user discarded.
    """

    name: str
    prepared: Prepared
    positives: FloatArray
    negatives: FloatArray = field(default_factory=lambda: np.empty((0, 2)))


@dataclass(frozen=True)
class Proposals:
    """Proposed picks, best first: ``xy`` ``(n, 2)`` micrograph pixels, ``score`` in [0, 1]."""

    xy: FloatArray
    score: FloatArray

    def __len__(self) -> int:
        return int(self.score.size)


def non_maximum_suppression(xy: FloatArray, score: FloatArray, distance: float) -> npt.NDArray[Any]:
    """Indices of the points kept: best first, dropping those within ``distance`` of a kept one."""
    if score.size == 0:
        return np.empty(0, dtype=np.intp)
    order = np.argsort(-score, kind="stable")
    tree = cKDTree(xy)
    neighbours = tree.query_ball_point(xy, r=distance)
    suppressed = np.zeros(score.size, dtype=bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[neighbours[i]] = True
    return np.asarray(kept, dtype=np.intp)


def _snap(correlation: Float32Array, centres: npt.NDArray[np.intp], reach: int) -> Any:
    """Move each binned centre to the highest correlation within ``reach`` pixels."""
    if centres.shape[0] == 0 or reach < 1:
        return centres
    windows = extract_windows(correlation, centres, reach).reshape(centres.shape[0], -1)
    best = windows.argmax(axis=1)
    side = 2 * reach + 1
    dy, dx = best // side - reach, best % side - reach
    limits = np.array([correlation.shape[1] - 1, correlation.shape[0] - 1])
    return np.clip(centres + np.stack([dx, dy], axis=1), 0, limits)


def _random_negatives(example: LabelledMicrograph, count: int, particle_size: float) -> FloatArray:
    seed = int.from_bytes(hashlib.sha256(example.name.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    ny, nx = example.prepared.shape
    margin = particle_size / 2
    labelled = np.concatenate([example.positives, example.negatives]).reshape(-1, 2)
    draws = rng.uniform([margin, margin], [nx - margin, ny - margin], size=(count * 4, 2))
    if labelled.shape[0]:
        distance, _ = cKDTree(labelled).query(draws)
        draws = draws[distance >= NEGATIVE_DISTANCE_FRACTION * particle_size]
    result: FloatArray = draws[:count]
    return result


def _template(examples: Sequence[LabelledMicrograph]) -> Float32Array:
    half = window_half(examples[0].prepared.radius)
    total = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float64)
    count = 0
    for example in examples:
        if example.positives.shape[0] == 0:
            continue
        centres = example.prepared.to_binned(example.positives)
        windows = extract_windows(example.prepared.coarse, centres, half)
        total += windows.sum(axis=0, dtype=np.float64)
        count += windows.shape[0]
    return rotational_average(total / max(count, 1))


def _classifier() -> Any:
    # Imported here: scikit-learn costs ~0.5 s to import, and the service imports this module
    # whether or not it picks; only training needs it.
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(
        StandardScaler(),
        # Platt scaling on 5-fold out-of-fold decision values, then one SVM on all data:
        # libSVM's ``probability=True``, which scikit-learn deprecates in favour of this.
        CalibratedClassifierCV(
            SVC(C=SVC_C, kernel="rbf", gamma="scale", class_weight="balanced"),
            method="sigmoid",
            cv=5,
            ensemble=False,
        ),
    )


@dataclass
class PickModel:
    """A trained picker.

    Attributes
    ----------
    particle_size
        Diameter in micrograph pixels the model was trained at.
    template
        Rotationally averaged coarse template (binned pixels).
    features, labels
        The training set (``(n, k)`` float32, ``(n,)`` int8: 1 particle, 0 not), kept so that
        the model file can store data, not code, and be refitted deterministically on load.
    classifier
        The fitted scikit-learn pipeline (rebuilt from ``features``/``labels``).
    """

    particle_size: float
    template: Float32Array
    features: Float32Array
    labels: npt.NDArray[np.int8]
    classifier: Any = None

    def __post_init__(self) -> None:
        if self.classifier is None:
            self.classifier = _classifier().fit(self.features, self.labels)

    @property
    def positives(self) -> int:
        return int((self.labels == 1).sum())

    def candidates(self, prepared: Prepared) -> tuple[npt.NDArray[np.intp], Float32Array]:
        """Candidate centres (binned) and the correlation map they came from."""
        correlation = correlation_map(prepared, self.template)
        centres, _ = candidate_peaks(correlation, prepared.radius)
        return centres, correlation

    def propose(
        self,
        prepared: Prepared,
        *,
        min_score: float = 0.2,
        exclude: FloatArray | None = None,
    ) -> Proposals:
        """Proposed picks on one micrograph.

        Parameters
        ----------
        prepared
            The micrograph, prepared at this model's particle size.
        min_score
            Lowest probability returned (the page's threshold slider starts here).
        exclude
            ``(n, 2)`` positions already labelled: no proposal within 0.8 diameter of them.
        """
        centres, correlation = self.candidates(prepared)
        features = window_features(prepared, correlation, centres)
        score = self.classifier.predict_proba(features)[:, 1] if len(centres) else np.empty(0)
        xy = prepared.to_micrograph(centres)
        keep = score >= min_score
        xy, score = xy[keep], np.asarray(score[keep], dtype=np.float64)
        distance = NMS_FRACTION * self.particle_size
        if exclude is not None and exclude.shape[0] and score.size:
            nearest, _ = cKDTree(exclude.reshape(-1, 2)).query(xy)
            xy, score = xy[nearest >= distance], score[nearest >= distance]
        kept = non_maximum_suppression(xy, score, distance)
        return Proposals(xy=xy[kept], score=score[kept])


def training_set(
    examples: Sequence[LabelledMicrograph], template: Float32Array, particle_size: float
) -> tuple[Float32Array, npt.NDArray[np.int8]]:
    """Features and labels of every labelled position plus random negatives (Xmipp's rule:
    about half as many as positives per micrograph, at least 15)."""
    blocks: list[Float32Array] = []
    labels: list[npt.NDArray[np.int8]] = []
    for example in examples:
        prepared = example.prepared
        correlation = correlation_map(prepared, template)
        reach = max(1, int(prepared.radius / 3))
        n_random = max(15, example.positives.shape[0] // 2 + 1)
        randoms = _random_negatives(example, n_random, particle_size)
        for points, label in ((example.positives, 1), (example.negatives, 0), (randoms, 0)):
            if points.shape[0] == 0:
                continue
            centres = _snap(correlation, prepared.to_binned(points), reach)
            blocks.append(window_features(prepared, correlation, centres))
            labels.append(np.full(points.shape[0], label, dtype=np.int8))
    if not blocks:
        return np.empty((0, len(FEATURE_NAMES)), np.float32), np.empty(0, np.int8)
    return np.concatenate(blocks), np.concatenate(labels)


def train(examples: Sequence[LabelledMicrograph], particle_size: float) -> PickModel:
    """Train a :class:`PickModel` on labelled micrographs.

    Raises
    ------
    ValueError
        Fewer than :data:`MIN_MANUAL_PICKS` positives, or no micrograph.
    """
    positives = sum(e.positives.shape[0] for e in examples)
    if positives < MIN_MANUAL_PICKS:
        raise ValueError(f"needs at least {MIN_MANUAL_PICKS} picks to train, has {positives}")
    template = _template(examples)
    features, labels = training_set(examples, template, particle_size)
    return PickModel(
        particle_size=float(particle_size), template=template, features=features, labels=labels
    )


def log_proposals(prepared: Prepared, particle_size: float) -> Proposals:
    """Candidates from the LoG at the particle size alone (no model): score = LoG response
    squashed to (0, 1); used before there are enough labels, and as the benchmark baseline."""
    centres, values = candidate_peaks(prepared.log_stack[1], prepared.radius)
    xy = prepared.to_micrograph(centres)
    score = 1.0 / (1.0 + np.exp(-(values - 3.0)))
    kept = non_maximum_suppression(xy, score, NMS_FRACTION * particle_size)
    return Proposals(xy=xy[kept], score=score[kept])
