"""The picker's web app (Starlette): the page and ``/api/pick/...``.

:func:`create_pick_app` builds a standalone app (``flybox pick serve``); :func:`api_routes`
and :func:`page_routes` give the routes alone, for a server that mounts the picker (the
service: the page at ``/pick``, the API at ``/api/pick``). Heavy work (reading, rendering,
training, proposals) runs in threads, never in the event loop.

Access: when a token is set, every ``/api/`` request needs ``Authorization: Bearer <token>``
or ``?token=<token>`` (the page and its static files are open: they hold no data).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from flybox.errors import FlyboxError
from flybox.pick.render import RenderSettings
from flybox.pick.session import NotEnoughLabelsError, PickSession
from flybox.pick.store import Pick, ReadOnlyPicksError, StalePicksError

__all__ = ["PickerMount", "api_routes", "create_pick_app", "mount_picker", "page_routes"]

log = logging.getLogger(__name__)

STATIC = Path(str(files("flybox.pick") / "static"))


class _PickIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: float = Field(allow_inf_nan=False)
    y: float = Field(allow_inf_nan=False)
    origin: Literal["manual", "auto"] = "manual"
    score: float | None = Field(default=None, ge=0.0, le=1.0)


class _PicksIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    picks: list[_PickIn]
    discarded: list[_PickIn] = []
    state: Literal["picked", "corrected"] | None = None


class _SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    particle_size: float | None = Field(default=None, gt=0, le=4096)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    last_micrograph: str | None = None

    @field_validator("particle_size")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


@dataclass
class _AutopickAll:
    """Progress of the one "Autopick all" run (owned by the app's lifespan task group)."""

    running: bool = False
    done: int = 0
    total: int = 0
    current: str | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "done": self.done,
            "total": self.total,
            "current": self.current,
            "error": self.error,
        }


@dataclass
class _State:
    session: PickSession
    token: str | None
    api_prefix: str
    page_prefix: str
    autopick_all: _AutopickAll = field(default_factory=_AutopickAll)
    tasks: asyncio.TaskGroup | None = None
    on_saved: Callable[[str], Awaitable[None]] | None = None


def _pick_json(p: Pick) -> dict[str, Any]:
    return p.as_json()


def _picks_response(state: _State, name: str) -> JSONResponse:
    record = state.session.store.get(name)
    body = {
        "name": name,
        "picks": [_pick_json(p) for p in record.picks],
        "discarded": [_pick_json(p) for p in record.discarded],
        "state": record.state,
        "error": record.error,
        "picks_error": record.picks_error,
        "shape": list(record.shape) if record.shape else None,
    }
    return JSONResponse(body, headers={"ETag": record.etag, "Cache-Control": "no-store"})


