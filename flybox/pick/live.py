"""Picking inside the streaming service: the worker's autopick step and retraining.

:class:`Autopick` is what a worker is handed (small, picklable: a model file, its version and
the settings); called on a micrograph, it proposes picks with that model (loaded once per
worker process and version), writes them to ``PICKDIR/<stem>_autopick.star`` (atomic) and
returns them as the picks table the chain extracts, with the picker's figures (mean score,
seconds). :func:`retrain` makes a new model version from a base model and corrected
micrographs: the base model's training set plus the corrections' features (kept and manual
picks are positives, discarded proposals negatives), with the base model's template, so that
every version learns from all corrections and no version forgets the labelled micrographs the
session started from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from flybox.io.star import write_star
from flybox.pick.features import prepare
from flybox.pick.learner import LabelledMicrograph, PickModel, training_set
from flybox.pick.model_file import load_model
from flybox.pick.store import FOM, ORIGIN_COLUMN, X, Y

__all__ = ["AUTOPICK_SUFFIX", "Autopick", "model_of_version", "model_version_path", "retrain"]

AUTOPICK_SUFFIX = "_autopick.star"

_models: dict[tuple[str, int], PickModel] = {}
_models_lock = threading.Lock()


def model_version_path(folder: Path, version: int) -> Path:
    """Where the service saves model version ``version`` (``PICKDIR/model-v<N>.flypick``)."""
    return Path(folder) / f"model-v{version}.flypick"


def model_of_version(path: str, version: int) -> PickModel:
    """The model of a version, loaded once per process (the file of a version never changes):
    the workers' autopick step and the picker at ``/pick`` share it."""
    key = (path, version)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            if len(_models) >= 4:
                _models.clear()
            model = _models[key] = load_model(path)
        return model


@dataclass(frozen=True)
class Autopick:
    """The autopick step of one micrograph's job (module docstring).

    Attributes
    ----------
    model
        The model file of this version.
    version
        The model version (part of the unit key).
    particle_size
        Particle diameter in micrograph pixels.
    threshold
        Lowest score kept.
    picks_dir
        Where ``<stem>_autopick.star`` is written.
    """

    model: str
    version: int
    particle_size: float
    threshold: float
    picks_dir: str

    def __call__(
        self, image: npt.NDArray[np.float32], stem: str
    ) -> tuple[pd.DataFrame, dict[str, float]]:
        """Picks on ``image``: the table to extract and the picker's figures."""
        started = time.perf_counter()
        model = model_of_version(self.model, self.version)
        prepared = prepare(np.asarray(image, dtype=np.float32), self.particle_size)
        proposals = model.propose(prepared, min_score=self.threshold)
        order = np.argsort(-proposals.score, kind="stable")
        xy, score = proposals.xy[order], proposals.score[order]
        table = pd.DataFrame(
            {
                X: xy[:, 0].astype(np.float64),
                Y: xy[:, 1].astype(np.float64),
                FOM: np.round(score.astype(np.float64), 4),
                ORIGIN_COLUMN: pd.Series(["auto"] * len(score), dtype=object),
            }
        )
        folder = Path(self.picks_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_star(folder / f"{stem}{AUTOPICK_SUFFIX}", {"": table})
        figures = {"autopick_seconds": time.perf_counter() - started}
        if len(score):
            figures["pick_score_mean"] = float(score.mean())
        return table, figures


def retrain(
    base: PickModel, corrections: Sequence[LabelledMicrograph], particle_size: float
) -> PickModel:
    """A new model: ``base``'s training set plus the features of ``corrections``.

    Raises
    ------
    ValueError
        When no correction holds a label.
    """
    features, labels = training_set(corrections, base.template, particle_size)
    if not len(labels):
        raise ValueError("no labels in the corrections")
    return PickModel(
        particle_size=float(particle_size),
        template=base.template,
        features=np.concatenate([base.features, features]).astype(np.float32),
        labels=np.concatenate([base.labels, labels]).astype(np.int8),
    )
