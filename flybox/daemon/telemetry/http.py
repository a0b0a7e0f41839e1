"""The service's HTTP server (Starlette on uvicorn, in the service's event loop).

Endpoints:

``/metrics``, ``/healthz``
    Open (Prometheus scrapes without credentials; they carry no paths or secrets).
``/api/status``
    The session report (:class:`~flybox.daemon.telemetry.status.StatusReport`).
``/``
    The live dashboard (static page, package data in ``telemetry/static``), fed by
    ``/api/dashboard/...`` (history once, then Server-Sent Events: no polling).
``/pick``, ``/api/pick/...``
    The picker on the session's micrographs, when ``[picking]`` is configured (routes given
    by the service through :meth:`HttpServer.add_routes`).

Access: ``/api/*`` needs ``Authorization: Bearer <[http] token>`` when a token is configured
(or ``?token=`` in the query, for the browser's ``EventSource`` and image requests, which
cannot send headers), and is refused outright (403) on a non-loopback listener without one.
Pages and their static files are open: they hold no data.

The metrics are read where they are updated (the event loop), so no thread is needed; the
server shuts down with the service (open connections and event streams end then).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from flybox.config import HttpConfig
from flybox.daemon.telemetry.dashboard import DashboardFeed
from flybox.daemon.telemetry.status import StatusReport
from flybox.errors import ConfigError

__all__ = ["STATIC", "HttpServer"]

log = logging.getLogger(__name__)

STATIC = Path(str(files("flybox.daemon.telemetry") / "static"))

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_NO_STORE = {"Cache-Control": "no-store"}
#: Routes answer every method themselves (405 with ``Allow: GET, HEAD``, as always).
_ANY = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
#: Seconds between comment lines on an idle event stream (keeps proxies from closing it).
_KEEPALIVE_SECONDS = 15.0


def _error(status: HTTPStatus, message: str, **headers: str) -> Response:
    body = json.dumps({"error": message}).encode()
    return Response(body, status.value, {**_NO_STORE, **headers}, media_type=_JSON)


def _read_only(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """GET and HEAD only (405 with ``Allow: GET, HEAD`` otherwise)."""

    async def wrapped(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD", Allow="GET, HEAD")
        result: Response = await handler(request)
        return result

    return wrapped


_SPECIAL_CASE = {b"www-authenticate": b"WWW-Authenticate", b"etag": b"ETag"}


class _HeaderCase:
    """ASGI middleware: conventional header-name case on the wire (``Content-Type``), as the
    service always sent them; HTTP names are case-insensitive, but simple clients and scripts
    that index a plain dict of headers are not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def cased(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    (_SPECIAL_CASE.get(name.lower()) or name.title(), value)
                    for name, value in message.get("headers", [])
                ]
            await send(message)

        await self.app(scope, receive, cased)