def api_routes(state: _State) -> list[BaseRoute]:
    """The ``/api/pick`` routes (paths relative to the API prefix)."""
    session = state.session
    store = session.store

    def known(handler: Callable[[Request, str], Awaitable[Response]]) -> Any:
        async def wrapped(request: Request) -> Response:
            name = request.path_params["name"]
            if name not in store.records:
                return _error(404, f"no micrograph named {name}")
            return await handler(request, name)

        return wrapped

    async def micrographs(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(store.listing))

    async def image(request: Request, name: str) -> Response:
        query = request.query_params
        try:
            settings = RenderSettings(
                binning=int(query.get("bin", 0)),
                lowpass=float(query.get("lowpass", 0)),
                highpass=float(query.get("highpass", 0)),
                contrast=float(query.get("contrast", 3)),
            )
            if not (0 <= settings.binning <= 64 and 0.1 <= settings.contrast <= 20):
                raise ValueError("bin must be 0-64 and contrast 0.1-20")
            if not (0 <= settings.lowpass <= 1000 and 0 <= settings.highpass <= 10000):
                raise ValueError("lowpass must be 0-1000 and highpass 0-10000 pixels")
        except ValueError as exc:
            return _error(400, f"bad image settings: {exc}")
        try:
            png, factor = await asyncio.to_thread(session.image, name, settings)
        except FlyboxError as exc:
            return _error(422, str(exc))
        return Response(
            png,
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600", "X-Binning": str(factor)},
        )

    async def get_picks(request: Request, name: str) -> Response:
        session.prepare_ahead(name)
        return _picks_response(state, name)

    async def put_picks(request: Request, name: str) -> Response:
        try:
            body = _PicksIn.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(400, f"invalid picks: {_validation_message(exc)}")
        record = store.get(name)
        if record.shape is not None:
            ny, nx = record.shape
            for p in (*body.picks, *body.discarded):
                if not (0 <= p.x <= nx and 0 <= p.y <= ny):
                    return _error(400, f"invalid picks: ({p.x}, {p.y}) is outside the micrograph")
        picks = [Pick(p.x, p.y, p.origin, p.score) for p in body.picks]
        discarded = [Pick(p.x, p.y, p.origin, p.score) for p in body.discarded]
        try:
            await asyncio.to_thread(
                store.set_picks,
                name,
                picks,
                discarded,
                state=body.state,
                if_match=request.headers.get("if-match"),
            )
        except StalePicksError as exc:
            return _error(409, f"{exc}: reload to see them")
        except ReadOnlyPicksError as exc:
            return _error(409, str(exc))
        if state.on_saved is not None:
            await state.on_saved(name)
        return _picks_response(state, name)

    async def autopick(request: Request, name: str) -> Response:
        try:
            min_score = float(request.query_params.get("min_score", 0.2))
        except ValueError:
            return _error(400, "min_score must be a number")
        try:
            proposals = await asyncio.to_thread(session.propose, name, min_score=min_score)
        except NotEnoughLabelsError as exc:
            return _error(409, str(exc))
        except FlyboxError as exc:
            return _error(422, str(exc))
        picks = [
            {"x": float(x), "y": float(y), "origin": "auto", "score": round(float(s), 4)}
            for (x, y), s in zip(proposals.xy, proposals.score, strict=True)
        ]
        return JSONResponse({"picks": picks, "model_version": store.model_version})

    async def summary(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(store.summary))

    async def put_session(request: Request) -> Response:
        try:
            body = _SessionIn.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(400, f"invalid session settings: {_validation_message(exc)}")
        if body.last_micrograph is not None and body.last_micrograph not in store.records:
            return _error(400, f"no micrograph named {body.last_micrograph}")
        if body.particle_size is not None and body.particle_size != store.particle_size:
            if session.particle_size_fixed:
                return _error(
                    409,
                    f"the particle size is the service model's ({store.particle_size:g} px); "
                    "change [picking] particle_size and restart to use another",
                )
            await asyncio.to_thread(session.set_particle_size, body.particle_size)
        await asyncio.to_thread(
            store.update_session, threshold=body.threshold, last_micrograph=body.last_micrograph
        )
        return JSONResponse(await asyncio.to_thread(store.summary))

    async def autopick_all_status(request: Request) -> Response:
        return JSONResponse(state.autopick_all.as_json())

    async def autopick_all_start(request: Request) -> Response:
        job = state.autopick_all
        if job.running:
            return JSONResponse(job.as_json(), status_code=202)
        try:
            threshold = float(request.query_params.get("threshold", store.threshold))
        except ValueError:
            return _error(400, "threshold must be a number")
        try:
            await asyncio.to_thread(session.model)
        except NotEnoughLabelsError as exc:
            return _error(409, str(exc))
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int, name: str) -> None:
            def update() -> None:
                job.done, job.total, job.current = done, total, name

            loop.call_soon_threadsafe(update)

        stop = threading.Event()

        async def run() -> None:
            try:
                await asyncio.to_thread(session.autopick_all, threshold, progress, stop)
            except FlyboxError as exc:
                job.error = str(exc)
            except asyncio.CancelledError:
                stop.set()  # the thread ends after the micrograph it is on
                raise
            finally:
                job.running = False

        job.running, job.done, job.total, job.error = True, 0, 0, None
        if state.tasks is None:
            return _error(503, "the picker is not running")
        job.task = state.tasks.create_task(run(), name="flybox-pick-autopick-all")
        return JSONResponse(job.as_json(), status_code=202)

    return [
        Route("/micrographs", micrographs),
        Route("/micrographs/{name}/image", known(image)),
        Route("/micrographs/{name}/picks", known(get_picks), methods=["GET"]),
        Route("/micrographs/{name}/picks", known(put_picks), methods=["PUT"]),
        Route("/micrographs/{name}/autopick", known(autopick), methods=["POST"]),
        Route("/summary", summary),
        Route("/session", put_session, methods=["PUT"]),
        Route("/autopick-all", autopick_all_status, methods=["GET"]),
        Route("/autopick-all", autopick_all_start, methods=["POST"]),
    ]


