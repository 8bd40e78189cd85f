"""The probe socket in pure Python (fallback of ``_sockets.pxi``): timestamped send/receive.

Kernel timestamps come from ``socket.recvmsg`` ancillary data (RX) and the error queue
(TX, mapped to our seqs through the kernel's OPT_ID counter); where the Cython build
batches with ``sendmmsg``/``recvmmsg`` this loops over ``send``/``recvmsg_into``. The
socket is watched through an epoll "wake" descriptor (``fileno()``), so that a TX stamp
arriving late in the error queue makes it readable instead of raising POLLERR (which
stops uvloop's ``add_reader`` watcher for good).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import deque

import numpy as np
import numpy.typing as npt

from detnet.native import _py_codec as c
from detnet.native._common import (
    REPLY_DTYPE,
    SENT_DTYPE,
    SOF_TX_HARDWARE,
    SOF_TX_SOFTWARE,
    ForeignDatagram,
    TimestampPlan,
    foreign_datagram,
    timestamp_plan,
)

SO_TIMESTAMPNS = 35
SO_TIMESTAMPING = 37
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_TIMESTAMPING = 4
SCM_TSTAMP_SND = 0
ANC_SIZE = 512
RCVBUF_BYTES = 4 << 20  # a probe socket's receive buffer (capped by net.core.rmem_max)
MAX_BATCH = 1024
KEY_RING = 4096  # OPT_ID key -> seq, for TX stamps that arrive after send() returned
LATE_MAX = 1024  # late TX stamps kept for take_tx_stamps(); older ones are dropped
EXT_ERR = struct.Struct("=IBBBBII")
TIMESPEC3 = struct.Struct("=qqqqqq")
TIMESPEC = struct.Struct("=qq")
U64 = (1 << 64) - 1

# recv() counters, in the order stats() lists them.
PROBE_COUNTERS = ("received", "replies", "followups", "echoes", "foreign", "bad_hmac", "invalid")


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


def rx_stamps(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int]:
    """(software, hardware) kernel RX timestamps from recvmsg ancillary data, 0 if absent."""
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == SO_TIMESTAMPING and len(data) >= TIMESPEC3.size:
            s0, n0, _, _, s2, n2 = TIMESPEC3.unpack_from(data)
            return s0 * 1_000_000_000 + n0, s2 * 1_000_000_000 + n2
        if kind == SO_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            sec, nsec = TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec, 0
    return 0, 0


def read_errqueue(sock: socket.socket) -> list[tuple[int, int, int]]:
    """Drain the error queue: (OPT_ID key, software stamp, hardware stamp) per TX stamp."""
    out: list[tuple[int, int, int]] = []
    while True:
        try:
            _, ancdata, _, _ = sock.recvmsg(0, ANC_SIZE, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            return out  # EAGAIN: empty (any other error: nothing more to read either)
        sw = hw = 0
        key = -1
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING:
                s0, n0, _, _, s2, n2 = TIMESPEC3.unpack_from(data)
                sw, hw = s0 * 1_000_000_000 + n0, s2 * 1_000_000_000 + n2
            elif (level, kind) in (
                (socket.IPPROTO_IP, IP_RECVERR),
                (socket.IPPROTO_IPV6, IPV6_RECVERR),
            ):
                _, origin, _, _, _, info, ee_data = EXT_ERR.unpack_from(data)
                if origin == SO_EE_ORIGIN_TIMESTAMPING and info == SCM_TSTAMP_SND:
                    key = ee_data
        if key >= 0 and (sw or hw):
            out.append((key, sw, hw))


def enable_timestamps(sock: socket.socket, flags: int) -> tuple[bool, bool]:
    """Set SO_TIMESTAMPING (or SO_TIMESTAMPNS for RX only); return (kernel RX, kernel TX)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, flags)
        return True, bool(flags & (SOF_TX_SOFTWARE | SOF_TX_HARDWARE))
    except OSError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True, False
    except OSError:
        return False, False