class _ApiGate:
    """ASGI middleware: the token rules of ``/api/*`` (module docstring)."""

    def __init__(self, app: ASGIApp, config: HttpConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            refused = self.refused(Request(scope))
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refused(self, request: Request) -> Response | None:
        """Why an ``/api/`` request is refused, or ``None`` when it may proceed."""
        token = self.config.token
        if token is None:
            if self.config.is_loopback:
                return None
            return _error(
                HTTPStatus.FORBIDDEN, "this listener is not loopback: set [http] token to use /api/"
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.query_params.get("token", "")
        expected = token.get_secret_value().encode()
        if hmac.compare_digest(given.strip().encode(), expected):
            return None
        return _error(
            HTTPStatus.UNAUTHORIZED,
            "a bearer token is required",
            **{"WWW-Authenticate": 'Bearer realm="flybox"'},
        )


class HttpServer:
    """The HTTP listener of ``[http] listen``; an async context manager.

    Parameters
    ----------
    config
        The ``[http]`` section (address, token).
    registry
        The Prometheus registry served on ``/metrics``.
    report
        Makes the ``/api/status`` report.
    feed
        The dashboard's history and live updates (default: a feed nobody fills).
    health
        The ``/healthz`` check: returns ``(healthy, text)``; default: the status report's
        ``health`` (stalled loops, a full disk).
    """

    def __init__(
        self,
        config: HttpConfig,
        registry: CollectorRegistry,
        report: Callable[[], StatusReport],
        *,
        feed: DashboardFeed | None = None,
        health: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._report = report
        self.feed = feed if feed is not None else DashboardFeed()
        self._health = health
        self._extra: list[BaseRoute] = []
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._closing = asyncio.Event()

    @property
    def port(self) -> int:
        """The port listened on."""
        if self._socket is None:
            return self._config.port
        return int(self._socket.getsockname()[1])

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        """More routes (full paths; ``/api/...`` ones follow the token rules); call before
        entering."""
        self._extra.extend(routes)

    # ----------------------------------------------------------------------------- handlers
    async def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self._registry), 200, _NO_STORE, media_type=content_type)

    async def _healthz(self, request: Request) -> Response:
        if self._health is not None:
            healthy, text = self._health()
        else:  # the service decides (daemon/state.py: Heartbeats, DiskSpace) via the status
            health = self._report().health
            healthy, text = health.ok, (health.problem or "ok") if not health.ok else "ok"
        status = 200 if healthy else 503
        return Response(f"{text}\n".encode(), status, _NO_STORE, media_type=_TEXT)

    async def _status(self, request: Request) -> Response:
        body = self._report().model_dump_json().encode()
        return Response(body, 200, _NO_STORE, media_type=_JSON)

    async def _page(self, request: Request) -> Response:
        html = (STATIC / "dashboard.html").read_text()
        return HTMLResponse(html, headers=_NO_STORE)

    async def _history(self, request: Request) -> Response:
        body = json.dumps(
            {"status": json.loads(self._report().model_dump_json()), **self.feed.history()}
        )
        return Response(body.encode(), 200, _NO_STORE, media_type=_JSON)

    async def _thumbnail(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            png = await self.feed.thumbnail(name)
        except KeyError:
            return _error(HTTPStatus.NOT_FOUND, f"no recent micrograph named {name}")
        except Exception as exc:  # an unreadable micrograph: say so, the page shows a blank
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
        return Response(png, 200, {"Cache-Control": "private, max-age=600"}, media_type="image/png")

    async def _picks(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body = await self.feed.picks(name)
        except KeyError:
            return _error(HTTPStatus.NOT_FOUND, f"no recent micrograph named {name}")
        return Response(json.dumps(body).encode(), 200, _NO_STORE, media_type=_JSON)

    async def _events(self, request: Request) -> Response:
        """Server-Sent Events: one ``data:`` line per dashboard update."""

        async def stream() -> AsyncIterator[bytes]:
            with self.feed.listen() as updates:
                yield b"retry: 2000\n\n"
                while not self._closing.is_set():
                    try:
                        async with asyncio.timeout(_KEEPALIVE_SECONDS):
                            update = await updates.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if update is None:  # closing
                        return
                    yield f"event: {update[0]}\ndata: {update[1]}\n\n".encode()

        headers = {**_NO_STORE, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    def _app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            if isinstance(exc, HTTPException) and exc.status_code == 405:
                return _error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed")
            return _error(HTTPStatus.NOT_FOUND, f"no such endpoint: {request.url.path}")

        routes: list[BaseRoute] = [
            Route("/metrics", _read_only(self._metrics), methods=_ANY),
            Route("/healthz", _read_only(self._healthz), methods=_ANY),
            Route("/api/status", _read_only(self._status), methods=_ANY),
            Route("/api/dashboard/history", _read_only(self._history), methods=_ANY),
            Route("/api/dashboard/events", _read_only(self._events), methods=_ANY),
            Route(
                "/api/dashboard/micrographs/{name}/thumbnail.png",
                _read_only(self._thumbnail),
                methods=_ANY,
            ),
            Route("/api/dashboard/micrographs/{name}/picks", _read_only(self._picks), methods=_ANY),
            *self._extra,
            Route("/", _read_only(self._page), methods=_ANY),
            Mount("/static", StaticFiles(directory=STATIC), name="dashboard-static"),
        ]
        app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
        app.add_middleware(_ApiGate, config=self._config)
        app.add_middleware(_HeaderCase)
        return app

    # ----------------------------------------------------------------------------- lifetime
    def _bind(self) -> socket.socket:
        host, port = self._config.host, self._config.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            listen = self._config.listen
            raise ConfigError("http.listen", f"cannot listen on {listen}: {reason}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            listen = self._config.listen
            raise ConfigError("http.listen", f"cannot listen on {listen}: {reason}") from None
        return sock

    async def __aenter__(self) -> HttpServer:
        """Start listening.

        Raises
        ------
        ConfigError
            When the address cannot be listened on (in use, not this machine's).
        """
        if not self._config.is_loopback and self._config.token is None:
            log.warning(
                "HTTP listener %s is reachable from other machines and [http] token is not "
                "set: /api/* is refused (set a token to use it)",
                self._config.listen,
            )
        self._closing.clear()
        sock = self._socket = self._bind()
        config = uvicorn.Config(
            self._app(),
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            self._socket = None
            raise
        self._server = server
        log.info("HTTP listening on %s (/, /metrics, /api/status, /healthz)", self._config.listen)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        sock, self._socket = self._socket, None
        if server is None:
            return
        self._closing.set()
        self.feed.close_listeners()  # event streams end: their connections can close
        try:
            await server.shutdown(sockets=[sock] if sock is not None else None)
        finally:
            if sock is not None:
                sock.close()
