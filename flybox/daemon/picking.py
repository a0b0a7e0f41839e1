"""Picking in the live session (``[picking]``): the model, the picker at ``/pick``,
corrections, learning (issue 13).

* **Autopick.** Intake pairs a micrograph without coordinates with the model
  (:class:`~flybox.daemon.intake.stage.AutopickSource`); the unit's key holds the model
  version, its content hash, the threshold and the particle size
  (:func:`~flybox.daemon.work.units.autopick_digest`); the worker runs the ``autopick`` step
  before ``extract`` (:class:`~flybox.pick.live.Autopick`, picks also written to
  ``OUTPUT/Picks/<stem>_autopick.star``). A micrograph keeps the version it was first picked
  with (a restart or a new model never repicks it); "re-pick with the current model"
  (``POST /api/pick/repick``) makes new versions of the uncorrected autopicked micrographs.
* **The picker.** ``/pick`` and ``/api/pick/...`` serve the picker (:mod:`flybox.pick.app`) on
  the committed micrographs, its session in ``OUTPUT/Picks`` (``picking.json``, written at
  most once per second while micrographs join: :class:`SessionFileWriter`). Its "Autopick"
  and "Correct and next" propose with the service's current model version (no manual picks
  needed; the picker never trains a model of its own here). Saving picks
  there writes ``OUTPUT/Picks/<stem>_manualpick.star`` and hands the file to intake as the
  stem's corrected picks: a new unit version, re-extracted from them, whose rows replace the
  old ones in every cumulative STAR file through the existing versioning. Exactly once
  through crashes: the corrected picks are a file, read again at start (every micrograph the
  picker session says was reviewed), so a restart computes the same unit key and the journal
  decides whether it is done.
* **Learning** (``learn = true``). After a correction the model is retrained in a thread
  (:func:`~flybox.pick.live.retrain`: the configured model's training set plus every
  correction), saved as ``OUTPUT/Picks/model-v<N>.flypick`` (the configured file is never
  touched), recorded in the journal (meta ``picking_models``, ``picking_model_current``),
  announced (a ``model`` event: MQTT, ``flybox_pick_model_version``) and used for the
  micrographs picked from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from flybox.config import PickingConfig
from flybox.daemon.intake.pairing import AUTOPICK, CoordinatesInput
from flybox.daemon.intake.reading import read_picks
from flybox.daemon.intake.stage import Intake
from flybox.daemon.state import JournalThread
from flybox.daemon.telemetry.events import EventBus, MicrographEvent, ModelEvent
from flybox.daemon.work.units import autopick_digest
from flybox.errors import ConfigError, FlyboxError, TextParseError
from flybox.pick.app import PickerMount, mount_picker
from flybox.pick.learner import LabelledMicrograph, PickModel
from flybox.pick.live import (
    AUTOPICK_SUFFIX,
    Autopick,
    model_of_version,
    model_version_path,
    retrain,
)
from flybox.pick.model_file import load_model, save_model
from flybox.pick.session import PickSession
from flybox.pick.store import PickStore
from flybox.pipeline.layout import stream_paths

__all__ = ["LivePicking", "ModelVersion", "SessionFileWriter"]

log = logging.getLogger(__name__)

_MODELS_META = "picking_models"
_CURRENT_META = "picking_model_current"


@dataclass(frozen=True)
class ModelVersion:
    """One model version of the session."""

    version: int
    path: str
    sha: str
    kind: str  # "configured" or "learned"

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "path": self.path, "sha": self.sha, "kind": self.kind}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _load_checked(path: Path) -> tuple[PickModel, str]:
    try:
        return load_model(path), _sha(path)
    except FlyboxError as exc:
        raise ConfigError("picking.model", str(exc)) from None
    except OSError as exc:
        raise ConfigError("picking.model", f"{path}: {exc.strerror or exc}") from None


class SessionFileWriter:
    """Keeps ``picking.json`` up to date as micrographs join the picker, at a cost independent
    of how many join: the file (one line per micrograph) is rewritten at most once per
    ``interval`` while the store is behind (:attr:`PickStore.dirty`), atomically, in a thread,
    and once more on exit. A micrograph that joins carries no user work (its picks are the
    service's files), so a file a second behind loses nothing; the picker's own saves (picks,
    states, settings) still write at once.

    Parameters
    ----------
    store
        The picker's store (micrographs join it with ``add_micrograph(..., save=False)``).
    interval
        The least time between two writes, in seconds.
    """

    def __init__(self, store: PickStore, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._changed = asyncio.Event()

    def changed(self) -> None:
        """The store changed: write it soon (coalesced with the changes that follow)."""
        self._changed.set()

    async def _loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await asyncio.to_thread(self.store.flush)
            await asyncio.sleep(self.interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SessionFileWriter]:
        """Own the writing task for the ``async with`` block; write what is left on exit."""
        try:
            async with asyncio.TaskGroup() as tasks:
                task = tasks.create_task(self._loop(), name="picking-session-file")
                try:
                    yield self
                finally:
                    task.cancel()
        finally:
            await asyncio.to_thread(self.store.flush)


class LivePicking:
    """The session's picking (module docstring); an async context manager.

    Parameters
    ----------
    config
        The ``[picking]`` section.
    output_dir
        The session's output folder (the picker's session is ``OUTPUT/Picks``).
    session
        Session name (events).
    stream
        The chain's first stream (its per-micrograph STAR shows external picks in the picker).
    journal
        The journal and its thread (model versions).
    events
        The bus: committed micrographs join the picker; model events go out.
    """

    def __init__(
        self,
        config: PickingConfig,
        *,
        output_dir: Path,
        session: str,
        stream: str,
        journal: JournalThread,
        events: EventBus,
    ) -> None:
        self.config = config
        self.output_dir = output_dir
        self.picks_dir = output_dir / "Picks"
        self.session_name = session
        self.stream = stream
        self._journal = journal
        self._events = events
        self.intake: Intake | None = None
        self.versions: list[ModelVersion] = []
        self.current = 0
        self.particle_size = float(config.particle_size or 0.0)
        self._base: PickModel | None = None
        self.store: PickStore | None = None
        self.session: PickSession | None = None
        self.mount: PickerMount | None = None
        self.writer: SessionFileWriter | None = None
        self._learn = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self.retrainings = 0

    # ----------------------------------------------------------------------------- intake's view
    @property
    def version(self) -> int:
        """The current model version."""
        return self.current

    def _entry(self, version: int) -> ModelVersion:
        for entry in self.versions:
            if entry.version == version:
                return entry
        return self.versions[-1]

    def digest(self, version: int) -> str:
        """The coordinates' stand-in hash of a unit picked with ``version``."""
        entry = self._entry(version)
        return autopick_digest(entry.version, entry.sha, self.config.threshold, self.particle_size)

    def _current_model(self) -> tuple[PickModel, int]:
        """The picker's model: the current version (blocking: the picker's threads call it)."""
        entry = self._entry(self.current)
        return model_of_version(entry.path, entry.version), entry.version

    def autopick_for(self, version: int) -> Autopick:
        """The worker's autopick step with model ``version`` (0: the current one)."""
        entry = self._entry(version if version > 0 else self.current)
        return Autopick(
            model=entry.path,
            version=entry.version,
            particle_size=self.particle_size,
            threshold=self.config.threshold,
            picks_dir=str(self.picks_dir),
        )

    @property
    def routes(self) -> list[BaseRoute]:
        """``/pick`` and ``/api/pick/...`` (valid once entered)."""
        assert self.mount is not None
        return self.mount.routes

    # ----------------------------------------------------------------------------- lifetime
    async def __aenter__(self) -> LivePicking:
        """Load the model and the picker session; register corrected picks with intake.

        Raises
        ------
        ConfigError
            When ``[picking] model`` cannot be used.
        """
        model_path = Path(self.config.model).absolute()
        base, sha = await asyncio.to_thread(_load_checked, model_path)
        self._base = base
        if not self.particle_size:
            self.particle_size = base.particle_size
        await self._load_versions(model_path, sha)
        async with contextlib.AsyncExitStack() as stack:
            self.store = store = await asyncio.to_thread(
                PickStore,
                [],
                self.picks_dir,
                particle_size=self.particle_size,
                allow_empty=True,
            )
            self.session = session = PickSession(store, model_source=self._current_model)
            stack.callback(session.close)
            self.writer = await stack.enter_async_context(SessionFileWriter(store).running())
            await self._join_committed()
            await self._register_corrections()
            extra: list[BaseRoute] = [
                Route("/repick", self._repick_endpoint, methods=["POST"]),
                Route("/model", self._model_endpoint, methods=["GET"]),
            ]
            self.mount = mount_picker(session, on_saved=self.saved, extra_api=extra)
            await stack.enter_async_context(self.mount.running())
            subscription = stack.enter_context(self._events.subscribe())
            tasks = await stack.enter_async_context(asyncio.TaskGroup())
            loops = [tasks.create_task(self._follow(subscription), name="picking-follow-bus")]
            if self.config.learn:
                loops.append(tasks.create_task(self._learn_loop(), name="picking-learn"))

            def stop() -> None:
                subscription.close()
                for loop in loops:
                    loop.cancel()

            stack.callback(stop)
            self._stack = stack.pop_all()
        entry = self._entry(self.current)
        log.info(
            "picking: model v%d (%s), particle size %g px, threshold %g%s",
            entry.version,
            entry.path,
            self.particle_size,
            self.config.threshold,
            ", learning from corrections" if self.config.learn else "",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _load_versions(self, model_path: Path, sha: str) -> None:
        journal = self._journal
        text = await journal.call(journal.journal.get_meta, _MODELS_META)
        versions = [ModelVersion(**v) for v in json.loads(text)] if text else []
        current = await journal.call(journal.journal.get_meta, _CURRENT_META)
        configured = [v for v in versions if v.kind == "configured"]
        if not configured or (configured[-1].sha, configured[-1].path) != (sha, str(model_path)):
            # A new session, or [picking] model changed: the configured model is the current.
            entry = ModelVersion(len(versions) + 1, str(model_path), sha, "configured")
            versions.append(entry)
            current = str(entry.version)
            await self._save_versions(versions, entry.version)
        self.versions = versions
        self.current = int(current) if current else versions[-1].version

    async def _save_versions(self, versions: list[ModelVersion], current: int) -> None:
        journal = self._journal
        text = json.dumps([v.as_json() for v in versions])
        await journal.call(journal.journal.set_meta, _MODELS_META, text)
        await journal.call(journal.journal.set_meta, _CURRENT_META, str(current))

    async def _join_committed(self) -> None:
        """Micrographs committed before this start join the picker."""
        journal = self._journal
        units = await journal.call(journal.journal.current_units)
        store = self.store
        assert store is not None

        def join() -> None:
            for unit in units:
                store.add_micrograph(
                    Path(unit.micrograph), self._shown_picks(unit.stem), save=False
                )
            store.update_session(model_version=self.current)

        await asyncio.to_thread(join)

    def _shown_picks(self, stem: str) -> Path | None:
        autopicked = self.picks_dir / f"{stem}{AUTOPICK_SUFFIX}"
        if autopicked.is_file():
            return autopicked
        star = Path(stream_paths(self.output_dir, self.stream, stem)[1])
        return star if star.is_file() else None

    async def _register_corrections(self) -> None:
        """Every micrograph the picker session says was reviewed: its saved picks are the
        stem's corrected picks (read again at each start: exactly once through crashes)."""
        store = self.store
        assert store is not None
        for name, record in list(store.records.items()):
            if record.state in ("picked", "corrected") and store.picks_path(name).is_file():
                await self._correct(name, announce=False)

    # ----------------------------------------------------------------------------- corrections
    async def saved(self, name: str) -> None:
        """Picks of micrograph ``name`` were saved in the picker: re-extract from them."""
        store = self.store
        assert store is not None
        if store.get(name).state not in ("picked", "corrected"):
            return
        await self._correct(name, announce=True)
        if self.config.learn:
            self._learn.set()

    async def _correct(self, name: str, *, announce: bool) -> None:
        assert self.store is not None
        path = self.store.picks_path(name)
        try:
            digest, picks = await asyncio.to_thread(read_picks, str(path))
        except TextParseError as exc:
            log.warning("%s: corrected picks not used: %s", path, exc.problem)
            return
        item = CoordinatesInput(str(path), digest, picks, time.monotonic())
        assert self.intake is not None
        if announce:
            log.info("%s: %d corrected picks; extracting again", name, len(picks))
            await self.intake.set_corrected(name, item)
        else:
            self.intake.pairing.set_corrected(name, item)

    async def repick(self) -> list[str]:
        """Re-pick every uncorrected autopicked micrograph picked with an older model."""
        intake = self.intake
        assert intake is not None
        stems = [
            stem
            for stem, version in intake.autopick_pins.items()
            if version != self.current
            and intake.pairing.corrected(stem) is None
            and (pair := intake.pairing.pair(stem)) is not None
            and pair.coordinates.path == AUTOPICK
        ]
        if stems:
            log.info("re-picking %d micrographs with model v%d", len(stems), self.current)
            await intake.repick(stems, self.current)
        return stems

    async def _repick_endpoint(self, request: Request) -> Response:
        stems = await self.repick()
        return JSONResponse({"model_version": self.current, "micrographs": stems}, 202)

    async def _model_endpoint(self, request: Request) -> Response:
        return JSONResponse(
            {
                "current": self.current,
                "versions": [v.as_json() for v in self.versions],
                "learn": self.config.learn,
                "retrainings": self.retrainings,
            }
        )

    # ----------------------------------------------------------------------------- loops
    async def _follow(self, subscription: Any) -> None:
        """Committed micrographs join the picker (as they are committed)."""
        store, writer = self.store, self.writer
        assert store is not None
        assert writer is not None
        async for event in subscription:
            if isinstance(event, MicrographEvent):
                picks = self._shown_picks(event.name)
                try:
                    await asyncio.to_thread(
                        store.add_micrograph, Path(event.path), picks, save=False
                    )
                except (FlyboxError, OSError) as exc:
                    log.warning("%s: not shown in the picker: %s", event.name, exc)
                writer.changed()

    async def _learn_loop(self) -> None:
        while True:
            await self._learn.wait()
            self._learn.clear()
            try:
                learned = await asyncio.to_thread(self._retrain)
            except Exception:
                log.exception("picking: retraining failed; the model stays v%d", self.current)
                continue
            if learned is None:
                continue
            entry, labels, corrected = learned
            self.versions.append(entry)
            self.current = entry.version
            self.retrainings += 1
            assert self.store is not None
            await asyncio.to_thread(self.store.update_session, model_version=entry.version)
            await self._save_versions(self.versions, entry.version)
            log.info(
                "picking: model v%d learned from %d corrected micrographs (%d labels): %s",
                entry.version,
                corrected,
                labels,
                entry.path,
            )
            self.announce(labels=labels, corrected=corrected)

    def _retrain(self) -> tuple[ModelVersion, int, int] | None:
        """Blocking (a thread): the next model version from every correction, saved."""
        store, session, base = self.store, self.session, self._base
        assert store is not None
        assert session is not None
        assert base is not None
        examples = [
            LabelledMicrograph(
                name=record.name,
                prepared=session.prepared(record.name),
                positives=np.array([(p.x, p.y) for p in picks], dtype=np.float64).reshape(-1, 2),
                negatives=np.array([(p.x, p.y) for p in negatives], dtype=np.float64).reshape(
                    -1, 2
                ),
            )
            for record, picks, negatives in store.labels()
        ]
        if not examples:
            return None
        model = retrain(base, examples, self.particle_size)
        version = max(v.version for v in self.versions) + 1
        path = model_version_path(self.picks_dir, version)
        save_model(path, model)
        entry = ModelVersion(version, str(path), _sha(path), "learned")
        return entry, int(model.labels.shape[0]), len(examples)

    def announce(self, *, labels: int = 0, corrected: int = 0) -> None:
        """Emit a ``model`` event for the current version (the service calls it once the
        telemetry listens; learning calls it for each new version)."""
        entry = self._entry(self.current)
        self._events.emit(
            ModelEvent(
                session=self.session_name,
                version=entry.version,
                path=entry.path,
                labels=labels,
                corrected=corrected,
            )
        )
