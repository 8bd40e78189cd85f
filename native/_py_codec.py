"""Pure-Python fallback of the native core: same API as ``_core.pyx`` (see ``_core.pyi``).

Used when the Cython extension is not built or ``DETNET_NO_EXTENSIONS=1``. It speaks the
same packet format (docs/protocol.md) with ``struct``, reads kernel timestamps with
``socket.recvmsg`` ancillary data, and loops over ``sendmsg``/``recvmsg`` where the Cython
build batches with ``sendmmsg``/``recvmmsg``. Correct, and several times slower.
"""

from __future__ import annotations

import errno
import hmac
import socket
import struct
import time
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "FLAG_HMAC",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "HMAC_SIZE",
    "MAGIC",
    "MAX_SIZE",
    "MIN_SIZE",
    "REPLY_DTYPE",
    "SENT_DTYPE",
    "TS_KERNEL",
    "TS_USER",
    "VERSION",
    "HmacError",
    "PacketError",
    "Probe",
    "ProbeSocket",
    "Reflector",
    "clock_read_cost_ns",
    "decode_probe",
    "encode_probe",
    "make_reply",
    "monotonic_ns",
    "realtime_ns",
    "tcp_info_rtt",
]

MAGIC = 0x44544E54
VERSION = 1
HEADER_SIZE = 48
HMAC_SIZE = 16
MIN_SIZE = HEADER_SIZE
MAX_SIZE = 9000
FLAG_REPLY = 0x01
FLAG_HMAC = 0x02
_KNOWN_FLAGS = FLAG_REPLY | FLAG_HMAC
TS_USER = 0
RCVBUF_BYTES = 4 << 20  # a probe socket's receive buffer (capped by net.core.rmem_max)
TS_KERNEL = 1

_HEADER = struct.Struct("!IBBHIIQQQQ")
_U64 = (1 << 64) - 1

SENT_DTYPE = np.dtype([("seq", "u8"), ("user_tx_ns", "i8"), ("kernel_tx_ns", "i8")])
REPLY_DTYPE = np.dtype(
    [
        ("seq", "u8"),
        ("session", "u4"),
        ("size", "u4"),
        ("tx_ns", "i8"),
        ("refl_rx_ns", "i8"),
        ("refl_tx_ns", "i8"),
        ("kernel_rx_ns", "i8"),
        ("user_rx_ns", "i8"),
        ("source", "u1"),
    ]
)

# Linux socket options the socket module does not name (asm-generic values, x86_64/arm64).
_SO_TIMESTAMPNS = 35
_SO_TIMESTAMPING = 37
_SCM_TIMESTAMPNS = _SO_TIMESTAMPNS
_SCM_TIMESTAMPING = _SO_TIMESTAMPING
_SOF_TX_SOFTWARE = 1 << 1
_SOF_RX_SOFTWARE = 1 << 3
_SOF_SOFTWARE = 1 << 4
_SOF_OPT_ID = 1 << 7
_SOF_OPT_TSONLY = 1 << 11
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_EE_ORIGIN_TIMESTAMPING = 4
_SCM_TSTAMP_SND = 0
_TCP_INFO = 11
_ANC_SIZE = 512
_EXT_ERR = struct.Struct("=IBBBBII")
_TIMESPEC3 = struct.Struct("=qqqqqq")


class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""


class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""


class Probe:
    """A decoded probe packet (request or reply)."""

    __slots__ = ("flags", "refl_rx_ns", "refl_tx_ns", "seq", "session", "size", "tx_ns")

    def __init__(
        self,
        *,
        flags: int,
        size: int,
        session: int,
        seq: int,
        tx_ns: int,
        refl_rx_ns: int,
        refl_tx_ns: int,
    ) -> None:
        self.flags = flags
        self.size = size
        self.session = session
        self.seq = seq
        self.tx_ns = tx_ns
        self.refl_rx_ns = refl_rx_ns
        self.refl_tx_ns = refl_tx_ns

    @property
    def is_reply(self) -> bool:
        """True when the REPLY flag is set (the packet came from a reflector)."""
        return bool(self.flags & FLAG_REPLY)

    def __repr__(self) -> str:
        return (
            f"Probe(flags={self.flags:#x}, size={self.size}, session={self.session}, "
            f"seq={self.seq}, tx_ns={self.tx_ns}, refl_rx_ns={self.refl_rx_ns}, "
            f"refl_tx_ns={self.refl_tx_ns})"
        )


def _mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    return hmac.digest(key, data, "sha256")[:HMAC_SIZE]


