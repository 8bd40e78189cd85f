"""The bounded HTTP server for /metrics, /healthz, /readyz (and a caller's own routes).

aiohttp on a dedicated thread with its own event loop: scrapes (the collector computes
numpy statistics) never run on the probing loop. ``/metrics`` is prometheus_client's
aiohttp handler, so content negotiation is the client library's: OpenMetrics through the
Accept header, gzip through Accept-Encoding. ``/healthz`` and ``/readyz`` call injected
checks returning ``(ok, detail)`` and answer 200 or 503 with the detail. Extra GET routes
(``detnet agent``'s ``/v1/usage``) get the same bounds.

Every connection is bounded (``HttpLimits``): a listen backlog that absorbs a burst of
scrapes, a table of at most ``max_connections`` that evicts the stalest idle connection
to admit a newcomer (``detnet.engine.connections``), a deadline for the request head
from its first byte (slowloris), an idle keep-alive timeout, a deadline for a reader that
stops reading the response, line/field/header-count limits, and a handler timeout.
Clients that go away, or send garbage, cost one debug line, never a traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from detnet.engine.connections import ConnectionTable, TableFull
from detnet.engine.errors import EngineError

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n"
)


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class HttpServerError(EngineError):
    """The metrics server cannot listen (address in use, bad address, bad limits...)."""


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """The bounds of every connection; times in seconds."""

    backlog: int = 1024  # the kernel caps it at net.core.somaxconn
    max_connections: int = 256
    header_timeout: float = 5.0  # first byte of a request head -> the whole head
    idle_timeout: float = 30.0  # open or last response -> the next complete request head
    write_timeout: float = 10.0  # a reader that stops reading the response is cut off
    handler_timeout: float = 10.0  # an async route that takes longer answers 503
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64

    def __post_init__(self) -> None:
        for name in ("backlog", "max_connections", "max_line_size", "max_field_size"):
            if getattr(self, name) < 1:
                raise HttpServerError(f"HTTP limits: {name} must be at least 1")
        if self.max_headers < 1:
            raise HttpServerError("HTTP limits: max_headers must be at least 1")
        for name in ("header_timeout", "idle_timeout", "write_timeout", "handler_timeout"):
            if not getattr(self, name) > 0:
                raise HttpServerError(f"HTTP limits: {name} must be > 0 seconds")


class _ClientErrorLog(logging.Logger):
    """aiohttp logs a malformed request with a full traceback at ERROR: anyone who can
    reach the port could flood the logs. Our own handlers' errors are caught and logged
    before aiohttp sees them, so what reaches this logger is the client's: one debug line.
    """

    def handle(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args = None
            record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        super().handle(record)


_client_log = _ClientErrorLog(f"{__name__}.client")
_client_log.parent = log


class _Connection(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection and enforces the per-connection
    deadlines aiohttp lacks: the request head's, and the stalled reader's."""

    def __init__(self, edge: _Edge) -> None:
        self._edge = edge
        self.inner: asyncio.Protocol | None = None  # aiohttp's RequestHandler
        self.transport: asyncio.Transport | None = None
        self._serving = False
        self._evicted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert self.inner is not None
        # uvloop's transports are not asyncio.Transport subclasses: cast, do not check.
        self.transport = transport = cast(asyncio.Transport, transport)
        if self._evicted:  # evicted between accept() and this callback
            transport.abort()
            return
        self._edge.by_transport[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self.inner is not None
        if not self._serving and self._head_timer is None:
            self._head_timer = self._edge.loop.call_later(
                self._edge.limits.header_timeout, self._head_timed_out
            )
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        assert self.inner is not None
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        assert self.inner is not None
        self.inner.pause_writing()
        if self._write_timer is None:
            self._write_timer = self._edge.loop.call_later(
                self._edge.limits.write_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        assert self.inner is not None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._edge.table.discard(self)
        if self.transport is not None:
            self._edge.by_transport.pop(self.transport, None)
        if self.inner is not None and not self._evicted:
            self.inner.connection_lost(exc)

    def request_started(self) -> None:
        """A complete request head reached a handler: no head deadline, not evictable."""
        self._serving = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._edge.table.busy(self)

    def request_done(self) -> None:
        self._serving = False
        self._edge.table.done(self)

    def evict(self) -> None:
        """Close now (the table chose this connection to make room)."""
        if self.transport is None:
            self._evicted = True  # connection_made has not run yet
        else:
            self.transport.abort()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._serving and self.transport is not None:
            self._edge.header_timeouts += 1
            self.transport.abort()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if self.transport is not None:
            self._edge.write_timeouts += 1
            self.transport.abort()


class _Refused(asyncio.Protocol):
    """The answer when every connection is busy: 503 and close, nothing parsed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(_REFUSED)
        transport.close()


class _Edge:
    """The server's state on its own loop: the table, the deadlines, the counters."""

    def __init__(self, limits: HttpLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self.table: ConnectionTable[_Connection] = ConnectionTable(limit=limits.max_connections)
        self.by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self.web_server: web.Server | None = None
        self.accepted = 0
        self.refused = 0
        self.evicted = 0
        self.header_timeouts = 0
        self.write_timeouts = 0

    def accept(self) -> asyncio.Protocol:
        """The listening socket's protocol factory: admit, evict, or refuse."""
        assert self.web_server is not None
        conn = _Connection(self)
        try:
            victim = self.table.admit(conn)
        except TableFull:
            self.refused += 1
            return _Refused()
        if victim is not None:
            self.evicted += 1
            victim.evict()
        self.accepted += 1
        conn.inner = self.web_server()
        return conn

    @web.middleware
    async def middleware(self, request: web.Request, handler: RouteHandler) -> web.StreamResponse:
        """Mark the connection busy while served; a failing route is one log line."""
        conn = self.by_transport.get(request.transport) if request.transport else None
        if conn is not None:
            conn.request_started()
        try:
            async with asyncio.timeout(self.limits.handler_timeout):
                return await handler(request)
        except web.HTTPException:
            raise
        except TimeoutError:
            log.warning(
                "%s %s: no answer within %.1f s",
                request.method,
                request.path,
                self.limits.handler_timeout,
            )
            return web.Response(status=503, text="timed out\n")
        except Exception as exc:
            log.warning(
                "%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc
            )
            return web.Response(status=500, text="internal error\n")
        finally:
            if conn is not None:
                conn.request_done()

    def abort_all(self) -> None:
        for conn in list(self.table):
            conn.evict()


def _check_route(check: Check) -> RouteHandler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            ok, detail = check()
        except Exception as exc:  # a broken check is a failed check, not a 500
            ok, detail = False, f"check failed: {exc}"
        return web.Response(status=200 if ok else 503, text=f"{detail}\n")

    return handle


def _listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise HttpServerError(f"cannot listen on {shown}: {exc}") from exc
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HttpServerError(f"cannot listen on {shown}: {exc.strerror or exc}") from exc
    return sock


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # optional at run time, like the engine's loop
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class MetricsServer:
    """Serves a registry, health checks and extra routes on a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        healthz: Check | None = None,
        readyz: Check | None = None,
        routes: Mapping[str, RouteHandler] | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.healthz = healthz or _always_ok
        self.readyz = readyz or _always_ok
        self.routes: dict[str, RouteHandler] = {
            "/metrics": make_aiohttp_handler(registry),
            "/healthz": _check_route(lambda: self.healthz()),
            "/readyz": _check_route(lambda: self.readyz()),
        }
        for path, handler in (routes or {}).items():
            if not path.startswith("/") or path in self.routes:
                raise HttpServerError(f"route {path!r}: must start with / and be new")
            self.routes[path] = handler
        self.limits = limits or HttpLimits()
        self._sock: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._edge: _Edge | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        return self._bound or (self.host, self.port)

    def start(self) -> tuple[str, int]:
        """Bind and start serving; raise HttpServerError when the address is unusable."""
        if self._thread is not None:
            raise HttpServerError("the metrics server is already started")
        self._sock = _listen_socket(self.host, self.port, self.limits.backlog)
        host, port = self._sock.getsockname()[:2]
        self._bound = address = (str(host), int(port))
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(self._sock, ready), name="detnet-http", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except Exception as exc:
            self.stop()
            raise HttpServerError(f"cannot serve on {address[0]}:{address[1]}: {exc}") from exc
        return address

    def stats(self) -> dict[str, int]:
        """Counters: connections accepted, refused, evicted, timed out; open now."""
        edge = self._edge
        if edge is None:
            return dict.fromkeys(
                ("accepted", "refused", "evicted", "header_timeouts", "write_timeouts", "open"),
                0,
            )
        return {
            "accepted": edge.accepted,
            "refused": edge.refused,
            "evicted": edge.evicted,
            "header_timeouts": edge.header_timeouts,
            "write_timeouts": edge.write_timeouts,
            "open": len(edge.table),
        }

    def stop(self) -> None:
        """Stop serving and close the socket and every connection (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._bound = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        loop = _new_loop()
        self._loop = loop
        try:
            try:
                runner, server = loop.run_until_complete(self._open(loop, sock))
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self._close(runner, server))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._loop = None

    async def _open(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> tuple[web.AppRunner, asyncio.Server]:
        limits = self.limits
        edge = _Edge(limits, loop)
        app = web.Application(middlewares=[edge.middleware])
        for path, handler in self.routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,  # a scrape every few seconds would flood the log
            logger=_client_log,
            keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
            lingering_time=0,  # an unread request body closes the connection
            handler_cancellation=True,  # a connection that is gone stops its handler
            shutdown_timeout=1.0,
        )
        await runner.setup()
        edge.web_server = runner.server
        server = await loop.create_server(edge.accept, sock=sock, backlog=limits.backlog)
        self._edge = edge
        return runner, server

    async def _close(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        server.close()
        if self._edge is not None:
            self._edge.abort_all()
        await runner.cleanup()
        await server.wait_closed()
