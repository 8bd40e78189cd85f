"""The reflector service: the UDP fast path and the TCP echo/connect server on asyncio.

``ReflectorServer`` is a thin adapter. UDP: it binds a socket, registers its fd with
``loop.add_reader`` and lets the native ``Reflector.serve()`` drain and answer in batches.
TCP: it accepts connections (connect-latency probes just connect and close) and echoes
framed probes (one frame = one probe packet, ``detnet.native.make_reply`` with realtime
clock reads as reflector RX/TX). Garbage closes that connection and is counted; each source
address has a token bucket for TCP frames too. Used by ``detnet reflect``, tests and the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass

from detnet import native
from detnet.engine.errors import EngineError

_PREFIX = struct.Struct("!IBBH")  # magic, version, flags, length: the first 8 bytes
_TCP_TABLE_SIZE = 4096


class ReflectorError(EngineError):
    """The reflector cannot start (address in use, bad address, bad limits)."""


@dataclass(frozen=True, kw_only=True)
class ReflectorConfig:
    """What to serve. ``udp``/``tcp``: (host, port) to bind, port 0 for any; None: off."""

    udp: tuple[str, int] | None = None
    tcp: tuple[str, int] | None = None
    key: bytes | None = None
    rate_pps: float = 0.0  # per source address, UDP packets and TCP frames; 0 = unlimited
    burst: int = 32
    batch: int = 64


class TokenBuckets:
    """Per-source token buckets in a bounded table (sans-I/O: ``now_ns`` comes in)."""

    def __init__(self, *, rate_pps: float, burst: int, size: int = _TCP_TABLE_SIZE) -> None:
        self._rate = rate_pps
        self._burst = float(burst)
        self._size = size
        self._table: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def allow(self, source: str, now_ns: int) -> bool:
        """Take one token from ``source``'s bucket; False when it is empty."""
        if self._rate <= 0:
            return True
        tokens, last = self._table.pop(source, (self._burst, now_ns))
        tokens = min(self._burst, tokens + (now_ns - last) * self._rate / 1e9)
        allowed = tokens >= 1.0
        self._table[source] = (tokens - 1.0 if allowed else tokens, now_ns)
        if len(self._table) > self._size:
            self._table.popitem(last=False)  # the stalest source goes first
        return allowed


def _bind_udp(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise ReflectorError(f"cannot resolve UDP address {host!r}: {exc}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(addr)
        sock.setblocking(False)
        # Room for bursts while the loop is busy elsewhere (capped by net.core.rmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    except OSError as exc:
        sock.close()
        raise ReflectorError(f"cannot bind UDP {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class ReflectorServer:
    """UDP reflector + TCP echo server on the running event loop."""

    def __init__(self, config: ReflectorConfig) -> None:
        if config.udp is None and config.tcp is None:
            raise ReflectorError("nothing to serve: give a UDP and/or a TCP address")
        self.config = config
        self._udp_sock: socket.socket | None = None
        self._reflector: native.Reflector | None = None
        self._tcp_server: asyncio.Server | None = None
        self._tcp_buckets = TokenBuckets(rate_pps=config.rate_pps, burst=config.burst)
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.udp_errors = 0
        self.tcp_connections = 0
        self.tcp_frames = 0
        self.tcp_replied = 0
        self.tcp_invalid = 0
        self.tcp_bad_hmac = 0
        self.tcp_rate_limited = 0

    @property
    def udp_address(self) -> tuple[str, int] | None:
        """The bound UDP (host, port), or None when UDP is off."""
        if self._udp_sock is None:
            return None
        host, port = self._udp_sock.getsockname()[:2]
        return host, port

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP (host, port), or None when TCP is off."""
        if self._tcp_server is None or not self._tcp_server.sockets:
            return None
        host, port = self._tcp_server.sockets[0].getsockname()[:2]
        return host, port

    async def start(self) -> None:
        """Bind and start serving; on failure nothing is left open."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        try:
            if cfg.udp is not None:
                self._udp_sock = _bind_udp(*cfg.udp)
                try:
                    self._reflector = native.Reflector(
                        self._udp_sock,
                        key=cfg.key,
                        rate_pps=cfg.rate_pps,
                        burst=cfg.burst,
                        batch=cfg.batch,
                    )
                except ValueError as exc:
                    raise ReflectorError(f"reflector settings: {exc}") from exc
                self._loop.add_reader(self._udp_sock.fileno(), self._on_udp_readable)
            if cfg.tcp is not None:
                host, port = cfg.tcp
                try:
                    self._tcp_server = await asyncio.start_server(
                        self._on_tcp_client, host, port, reuse_address=True
                    )
                except OSError as exc:
                    raise ReflectorError(
                        f"cannot listen on TCP {host}:{port}: {exc.strerror or exc}"
                    ) from exc
        except BaseException:
            await self.close()
            raise

    def _on_udp_readable(self) -> None:
        assert self._reflector is not None
        try:
            self._reflector.serve()
        except OSError:
            # A socket error must not kill the loop's watcher; it is counted and logged.
            self.udp_errors += 1

    async def _on_tcp_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.tcp_connections += 1
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        try:
            await self._echo_frames(reader, writer, source)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: a connect probe or an aborted echo
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _echo_frames(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        key = self.config.key
        while True:
            try:
                prefix = await reader.readexactly(_PREFIX.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self.tcp_invalid += 1
                return
            rx_ns = native.realtime_ns()
            magic, version, _flags, length = _PREFIX.unpack(prefix)
            if (
                magic != native.MAGIC
                or version != native.VERSION
                or not native.MIN_SIZE <= length <= native.MAX_SIZE
            ):
                self.tcp_invalid += 1
                return  # garbage: we cannot find the next frame boundary, so hang up
            frame = prefix + await reader.readexactly(length - _PREFIX.size)
            self.tcp_frames += 1
            if not self._tcp_buckets.allow(source, native.monotonic_ns()):
                self.tcp_rate_limited += 1
                continue
            try:
                reply = native.make_reply(frame, rx_ns=rx_ns, tx_ns=native.realtime_ns(), key=key)
            except native.HmacError:
                self.tcp_bad_hmac += 1
                return
            except native.PacketError:
                self.tcp_invalid += 1
                return
            writer.write(reply)
            await writer.drain()
            self.tcp_replied += 1

    def stats(self) -> dict[str, int]:
        """Counters: the UDP reflector's (received, replied, ...) and tcp_* ones."""
        out = dict.fromkeys(("received", "replied", "invalid", "bad_hmac", "rate_limited"), 0)
        if self._reflector is not None:
            out.update(self._reflector.stats())
        out.update(
            udp_errors=self.udp_errors,
            tcp_connections=self.tcp_connections,
            tcp_frames=self.tcp_frames,
            tcp_replied=self.tcp_replied,
            tcp_invalid=self.tcp_invalid,
            tcp_bad_hmac=self.tcp_bad_hmac,
            tcp_rate_limited=self.tcp_rate_limited,
        )
        return out

    async def close(self) -> None:
        """Stop serving and close every socket and connection (idempotent)."""
        if self._udp_sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._udp_sock.fileno())
            self._udp_sock.close()
            self._udp_sock = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            await self._tcp_server.wait_closed()
            self._tcp_server = None
        # Abort the connections so each handler ends on its own (EOF); cancelling them
        # instead trips asyncio 3.11's start_server callback (task.exception() raises).
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
