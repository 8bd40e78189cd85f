"""A small threaded HTTP server for /metrics, /healthz and /readyz.

The stdlib ``ThreadingHTTPServer`` on its own thread: scrapes never run on the event loop.
``/metrics`` is the exposition of the given registry; ``/healthz`` and ``/readyz`` call
injected checks returning ``(ok, detail)`` and answer 200 or 503 with the detail. The
engine's ``detnet probe`` and the controller's ``detnet control`` both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from detnet.engine.errors import EngineError

Check = Callable[[], tuple[bool, str]]


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class HttpServerError(EngineError):
    """The metrics server cannot listen (address in use, bad address...)."""


def parse_listen(spec: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one)."""
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise HttpServerError(f"listen address {spec!r}: expected HOST:PORT")
    return host, int(port)


class MetricsServer:
    """Serves a registry over HTTP on a background thread; ``start()`` / ``stop()``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        healthz: Check | None = None,
        readyz: Check | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.healthz = healthz or _always_ok
        self.readyz = readyz or _always_ok
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind and start serving; raise HttpServerError when the address is unusable."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = generate_latest(outer.registry)
                    except Exception as exc:  # a broken collector must not kill the thread
                        self._reply(500, f"collect failed: {exc}\n".encode(), "text/plain")
                        return
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    check = outer.healthz if path == "/healthz" else outer.readyz
                    try:
                        ok, detail = check()
                    except Exception as exc:
                        ok, detail = False, f"check failed: {exc}"
                    self._reply(200 if ok else 503, f"{detail}\n".encode(), "text/plain")
                else:
                    self._reply(404, b"not found\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood stderr

        server_cls = type(
            "_Server",
            (ThreadingHTTPServer,),
            {"daemon_threads": True, "address_family": _family(self.host)},
        )
        try:
            self._server = server_cls((self.host, self.port), Handler)
        except OSError as exc:
            raise HttpServerError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="detnet-metrics",
            daemon=True,
        )
        self._thread.start()
        return self.address

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