def encode_probe(
    *,
    session: int,
    seq: int,
    tx_ns: int,
    size: int = 64,
    key: bytes | None = None,
    flags: int = 0,
    refl_rx_ns: int = 0,
    refl_tx_ns: int = 0,
) -> bytes:
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed)."""
    if flags & ~FLAG_REPLY:
        raise ValueError(f"flags {flags:#x}: only FLAG_REPLY may be given (HMAC follows key)")
    if key is not None:
        if not key:
            raise ValueError("HMAC key must not be empty")
        flags |= FLAG_HMAC
    min_size = MIN_SIZE + (HMAC_SIZE if key is not None else 0)
    if not min_size <= size <= MAX_SIZE:
        raise ValueError(f"probe size {size} is not in {min_size}..{MAX_SIZE}")
    if not 0 <= session <= 0xFFFFFFFF:
        raise ValueError(f"session {session} does not fit in 32 bits")
    for name, value in (("seq", seq), ("tx_ns", tx_ns), ("refl_rx_ns", refl_rx_ns)):
        if not 0 <= value <= _U64:
            raise ValueError(f"{name} {value} does not fit in unsigned 64 bits")
    if not 0 <= refl_tx_ns <= _U64:
        raise ValueError(f"refl_tx_ns {refl_tx_ns} does not fit in unsigned 64 bits")
    buf = bytearray(size)
    _HEADER.pack_into(
        buf, 0, MAGIC, VERSION, flags, size, session, 0, seq, tx_ns, refl_rx_ns, refl_tx_ns
    )
    if key is not None:
        buf[size - HMAC_SIZE :] = _mac(key, memoryview(buf)[: size - HMAC_SIZE])
    return bytes(buf)


def _parse(data: bytes | bytearray | memoryview, key: bytes | None) -> Probe:
    n = len(data)
    if n < MIN_SIZE:
        raise PacketError(f"datagram of {n} bytes is shorter than the {MIN_SIZE}-byte header")
    if n > MAX_SIZE:
        raise PacketError(f"datagram of {n} bytes is longer than the maximum {MAX_SIZE}")
    magic, version, flags, length, session, reserved, seq, tx, rrx, rtx = _HEADER.unpack_from(
        data, 0
    )
    if magic != MAGIC:
        raise PacketError(f"bad magic {magic:#010x} (expected {MAGIC:#010x})")
    if version != VERSION:
        raise PacketError(f"unsupported version {version} (expected {VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise PacketError(f"unknown flag bits {flags & ~_KNOWN_FLAGS:#04x}")
    if length != n:
        raise PacketError(f"length field {length} does not match the datagram's {n} bytes")
    if reserved != 0:
        raise PacketError("reserved field is not zero")
    if flags & FLAG_HMAC:
        if n < MIN_SIZE + HMAC_SIZE:
            raise PacketError(f"HMAC packet of {n} bytes is shorter than {MIN_SIZE + HMAC_SIZE}")
        if key is None:
            raise HmacError("packet carries an HMAC but no key is configured")
        view = memoryview(data)
        if not hmac.compare_digest(_mac(key, view[: n - HMAC_SIZE]), view[n - HMAC_SIZE :]):
            raise HmacError("HMAC does not match (wrong key or altered packet)")
    elif key is not None:
        raise HmacError("packet has no HMAC but a key is configured")
    return Probe(
        flags=flags, size=n, session=session, seq=seq, tx_ns=tx, refl_rx_ns=rrx, refl_tx_ns=rtx
    )


def decode_probe(data: bytes | bytearray | memoryview, *, key: bytes | None = None) -> Probe:
    """Decode and strictly validate a probe; raise PacketError with the reason."""
    return _parse(data, key)


def make_reply(
    data: bytes | bytearray | memoryview, *, rx_ns: int, tx_ns: int, key: bytes | None = None
) -> bytes:
    """Validate a request and return its reply: same size, REPLY flag, reflector stamps.

    The reply is built afresh (zero fill), never an echo of the request's payload.
    """
    req = _parse(data, key)
    if req.flags & FLAG_REPLY:
        raise PacketError("packet is a reply, not a request (reflection loop refused)")
    if req.refl_rx_ns or req.refl_tx_ns:
        raise PacketError("request carries reflector timestamps")
    return encode_probe(
        session=req.session,
        seq=req.seq,
        tx_ns=req.tx_ns,
        size=req.size,
        key=key,
        flags=FLAG_REPLY,
        refl_rx_ns=rx_ns,
        refl_tx_ns=tx_ns,
    )


def realtime_ns() -> int:
    """clock_gettime(CLOCK_REALTIME) in ns (the kernel timestamps' clock)."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def monotonic_ns() -> int:
    """clock_gettime(CLOCK_MONOTONIC) in ns (for scheduling)."""
    return time.monotonic_ns()


def clock_read_cost_ns(n: int = 10000) -> float:
    """Mean cost of one clock_gettime(CLOCK_REALTIME) in ns, over ``n`` reads."""
    if n <= 0:
        raise ValueError("n must be positive")
    read = time.clock_gettime_ns
    clock = time.CLOCK_REALTIME
    start = time.perf_counter_ns()
    for _ in range(n):
        read(clock)
    return (time.perf_counter_ns() - start) / n


def _cmsg_rx_ns(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Kernel RX software timestamp from recvmsg ancillary data, 0 when absent."""
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == _SCM_TIMESTAMPING and len(data) >= _TIMESPEC3.size:
            sec, nsec = _TIMESPEC3.unpack_from(data)[:2]
            return sec * 1_000_000_000 + nsec
        if kind == _SCM_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("=qq", data)
            return sec * 1_000_000_000 + nsec
    return 0


def _enable_timestamps(sock: socket.socket, *, tx: bool) -> tuple[bool, bool]:
    """Turn on kernel RX (and TX when asked) software timestamps; return (rx, tx)."""
    flags = _SOF_RX_SOFTWARE | _SOF_SOFTWARE
    if tx:
        flags |= _SOF_TX_SOFTWARE | _SOF_OPT_ID | _SOF_OPT_TSONLY
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPING, flags)
        return True, tx
    except OSError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        return True, False
    except OSError:
        return False, False


class ProbeSocket:
    """A connected non-blocking UDP socket that sends probes and drains their replies."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        session: int,
        size: int = 64,
        key: bytes | None = None,
        bind: tuple[str, int] | None = None,
        kernel_timestamps: bool = True,
    ) -> None:
        # Validates size/session/key once, and gives the template every probe starts from.
        self._template = bytearray(
            encode_probe(session=session, seq=0, tx_ns=0, size=size, key=key)
        )
        self.session = session
        self.size = size
        self._key = key
        self.invalid = 0
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            # A batch of replies can outgrow the default buffer (~200 KiB of skbs) before
            # the loop drains it: losses that would be ours, not the network's.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            if bind is not None:
                self._sock.bind(bind)
            self._sock.connect(addr)
            if kernel_timestamps:
                self.kernel_rx, self.kernel_tx = _enable_timestamps(self._sock, tx=True)
            else:
                self.kernel_rx = self.kernel_tx = False
        except BaseException:
            self._sock.close()
            raise
        self._tskey = 0  # OPT_ID of the next datagram (the kernel counts from 0)

    def fileno(self) -> int:
        """The socket's file descriptor (for loop.add_reader)."""
        return self._sock.fileno()

    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int:
        """Send ``count`` probes numbered from ``first_seq``; fill ``out[:n]`` (SENT_DTYPE)."""
        if out.dtype != SENT_DTYPE or count > len(out) or count < 0:
            raise ValueError("out must be a SENT_DTYPE array with at least `count` records")
        buf = self._template
        size = self.size
        key = self._key
        tx_ns = realtime_ns()
        sent = 0
        for i in range(count):
            seq = (first_seq + i) & _U64
            struct.pack_into("!QQ", buf, 16, seq, tx_ns)
            if key is not None:
                buf[size - HMAC_SIZE :] = _mac(key, memoryview(buf)[: size - HMAC_SIZE])
            try:
                self._sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                try:  # the error was a stale ICMP report for an earlier probe: retry once
                    self._sock.send(buf)
                except OSError:
                    break
            out[i] = (seq, tx_ns, 0)
            sent += 1
        if self.kernel_tx:
            self._drain_errqueue(out, sent)
        self._tskey += sent
        return sent

    def _drain_errqueue(self, out: npt.NDArray[np.void] | None, sent: int) -> None:
        """Read every pending TX timestamp; map OPT_ID counters onto ``out[:sent]``."""
        while True:
            try:
                _, ancdata, _, _ = self._sock.recvmsg(0, _ANC_SIZE, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            stamp = 0
            tskey = -1
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == _SCM_TIMESTAMPING:
                    sec, nsec = _TIMESPEC3.unpack_from(data)[:2]
                    stamp = sec * 1_000_000_000 + nsec
                elif (level, kind) in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ):
                    _, origin, _, _, _, info, ee_data = _EXT_ERR.unpack_from(data)
                    if origin == _SO_EE_ORIGIN_TIMESTAMPING and info == _SCM_TSTAMP_SND:
                        tskey = ee_data
            index = (tskey - self._tskey) & 0xFFFFFFFF
            if out is not None and tskey >= 0 and stamp and index < sent:
                out[index]["kernel_tx_ns"] = stamp

    def recv(self, out: npt.NDArray[np.void]) -> int:
        """Drain up to len(out) replies into ``out`` (REPLY_DTYPE); return how many."""
        if out.dtype != REPLY_DTYPE:
            raise ValueError("out must be a REPLY_DTYPE array")
        if self.kernel_tx:
            self._drain_errqueue(None, 0)  # late stamps: keep the socket out of POLLERR
        n = 0
        size = self.size
        while n < len(out):
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(size, _ANC_SIZE)
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                break
            user_rx = realtime_ns()
            if msg_flags & socket.MSG_TRUNC:
                self.invalid += 1
                continue
            try:
                probe = _parse(data, self._key)
            except PacketError:
                self.invalid += 1
                continue
            if not probe.flags & FLAG_REPLY or probe.session != self.session:
                self.invalid += 1
                continue
            kernel_rx = _cmsg_rx_ns(ancdata)
            out[n] = (
                probe.seq,
                probe.session,
                probe.size,
                probe.tx_ns,
                probe.refl_rx_ns,
                probe.refl_tx_ns,
                kernel_rx,
                user_rx,
                TS_KERNEL if kernel_rx else TS_USER,
            )
            n += 1
        return n

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()


class Reflector:
    """The reflector on a bound non-blocking UDP socket (recvmsg/sendto loop)."""

    TABLE_SIZE = 4096  # source addresses with a token bucket; the stalest is evicted

    def __init__(
        self,
        sock: socket.socket,
        *,
        key: bytes | None = None,
        rate_pps: float = 0.0,
        burst: int = 32,
        batch: int = 64,
    ) -> None:
        _check_reflector_args(key=key, rate_pps=rate_pps, burst=burst, batch=batch)
        self._sock = sock
        self._key = key
        self._rate = float(rate_pps)
        self._burst = float(burst)
        self._batch = batch
        self._buckets: OrderedDict[bytes | str, tuple[float, int]] = OrderedDict()
        self.received = self.replied = self.invalid = self.bad_hmac = self.rate_limited = 0
        sock.setblocking(False)
        self.kernel_rx = _enable_timestamps(sock, tx=False)[0]

    def _allow(self, source: bytes | str, now: int) -> bool:
        tokens, last = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate / 1e9)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self.TABLE_SIZE:
            self._buckets.popitem(last=False)
        return allowed

    def serve(self) -> int:
        """Handle every datagram pending now (up to 64 batches); return how many were read."""
        read = 0
        sock = self._sock
        for _ in range(64 * self._batch):  # bounded: a flood must not starve the event loop
            try:
                data, ancdata, msg_flags, addr = sock.recvmsg(MAX_SIZE, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # stale ICMP error of an earlier reply: not our input
                raise
            read += 1
            self.received += 1
            if msg_flags & socket.MSG_TRUNC:
                self.invalid += 1
                continue
            rx_ns = _cmsg_rx_ns(ancdata) or realtime_ns()
            try:
                req = _parse(data, self._key)
                if req.flags & FLAG_REPLY or req.refl_rx_ns or req.refl_tx_ns:
                    raise PacketError("not a request")
            except HmacError:
                self.bad_hmac += 1
                continue
            except PacketError:
                self.invalid += 1
                continue
            if self._rate > 0 and not self._allow(addr[0], monotonic_ns()):
                self.rate_limited += 1
                continue
            tx_ns = realtime_ns()
            reply = encode_probe(
                session=req.session,
                seq=req.seq,
                tx_ns=req.tx_ns,
                size=req.size,
                key=self._key,
                flags=FLAG_REPLY,
                refl_rx_ns=rx_ns,
                refl_tx_ns=tx_ns,
            )
            try:
                sock.sendto(reply, addr)
            except OSError:
                continue  # full buffer or unreachable source: a dropped reply, not a crash
            self.replied += 1
        return read

    def stats(self) -> dict[str, int]:
        """Counters since start: received, replied, invalid, bad_hmac, rate_limited."""
        return {
            "received": self.received,
            "replied": self.replied,
            "invalid": self.invalid,
            "bad_hmac": self.bad_hmac,
            "rate_limited": self.rate_limited,
        }


def _check_reflector_args(*, key: bytes | None, rate_pps: float, burst: int, batch: int) -> None:
    if key is not None and not key:
        raise ValueError("HMAC key must not be empty")
    if rate_pps < 0:
        raise ValueError(f"rate_pps {rate_pps} must be >= 0 (0 = unlimited)")
    if rate_pps > 0 and burst < 1:
        raise ValueError(f"burst {burst} must be >= 1 when rate limiting")
    if not 1 <= batch <= 1024:
        raise ValueError(f"batch {batch} is not in 1..1024")


def tcp_info_rtt(fd: int) -> tuple[int, int]:
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
    with socket.socket(fileno=socket.dup(fd)) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    if len(info) < 76:
        raise OSError(f"TCP_INFO returned only {len(info)} bytes")
    rtt, rttvar = struct.unpack_from("=II", info, 68)
    return rtt, rttvar