def page_routes(state: _State) -> list[BaseRoute]:
    """The page (``/``) and its static files (``/static``), relative to the page prefix."""
    html = (STATIC / "index.html").read_text()

    async def page(request: Request) -> Response:
        filled = html.replace("{{API}}", state.api_prefix).replace(
            "{{STATIC}}", f"{state.page_prefix}/static"
        )
        return HTMLResponse(filled, headers={"Cache-Control": "no-store"})

    return [Route("/", page), Mount("/static", StaticFiles(directory=STATIC), name="static")]


class _TokenGate:
    """ASGI middleware: ``/api/`` needs the bearer token (header or ``?token=``)."""

    def __init__(self, app: ASGIApp, token: str | None, api_prefix: str) -> None:
        self.app, self.token, self.api_prefix = app, token, api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.token is not None
            and scope["type"] == "http"
            and scope["path"].startswith(self.api_prefix)
        ):
            request = Request(scope)
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                given = request.query_params.get("token", "")
            if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                response = _error(
                    401,
                    "a bearer token is required",
                    **{"WWW-Authenticate": 'Bearer realm="flybox"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_pick_app(
    session: PickSession, *, token: str | None = None, prefix: str = ""
) -> Starlette:
    """The standalone picker: the page at ``prefix/``, the API at ``prefix/api/pick``.

    Parameters
    ----------
    session
        The picking session (closed when the app shuts down).
    token
        Bearer token for ``/api/`` (required by the CLI on a non-loopback listener).
    prefix
        Path prefix when served behind a proxy (``""`` or ``"/something"``).
    """
    state = _State(
        session=session, token=token, api_prefix=f"{prefix}/api/pick", page_prefix=prefix
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with asyncio.TaskGroup() as tasks:
                state.tasks = tasks
                yield
                state.tasks = None
                if state.autopick_all.task is not None:
                    state.autopick_all.task.cancel()
        finally:
            await asyncio.to_thread(session.close)

    page = page_routes(state)
    routes: list[BaseRoute] = [
        Mount(f"{prefix}/api/pick", routes=api_routes(state)),
        *(page if not prefix else [Mount(prefix, routes=page)]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_TokenGate, token=token, api_prefix=f"{prefix}/api/")
    return app


@dataclass
class PickerMount:
    """The picker inside another server (the service): its routes (full paths) and the task
    group its background work ("Autopick all") runs in, owned by :meth:`running`."""

    routes: list[BaseRoute]
    state: _State

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Own the picker's background tasks for the ``async with`` block."""
        async with asyncio.TaskGroup() as tasks:
            self.state.tasks = tasks
            try:
                yield
            finally:
                self.state.tasks = None
                if self.state.autopick_all.task is not None:
                    self.state.autopick_all.task.cancel()


def mount_picker(
    session: PickSession,
    *,
    api_prefix: str = "/api/pick",
    page_prefix: str = "/pick",
    on_saved: Callable[[str], Awaitable[None]] | None = None,
    extra_api: list[BaseRoute] | None = None,
) -> PickerMount:
    """The picker's routes for a server that mounts it (the server applies its own access
    rules to ``api_prefix``).

    Parameters
    ----------
    session
        The picking session (the caller closes it).
    api_prefix, page_prefix
        Where the API and the page are mounted.
    on_saved
        Awaited after picks were saved (``PUT .../picks``), with the micrograph's name.
    extra_api
        More API routes (relative to ``api_prefix``).
    """
    state = _State(
        session=session,
        token=None,
        api_prefix=api_prefix,
        page_prefix=page_prefix,
        on_saved=on_saved,
    )
    routes: list[BaseRoute] = [
        Mount(api_prefix, routes=[*api_routes(state), *(extra_api or [])]),
        Mount(page_prefix, routes=page_routes(state)),
    ]
    return PickerMount(routes, state)
