"""The picker's model file (``model.flypick``): data, never code.

An uncompressed ``.npz`` archive read with ``allow_pickle=False``, holding

- ``format_version`` (int) and ``kind`` (``"flybox-pick-model"``),
- ``particle_size`` (float, diameter in micrograph pixels),
- ``feature_names`` (the feature columns, so a model from another version is refused),
- ``template`` (the rotationally averaged template, binned pixels),
- ``features`` and ``labels`` (the training set).

The classifier is *refitted* from the training set when the file is loaded: a few hundred
labels fit in well under a second, the fit is deterministic (fixed folds, no random state),
and nothing in the file is executable, unlike a pickled scikit-learn object, which also breaks
between scikit-learn versions.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from flybox.errors import InputError
from flybox.io.atomic import atomic_write
from flybox.pick.features import FEATURE_NAMES
from flybox.pick.learner import PickModel

__all__ = ["FORMAT_VERSION", "MODEL_FILE_NAME", "load_model", "save_model"]

FORMAT_VERSION = 1
MODEL_FILE_NAME = "model.flypick"
_KIND = "flybox-pick-model"


def save_model(path: str | os.PathLike[str], model: PickModel) -> None:
    """Write ``model`` to ``path`` atomically."""
    with atomic_write(path) as fh:
        np.savez(
            fh,
            kind=np.array(_KIND),
            format_version=np.array(FORMAT_VERSION),
            particle_size=np.array(model.particle_size, dtype=np.float64),
            feature_names=np.array(FEATURE_NAMES),
            template=model.template,
            features=model.features,
            labels=model.labels,
        )


def load_model(path: str | os.PathLike[str]) -> PickModel:
    """Read a model file and refit its classifier.

    Raises
    ------
    InputError
        Not a flybox picker model, a newer format, features of another version, or a file
        that needs pickle (object arrays) to load.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise InputError(path, "no such model file") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # numpy raises ValueError for object arrays when pickle is not allowed.
        raise InputError(path, f"not a flybox picker model ({exc})") from exc
    required = ("kind", "format_version", "particle_size", "feature_names", "template")
    missing = [name for name in (*required, "features", "labels") if name not in arrays]
    if missing or str(arrays["kind"]) != _KIND:
        raise InputError(path, "not a flybox picker model")
    version = int(arrays["format_version"])
    if version > FORMAT_VERSION:
        raise InputError(path, f"model format {version} is newer than this flybox reads")
    if tuple(str(n) for n in arrays["feature_names"]) != FEATURE_NAMES:
        raise InputError(path, "model features differ from this flybox version's: retrain")
    features = np.asarray(arrays["features"], dtype=np.float32)
    labels = np.asarray(arrays["labels"], dtype=np.int8)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or len(set(labels)) != 2:
        raise InputError(path, "model training set is malformed")
    return PickModel(
        particle_size=float(arrays["particle_size"]),
        template=np.asarray(arrays["template"], dtype=np.float32),
        features=features,
        labels=labels,
    )