class TxStamps:
    """Maps the kernel's OPT_ID counter (one per stamped datagram, from 0) to our seqs."""

    def __init__(self) -> None:
        self.next_key = 0
        self._keys = [-1] * KEY_RING
        self._seqs = [0] * KEY_RING
        self.late: deque[tuple[int, int, int]] = deque()
        self.late_dropped = 0

    def drain(self, sock: socket.socket, out: npt.NDArray[np.void] | None, sent: int) -> None:
        """Put stamps of the ``sent`` datagrams just sent into ``out``; keep others as late."""
        first = self.next_key
        for key, sw, hw in read_errqueue(sock):
            index = (key - first) & 0xFFFFFFFF
            if out is not None and index < sent:
                if sw:
                    out[index]["kernel_tx_ns"] = sw
                if hw:
                    out[index]["hw_tx_ns"] = hw
                continue
            slot = key % KEY_RING
            if self._keys[slot] != key:
                continue  # older than the ring: nothing to attribute it to
            if len(self.late) == LATE_MAX:
                self.late.popleft()
                self.late_dropped += 1
            self.late.append((self._seqs[slot], sw, hw))

    def sent(self, first_seq: int, n: int) -> None:
        """Record the keys of ``n`` datagrams sent with seqs from ``first_seq``."""
        for i in range(n):
            key = (self.next_key + i) & 0xFFFFFFFF
            self._keys[key % KEY_RING] = key
            self._seqs[key % KEY_RING] = (first_seq + i) & U64
        self.next_key = (self.next_key + n) & 0xFFFFFFFF

    def take(self, out: npt.NDArray[np.void]) -> int:
        """Move late stamps into ``out`` (SENT_DTYPE); return how many."""
        if out.dtype != SENT_DTYPE:
            raise ValueError("out must be a SENT_DTYPE array")
        n = 0
        while self.late and n < len(out):
            seq, sw, hw = self.late.popleft()
            out[n] = (seq, 0, sw, hw)
            n += 1
        return n


class Wake:
    """An epoll descriptor that is readable while the socket has data or error-queue entries."""

    def __init__(self, fd: int) -> None:
        self._ep = select.epoll()
        self._ep.register(fd, select.EPOLLIN)

    def fileno(self) -> int:
        return self._ep.fileno()

    def close(self) -> None:
        self._ep.close()


def i64(value: int) -> int:
    """A u64 wire field as the i8 record field holds it (two's complement, as in C)."""
    return value - (1 << 64) if value >> 63 else value


