"""The service's small HTTP server: ``/metrics``, ``/api/status``, ``/healthz``.

It runs in the service's event loop on asyncio streams (HTTP/1.1, GET and HEAD, one request
per connection), so the metrics are read where they are updated and no thread is needed.

Access: ``/metrics`` and ``/healthz`` are open (Prometheus scrapes without credentials; they
carry no paths or secrets). ``/api/*`` needs ``Authorization: Bearer <[http] token>`` when a
token is configured, and is refused outright (403) on a non-loopback listener without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from flybox.config import HttpConfig
from flybox.daemon.telemetry.status import StatusReport
from flybox.errors import ConfigError

__all__ = ["HttpServer"]

log = logging.getLogger(__name__)

_READ_TIMEOUT_SECONDS = 10.0
_HEAD_LIMIT = 16 * 1024
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


@dataclass
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = _TEXT
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, *, head_only: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _error(status: HTTPStatus, message: str, **headers: str) -> _Response:
    body = json.dumps({"error": message}).encode()
    return _Response(status, body, _JSON, dict(headers))


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
    """

    def __init__(
        self,
        config: HttpConfig,
        registry: CollectorRegistry,
        report: Callable[[], StatusReport],
    ) -> None:
        self._config = config
        self._registry = registry
        self._report = report
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on."""
        if self._server is None or not self._server.sockets:
            return self._config.port
        return int(self._server.sockets[0].getsockname()[1])

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
        try:
            self._server = await asyncio.start_server(
                self._handle,
                self._config.host,
                self._config.port,
                reuse_address=True,
                limit=_HEAD_LIMIT,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            listen = self._config.listen
            raise ConfigError("http.listen", f"cannot listen on {listen}: {reason}") from None
        log.info("HTTP listening on %s (/metrics, /api/status, /healthz)", self._config.listen)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_SECONDS)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            except asyncio.LimitOverrunError:
                head = b""
                response = _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request too large")
                method = "GET"
            else:
                method, response = self._respond(head)
            writer.write(response.encode(head_only=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            log.exception("HTTP: answering a request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    def _respond(self, head: bytes) -> tuple[str, _Response]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "GET", _error(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return method, _error(
                HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD", Allow="GET, HEAD"
            )
        path = target.partition("?")[0]
        try:
            return method, self._route(path, headers)
        except Exception:
            log.exception("HTTP: %s failed", path)
            return method, _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")

    def _route(self, path: str, headers: dict[str, str]) -> _Response:
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return _Response(HTTPStatus.OK, encoder(self._registry), content_type)
        if path == "/healthz":  # the service decides (daemon/state.py Heartbeats, DiskSpace)
            health = self._report().health
            if not health.ok:
                return _Response(HTTPStatus.SERVICE_UNAVAILABLE, f"{health.problem}\n".encode())
            return _Response(HTTPStatus.OK, b"ok\n")
        if path.startswith("/api/"):
            refused = self._refused(headers)
            if refused is not None:
                return refused
            if path == "/api/status":
                body = self._report().model_dump_json().encode()
                return _Response(HTTPStatus.OK, body, _JSON)
            return _error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        if path == "/":
            return _Response(HTTPStatus.OK, b"flybox: /metrics /api/status /healthz\n")
        return _error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    def _refused(self, headers: dict[str, str]) -> _Response | None:
        """Why an ``/api/`` request is refused, or ``None`` when it may proceed."""
        token = self._config.token
        if token is None:
            if self._config.is_loopback:
                return None
            return _error(
                HTTPStatus.FORBIDDEN, "this listener is not loopback: set [http] token to use /api/"
            )
        scheme, _, given = headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return None
        return _error(
            HTTPStatus.UNAUTHORIZED,
            "a bearer token is required",
            **{"WWW-Authenticate": 'Bearer realm="flybox"'},
        )
