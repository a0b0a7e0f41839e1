"""The picker's working state: the store, the learner and its caches.

:class:`PickSession` is synchronous and thread-safe; the web app calls it through
``asyncio.to_thread``. It keeps prepared micrographs (binned band-passed channels) and rendered
images in small LRU caches, prepares the next micrograph ahead of time on one background
thread, and retrains the model only when the labels changed (saving ``model.flypick`` and
bumping the session's model version). Given a ``model_source`` (the streaming service), it
never trains: Autopick uses the model that source hands out (the service's current version),
with no minimum of manual picks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from flybox.errors import FlyboxError, ProcessingError
from flybox.io.mrc import read_micrograph
from flybox.pick.features import Prepared, prepare
from flybox.pick.learner import (
    MIN_MANUAL_PICKS,
    LabelledMicrograph,
    PickModel,
    Proposals,
    train,
)
from flybox.pick.model_file import MODEL_FILE_NAME, save_model
from flybox.pick.render import RenderSettings, render_micrograph
from flybox.pick.store import Pick, PickStore

__all__ = ["ModelSource", "NotEnoughLabelsError", "PickSession"]

#: Hands out the model Autopick uses and its version (called in a worker thread).
ModelSource: TypeAlias = Callable[[], tuple[PickModel, int]]

log = logging.getLogger(__name__)


class NotEnoughLabelsError(FlyboxError):
    """Autopick asked for before there are :data:`MIN_MANUAL_PICKS` manual picks."""


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


class PickSession:
    """Store + learner + caches of one picking session.

    Parameters
    ----------
    store
        The session's store.
    model_source
        Where Autopick's model comes from instead of training on the session's labels (the
        service: its current model version); ``None`` (``flybox pick serve``) trains.
    """

    def __init__(self, store: PickStore, *, model_source: ModelSource | None = None) -> None:
        self.store = store
        self._model_source = model_source
        if model_source is not None:
            store.model_source = "service"
        self._prepared = _LRU(48)
        self._images = _LRU(32)
        self._model: PickModel | None = None
        self._model_labels: str | None = None
        self._train_lock = threading.Lock()
        self._pending: dict[str, Future[Any]] = {}
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flybox-pick-ahead")

    def close(self) -> None:
        """Stop the look-ahead thread (waits for the micrograph it is preparing)."""
        self._ahead.shutdown(wait=True, cancel_futures=True)

    # -- images and features ---------------------------------------------------------------

    def _read(self, name: str) -> Any:
        record = self.store.get(name)
        try:
            data, _ = read_micrograph(record.path)
        except FlyboxError as exc:
            record.error = str(exc)
            raise
        except OSError as exc:
            record.error = f"{record.path}: cannot read ({exc.strerror or exc})"
            raise ProcessingError(record.path, f"cannot read ({exc.strerror or exc})") from exc
        record.error = None
        record.shape = (int(data.shape[0]), int(data.shape[1]))
        return data

    def image(self, name: str, settings: RenderSettings) -> tuple[bytes, int]:
        """PNG of micrograph ``name`` and its binning (cached per settings)."""
        key = (name, settings)
        cached = self._images.get(key)
        if cached is None:
            cached = render_micrograph(self._read(name), settings)
            self._images.put(key, cached)
        return tuple(cached)

    def prepared(self, name: str) -> Prepared:
        """Micrograph ``name`` binned and band-passed at the session's particle size."""
        key = (name, self.store.particle_size)
        cached = self._prepared.get(key)
        if cached is None:
            pending = self._pending.get(name)
            if pending is not None and not pending.cancelled():
                # A failed look-ahead is retried below, where its error reaches the caller.
                with contextlib.suppress(Exception):
                    pending.result()
                cached = self._prepared.get(key)
        if cached is None:
            cached = self._compute_prepared(name)
        result: Prepared = cached
        return result

    def _compute_prepared(self, name: str) -> Prepared:
        size = self.store.particle_size
        prepared = prepare(self._read(name), size)
        self._prepared.put((name, size), prepared)
        return prepared

    def prepare_ahead(self, name: str) -> None:
        """Prepare micrograph ``name`` on the look-ahead thread (errors are kept for later)."""
        if name not in self.store.records or self.store.get(name).error is not None:
            return
        if self._prepared.get((name, self.store.particle_size)) is not None:
            return
        with contextlib.suppress(RuntimeError):  # after close(): nothing to do
            self._pending[name] = self._ahead.submit(self._compute_prepared, name)

    def next_name(self, name: str) -> str | None:
        names = self.store.names()
        index = names.index(name)
        return names[index + 1] if index + 1 < len(names) else None

    @property
    def particle_size_fixed(self) -> bool:
        """With a model source (the service), the particle size is the model's: features at
        another size would make its proposals meaningless."""
        return self._model_source is not None

    def set_particle_size(self, size: float) -> None:
        """Change the particle size (diameter in micrograph pixels) of a standalone session."""
        self.store.update_session(particle_size=size)
        self._prepared.clear()

    # -- learning --------------------------------------------------------------------------

    def model(self) -> PickModel:
        """The model for the current labels, retrained (and saved) when they changed.

        Raises
        ------
        NotEnoughLabelsError
            Fewer than 15 manual picks on reviewed micrographs (never with a model source).
        """
        if self._model_source is not None:
            model, version = self._model_source()
            if version != self.store.model_version:
                self.store.update_session(model_version=version)
            return model
        with self._train_lock:
            fingerprint = self.store.labels_fingerprint()
            if self._model is not None and fingerprint == self._model_labels:
                return self._model
            labels = self.store.labels()
            manual = sum(p.origin == "manual" for _, picks, _ in labels for p in picks)
            if manual < MIN_MANUAL_PICKS:
                raise NotEnoughLabelsError(
                    f"autopick needs {MIN_MANUAL_PICKS} manual picks, there are {manual}"
                )
            examples = [
                LabelledMicrograph(
                    name=record.name,
                    prepared=self.prepared(record.name),
                    positives=np.array([(p.x, p.y) for p in picks], dtype=np.float64),
                    negatives=np.array([(p.x, p.y) for p in negatives], dtype=np.float64).reshape(
                        -1, 2
                    ),
                )
                for record, picks, negatives in labels
            ]
            model = train(examples, self.store.particle_size)
            save_model(self.store.folder / MODEL_FILE_NAME, model)
            self._model, self._model_labels = model, fingerprint
            self.store.update_session(model_version=self.store.model_version + 1)
            log.info(
                "picker model %d trained on %d labels", self.store.model_version, len(model.labels)
            )
            return model

    def propose(self, name: str, *, min_score: float = 0.2) -> Proposals:
        """Proposals on micrograph ``name`` away from its current picks and discards; starts
        preparing the next micrograph meanwhile."""
        model = self.model()
        record = self.store.get(name)
        known = [(p.x, p.y) for p in (*record.picks, *record.discarded)]
        exclude = np.array(known, dtype=np.float64).reshape(-1, 2)
        following = self.next_name(name)
        if following is not None:
            self.prepare_ahead(following)
        proposals = model.propose(self.prepared(name), min_score=min_score, exclude=exclude)
        self.store.update_session(autopick_used=True)
        return proposals

    def autopick_all(
        self,
        threshold: float,
        progress: Callable[[int, int, str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Propose on every micrograph not visited yet and store the proposals above
        ``threshold``; returns how many micrographs got proposals."""
        todo = [
            r.name
            for r in self.store.records.values()
            if r.state == "not_visited" and r.error is None
        ]
        done = 0
        for index, name in enumerate(todo):
            if stop is not None and stop.is_set():
                break
            if index + 1 < len(todo):
                self.prepare_ahead(todo[index + 1])
            try:
                proposals = self.propose(name, min_score=threshold)
            except NotEnoughLabelsError:
                raise
            except FlyboxError as exc:
                log.warning("%s", exc)
            else:
                picks = [
                    Pick(float(x), float(y), "auto", round(float(s), 4))
                    for (x, y), s in zip(proposals.xy, proposals.score, strict=True)
                ]
                done += self.store.set_proposals(name, picks)
            if progress is not None:
                progress(index + 1, len(todo), name)
        return done


def model_path(folder: Path) -> Path:
    return folder / MODEL_FILE_NAME