def source_of(rx_sw: int, rx_hw: int) -> int:
    """TS_HARDWARE, TS_KERNEL or TS_USER: the best RX stamp a datagram came with."""
    return c.TS_HARDWARE if rx_hw else c.TS_KERNEL if rx_sw else c.TS_USER


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
        two_step: bool = False,
        followup_wait_ns: int = 0,
        hardware: str = "off",
        device: str | None = None,
    ) -> None:
        key = c.checked_key(key)
        self.two_step = bool(two_step) and size >= c.two_step_min_size(key is not None)
        # Validates size/session/wait once, and gives the template every probe starts from.
        self._template = bytearray(
            c.encode_probe(
                session=session,
                seq=0,
                tx_ns=0,
                size=size,
                key=key,
                two_step=self.two_step,
                followup_wait_ns=followup_wait_ns if self.two_step else 0,
            )
        )
        self._fill_end = size - (c.HMAC_SIZE if key is not None else 0)
        self._request_flags = c.FLAG_HMAC if key is not None else 0
        self.session = session
        self.size = size
        self._key = key
        self.received = self.replies = self.followups = self.echoes = 0
        self.foreign = self.bad_hmac = self.invalid = 0
        self.first_foreign: ForeignDatagram | None = None
        self._tx = TxStamps()
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        self.timestamping: TimestampPlan | None = None
        if kernel_timestamps:
            self.timestamping = timestamp_plan(
                want=hardware, host=str(addr[0]), device=device, tx=True
            )
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            # A batch of replies can outgrow the default buffer (~200 KiB of skbs) before
            # the loop drains it: losses that would be ours, not the network's.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            if bind is not None:
                self._sock.bind(bind)
            self._sock.connect(addr)
            if self.timestamping is not None:
                self.kernel_rx, self.kernel_tx = enable_timestamps(
                    self._sock, self.timestamping.flags
                )
            else:
                self.kernel_rx = self.kernel_tx = False
            self.hardware = bool(
                self.timestamping and self.timestamping.hardware and self.kernel_rx
            )
            self._wake = Wake(self._sock.fileno())
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray(size)

    def fileno(self) -> int:
        """The descriptor to watch (loop.add_reader): readable on replies and late stamps."""
        return self._wake.fileno()

    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int:
        """Send ``count`` probes numbered from ``first_seq``; fill ``out[:n]`` (SENT_DTYPE)."""
        if out.dtype != SENT_DTYPE or count > len(out) or count < 0:
            raise ValueError("out must be a SENT_DTYPE array with at least `count` records")
        if count > MAX_BATCH:
            raise ValueError(f"count {count} is not in 0..{MAX_BATCH}")
        if self._sock.fileno() < 0:
            raise OSError("probe socket is closed")
        buf = self._template
        size = self.size
        key = self._key
        tx_ns = realtime_ns()
        sent = 0
        for i in range(count):
            seq = (first_seq + i) & U64
            struct.pack_into("!QQ", buf, 16, seq, tx_ns)
            if key is not None:
                buf[size - c.HMAC_SIZE :] = c.mac(key, memoryview(buf)[: size - c.HMAC_SIZE])
            try:
                self._sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                try:  # the error was a stale ICMP report for an earlier probe: retry once
                    self._sock.send(buf)
                except OSError:
                    break
            out[i] = (seq, tx_ns, 0, 0)
            sent += 1
        if self.kernel_tx:
            self._tx.drain(self._sock, out, sent)
            self._tx.sent(first_seq, sent)
        return sent

    def take_tx_stamps(self, out: npt.NDArray[np.void]) -> int:
        """Kernel TX stamps that arrived after send() returned (SENT_DTYPE rows, user_tx_ns
        0; a zero stamp field means "not in this row"); return how many were written."""
        return self._tx.take(out)

    def recv(self, out: npt.NDArray[np.void]) -> int:
        """Drain up to len(out) datagrams into ``out`` (REPLY_DTYPE); return the rows written.

        Rows are replies, two-step replies, follow-ups and verbatim echoes (``kind``);
        everything else only bumps a counter (foreign, bad_hmac, invalid).
        """
        if out.dtype != REPLY_DTYPE:
            raise ValueError("out must be a REPLY_DTYPE array")
        if self._sock.fileno() < 0:
            raise OSError("probe socket is closed")
        if self.kernel_tx:
            self._tx.drain(self._sock, None, 0)  # late stamps, and out of POLLERR
        n = 0
        buf = self._buf
        view = memoryview(buf)
        while n < len(out) and n < MAX_BATCH:
            try:
                length, ancdata, _, addr = self._sock.recvmsg_into(
                    [buf], ANC_SIZE, socket.MSG_TRUNC
                )
            except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                break
            user_rx = realtime_ns()
            self.received += 1
            kind, f = self._classify(view, length, addr)
            if kind < 0:
                continue
            rx_sw, rx_hw = rx_stamps(ancdata)
            if kind == c.KIND_FOLLOWUP:
                row = (f.seq, f.session, length, 0, 0, 0)
            else:
                row = (f.seq, f.session, length, i64(f.tx_ns), i64(f.refl_rx_ns), i64(f.refl_tx_ns))
            refl_source = (
                f.rx_source if kind != c.KIND_REPLY and kind != c.KIND_ECHO else c.TS_UNKNOWN
            )
            out[n] = (
                *row,
                rx_sw,
                user_rx,
                source_of(rx_sw, rx_hw),
                kind,
                refl_source,
                f.followup_source,
                f.followup_seq,
                i64(f.followup_tx_ns),
                rx_hw,
            )
            n += 1
        return n

    def _classify(self, view: memoryview, length: int, addr: object) -> tuple[int, c.Fields]:
        """The row kind of a datagram and its fields; kind -1 once counted as dropped."""
        f = c.Fields()
        if length > self.size or length < 4 or view[:4] != _MAGIC_BYTES:
            return self._foreign(view, length, addr), f
        code = c.check_header(view, length, f)
        if code != c.OK:
            self.invalid += 1
            return -1, f
        if f.session != self.session:
            return self._foreign(view, length, addr), f
        if f.version == c.VERSION_TWO_STEP and not self.two_step:
            self.invalid += 1
            return -1, f
        if f.flags & c.FLAG_REPLY:
            kind = c.KIND_REPLY
            if f.version == c.VERSION_TWO_STEP:
                kind = c.KIND_FOLLOWUP if f.flags & c.FLAG_FOLLOWUP else c.KIND_REPLY_2STEP
        elif (
            f.flags == self._request_flags
            and length == self.size
            and not f.refl_rx_ns
            and not f.refl_tx_ns
            and view[c.HEADER_SIZE : self._fill_end]
            == self._template[c.HEADER_SIZE : self._fill_end]
        ):
            kind = c.KIND_ECHO
        else:
            self.invalid += 1  # our session, but neither a reply nor a verbatim echo
            return -1, f
        if c.check_hmac(self._key, f.flags, view, length) != c.OK:
            self.bad_hmac += 1
            return -1, f
        if kind == c.KIND_ECHO:
            self.echoes += 1
        elif kind == c.KIND_FOLLOWUP:
            self.followups += 1
        else:
            self.replies += 1
        return kind, f

    def _foreign(self, view: memoryview, length: int, addr: object) -> int:
        self.foreign += 1
        if self.first_foreign is None:
            self.first_foreign = foreign_datagram(
                data=bytes(view[: min(length, 16)]), size=length, address=addr
            )
        return -1

    def stats(self) -> dict[str, int]:
        """Counters since start: received, replies, followups, echoes, foreign, bad_hmac,
        invalid, and late_tx_dropped (late TX stamps nobody took in time)."""
        out = {name: int(getattr(self, name)) for name in PROBE_COUNTERS}
        out["late_tx_dropped"] = self._tx.late_dropped
        return out

    def close(self) -> None:
        """Close the socket and its wake descriptor (idempotent)."""
        self._wake.close()
        self._sock.close()


_MAGIC_BYTES = struct.pack("!I", c.MAGIC)
