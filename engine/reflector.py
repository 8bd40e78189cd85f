"""The reflector service: the UDP fast path and the TCP echo/connect server on asyncio.

``ReflectorServer`` is a thin adapter. UDP: it binds a socket, registers its fd with
``loop.add_reader`` and lets the native ``Reflector.serve()`` drain and answer in batches.
TCP: it accepts connections (connect-latency probes just connect and close) and echoes
framed probes (one frame = one probe packet, ``detnet.native.make_reply`` with realtime
clock reads as reflector RX/TX). Garbage closes that connection and is counted; each source
address has a token bucket for TCP frames too (``native.SourceBuckets``, the table the UDP
fast path uses). Used by ``detnet reflect``, tests and the lab.

The TCP side is bounded: at most ``tcp_max_connections`` connections (below the
file-descriptor limit) in a ``ConnectionTable`` that closes the one that has gone longest
without completing a frame to admit a newcomer, so a flood of idle connections cannot
lock probes out; a frame must complete within ``tcp_frame_timeout`` of its first byte
(and a client must read its replies within it); a connection idle for
``tcp_idle_timeout`` is closed; accepted sockets use TCP keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import socket
import struct
from dataclasses import dataclass
from typing import cast

from detnet import native
from detnet.engine.connections import ConnectionTable
from detnet.engine.errors import EngineError

_PREFIX = struct.Struct("!IBBH")  # magic, version, flags, length: the first 8 bytes
_TCP_BACKLOG = 1024  # a burst of connect probes must not wait for SYN retransmits
_TCP_DEFAULT_MAX_CONNECTIONS = 1024
_FD_RESERVE = 64  # descriptors kept free for everything else the process opens
# Keepalive on accepted sockets: a peer that vanished without a FIN is found in ~30 s.
_KEEPIDLE_S, _KEEPINTVL_S, _KEEPCNT = 15, 5, 3


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
    # None: 1024, or fewer when the file-descriptor limit leaves less room.
    tcp_max_connections: int | None = None
    tcp_idle_timeout: float = 60.0  # seconds without a frame before a connection is closed
    tcp_frame_timeout: float = 2.0  # seconds from a frame's first byte to its last
    two_step: bool = True  # send kernel TX stamps two-step to probers that ask

    def __post_init__(self) -> None:
        if self.tcp_max_connections is not None and self.tcp_max_connections < 1:
            raise ReflectorError(
                f"tcp_max_connections {self.tcp_max_connections}: must be at least 1"
            )
        for name in ("tcp_idle_timeout", "tcp_frame_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ReflectorError(f"{name} {value}: must be a number of seconds > 0")


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


def tcp_connection_limit(requested: int | None) -> int:
    """The TCP connection cap: ``requested`` (None: the default) checked against the
    descriptors the process has left, so the cap is reached before the fd limit is."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        room = 1 << 20
    else:
        room = soft - len(os.listdir("/proc/self/fd")) - _FD_RESERVE
    if requested is None:
        return max(1, min(_TCP_DEFAULT_MAX_CONNECTIONS, room))
    if requested > room:
        raise ReflectorError(
            f"tcp_max_connections {requested}: only {max(room, 0)} file descriptors are left "
            f"under the limit of {soft} (ulimit -n); lower the cap or raise the limit"
        )
    return requested


def _set_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPCNT)


class _TcpEcho(asyncio.Protocol):
    """One TCP connection: frames in, replies out, one deadline at a time.

    The deadline is the idle timeout while waiting for a frame, and the frame timeout
    from a frame's first byte (later bytes do not extend it: a trickle is a stall) or
    while the client does not read its replies. One timer, moved only when a deadline
    comes earlier; a timer that fires early re-arms itself for the current deadline.
    """

    __slots__ = (
        "_buf",
        "_deadline",
        "_loop",
        "_server",
        "_source",
        "_stalled",
        "_timer",
        "transport",
    )

    def __init__(self, server: ReflectorServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._buf = bytearray()
        self._source = "?"
        self._deadline = 0.0
        self._stalled = False  # mid-frame or writes paused: the frame timeout applies
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self._server
        # uvloop's transports are not asyncio.Transport subclasses: cast, do not check.
        self.transport = cast(asyncio.Transport, transport)
        victim = srv._table.admit(self)  # nothing is ever busy here: admit never refuses
        srv.tcp_connections += 1
        if victim is not None:
            srv.tcp_evicted += 1
            victim.abort()
        peer = transport.get_extra_info("peername")
        self._source = str(peer[0]) if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Already reset by the peer (a connect probe): nothing to keep alive.
            with contextlib.suppress(OSError):
                _set_keepalive(sock)
        self._wait_for_frame()

    def data_received(self, data: bytes) -> None:
        rx_ns = native.realtime_ns()  # every frame completed by this chunk arrived now
        buf = self._buf
        starting = not buf
        buf += data
        frames = 0
        while len(buf) >= _PREFIX.size:
            magic, version, _flags, length = _PREFIX.unpack_from(buf)
            if (
                magic != native.MAGIC
                or version != native.VERSION
                or not native.MIN_SIZE <= length <= native.MAX_SIZE
            ):
                self._server.tcp_invalid += 1
                self._hang_up()  # garbage: we cannot find the next frame boundary
                return
            if len(buf) < length:
                break
            frame = bytes(buf[:length])
            del buf[:length]
            frames += 1
            if not self._echo(frame, rx_ns):
                return
        if frames:
            self._server._table.progressed(self)
        if not buf:
            self._wait_for_frame()
        elif starting or frames:
            self._stall_deadline()  # a new frame began in this chunk

    def _echo(self, frame: bytes, rx_ns: int) -> bool:
        srv = self._server
        srv.tcp_frames += 1
        # Validate and authenticate before the bucket, as the UDP path does: frames that
        # fail cost their connection, not the source's tokens.
        try:
            reply = native.make_reply(
                frame, rx_ns=rx_ns, tx_ns=native.realtime_ns(), key=srv.config.key
            )
        except native.HmacError:
            srv.tcp_bad_hmac += 1
            self._hang_up()
            return False
        except native.PacketError:
            srv.tcp_invalid += 1
            self._hang_up()
            return False
        if not srv._tcp_buckets.allow(self._source, native.monotonic_ns()):
            srv.tcp_rate_limited += 1
            return True
        assert self.transport is not None
        self.transport.write(reply)
        srv.tcp_replied += 1
        return True

    def eof_received(self) -> bool:
        if self._buf:
            self._server.tcp_invalid += 1  # the client hung up mid-frame
        return False  # close our side too

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its frames, and give it the
        # frame timeout to catch up.
        assert self.transport is not None
        self.transport.pause_reading()
        self._stall_deadline()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()
        if self._buf:
            self._stall_deadline()
        else:
            self._wait_for_frame()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._table.discard(self)
        self._buf.clear()
        self.transport = None

    def abort(self) -> None:
        """Close at once (evicted, timed out, server closing): buffers are dropped."""
        if self.transport is not None:
            self.transport.abort()

    def _hang_up(self) -> None:
        assert self.transport is not None
        self._buf.clear()
        self.transport.close()  # replies already written still go out

    def _wait_for_frame(self) -> None:
        self._stalled = False
        self._set_deadline(self._loop.time() + self._server.config.tcp_idle_timeout)

    def _stall_deadline(self) -> None:
        self._stalled = True
        self._set_deadline(self._loop.time() + self._server.config.tcp_frame_timeout)

    def _set_deadline(self, when: float) -> None:
        self._deadline = when
        timer = self._timer
        if timer is None or when < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        if self._stalled:
            self._server.tcp_stall_timeouts += 1
        else:
            self._server.tcp_idle_timeouts += 1
        self.transport.abort()


class ReflectorServer:
    """UDP reflector + TCP echo server on the running event loop."""

    def __init__(self, config: ReflectorConfig) -> None:
        if config.udp is None and config.tcp is None:
            raise ReflectorError("nothing to serve: give a UDP and/or a TCP address")
        self.config = config
        self._udp_sock: socket.socket | None = None
        self._reflector: native.Reflector | None = None
        self._tcp_server: asyncio.Server | None = None
        try:
            self._tcp_buckets = native.SourceBuckets(rate_pps=config.rate_pps, burst=config.burst)
        except ValueError as exc:
            raise ReflectorError(f"reflector rate limit: {exc}") from exc
        self._table: ConnectionTable[_TcpEcho] = ConnectionTable(limit=1)  # sized by start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._followup_timer: asyncio.TimerHandle | None = None
        self._followup_due = 0
        self.udp_errors = 0
        self.tcp_connections = 0
        self.tcp_frames = 0
        self.tcp_replied = 0
        self.tcp_invalid = 0
        self.tcp_bad_hmac = 0
        self.tcp_rate_limited = 0
        self.tcp_evicted = 0
        self.tcp_idle_timeouts = 0
        self.tcp_stall_timeouts = 0

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

    @property
    def tcp_max_connections(self) -> int:
        """The TCP connection cap in force (after start())."""
        return self._table.limit

    async def start(self) -> None:
        """Bind and start serving; on failure nothing is left open."""
        cfg = self.config
        loop = self._loop = asyncio.get_running_loop()
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
                        two_step=cfg.two_step,  # to requests that ask (docs/protocol.md)
                    )
                except ValueError as exc:
                    raise ReflectorError(f"reflector settings: {exc}") from exc
                # The wake descriptor, not the socket: a late TX stamp on the error queue
                # must wake us, not put the socket into POLLERR (which stops uvloop's
                # watcher for good).
                loop.add_reader(self._reflector.fileno(), self._on_udp_readable)
            if cfg.tcp is not None:
                self._table = ConnectionTable(limit=tcp_connection_limit(cfg.tcp_max_connections))
                host, port = cfg.tcp
                try:
                    self._tcp_server = await loop.create_server(
                        lambda: _TcpEcho(self, loop),
                        host,
                        port,
                        reuse_address=True,
                        backlog=_TCP_BACKLOG,
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
        self._arm_followups()

    def _arm_followups(self) -> None:
        """Keep one timer for the next follow-up that is due (two-step stamps whose
        session sent no next request in time)."""
        refl, loop = self._reflector, self._loop
        if refl is None or loop is None or self._udp_sock is None:
            return
        due = refl.next_followup_ns()
        if not due:
            return
        timer = self._followup_timer
        if timer is not None:
            if self._followup_due <= due:
                return  # the armed timer comes first and re-arms after flushing
            timer.cancel()
        # libuv rounds timers to milliseconds: 1 ms late rather than early.
        delay = max(due - native.monotonic_ns(), 0) / 1e9 + 0.001
        self._followup_due = due
        self._followup_timer = loop.call_later(delay, self._on_followup_timer)

    def _on_followup_timer(self) -> None:
        self._followup_timer = None
        if self._reflector is None or self._udp_sock is None:
            return
        try:
            self._reflector.flush()
        except OSError:
            self.udp_errors += 1
        self._arm_followups()

    def stats(self) -> dict[str, int]:
        """Counters: the UDP reflector's (received, replied, ...) and tcp_* ones."""
        out = dict.fromkeys(("received", "replied", "invalid", "bad_hmac", "rate_limited"), 0)
        if self._reflector is not None:
            out.update(self._reflector.stats())
        out.update(
            udp_errors=self.udp_errors,
            tcp_connections=self.tcp_connections,
            tcp_open=len(self._table),
            tcp_frames=self.tcp_frames,
            tcp_replied=self.tcp_replied,
            tcp_invalid=self.tcp_invalid,
            tcp_bad_hmac=self.tcp_bad_hmac,
            tcp_rate_limited=self.tcp_rate_limited,
            tcp_evicted=self.tcp_evicted,
            tcp_idle_timeouts=self.tcp_idle_timeouts,
            tcp_stall_timeouts=self.tcp_stall_timeouts,
        )
        return out

    async def close(self) -> None:
        """Stop serving and close every socket and connection (idempotent)."""
        if self._followup_timer is not None:
            self._followup_timer.cancel()
            self._followup_timer = None
        if self._udp_sock is not None:
            if self._reflector is not None:
                # Kept (closed) for its counters: stats() still reports them.
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(self._reflector.fileno())
                self._reflector.close()
            self._udp_sock.close()
            self._udp_sock = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            await self._tcp_server.wait_closed()
            self._tcp_server = None
        for conn in list(self._table):
            conn.abort()
        if len(self._table):
            await asyncio.sleep(0)  # let the aborted transports report connection_lost
