"""Probers: the thin I/O adapters that send probes of one target and read its replies.

Each prober owns its target's ``SequenceTracker`` (probes in flight), ``RttRing`` (finished
probes), RTT histogram and base-RTT tracker, and turns replies into records with numpy,
a whole batch at a time. ``send(now, count)`` is called by the engine's scheduler;
``sweep(now)`` turns overdue probes into losses.

- ``UdpProber``: the native ``ProbeSocket`` registered with ``loop.add_reader``; network
  RTT from kernel stamps (kernel RX - kernel TX - reflector turnaround), user-space stamps
  where the kernel gave none.
- ``TcpConnectProber``: one non-blocking connect per probe; RTT from the kernel's
  ``TCP_INFO`` (SYN -> SYN-ACK), the user-space connect time beside it.
- ``TcpEchoProber``: framed probe packets over one kept-open connection, reconnecting
  after a failure (probes sent meanwhile are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from detnet import native
from detnet.engine.ring import (
    FLAG_DUP,
    FLAG_KERNEL,
    FLAG_LATE,
    FLAG_LOST,
    FLAG_RECEIVED,
    FLAG_REORDERED,
    RTT_EDGES_S,
    CumulativeHistogram,
    RttRing,
)
from detnet.engine.sequence import DUPLICATE, LATE, REORDERED, Expired, SequenceTracker
from detnet.engine.stats import BaseRttTracker
from detnet.engine.targets import Target

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

# A sample whose realtime-monotonic offset moved more than this between send and receive
# spans a clock step (NTP slews at most 0.5 ms/s, far below): it is dropped, not used.
CLOCK_STEP_NS = 5_000_000
RECV_BATCH = 1024


@dataclass(frozen=True)
class Sample:
    """One finished probe, for streaming (``--stream``). Times in ns; None when absent."""

    target: str
    seq: int
    sent_ns: int  # CLOCK_REALTIME send stamp
    rtt_ns: int | None  # network RTT the statistics use; None when lost
    user_rtt_ns: int | None  # the same probe's RTT from user-space stamps
    fwd_ns: int | None  # reflector RX - sender TX (carries the hosts' clock offset)
    back_ns: int | None  # sender RX - reflector TX
    lost: bool
    timestamp_source: str  # "kernel" or "user"


@dataclass(frozen=True)
class ProbeTotals:
    """Counters of one target since the engine started."""

    sent: int
    received: int
    lost: int
    late: int
    duplicates: int
    reordered: int
    dropped: int  # replies dropped because the clock stepped during the probe
    skipped: int  # send slots skipped because the loop woke up too late
    send_errors: int


SampleCallback = Callable[[Sample], None]


def _opt_int(x: float) -> int | None:
    return None if math.isnan(x) else int(x)


class Prober:
    """What every prober shares: bookkeeping from replies and losses to records."""

    def __init__(
        self,
        target: Target,
        *,
        address: str,
        capacity: int,
        tracker_capacity: int,
        on_sample: SampleCallback | None = None,
    ) -> None:
        self.target = target
        self.address = address
        self.ring = RttRing(capacity)
        self.tracker = SequenceTracker(tracker_capacity)
        self.histogram = CumulativeHistogram(RTT_EDGES_S)
        self.on_sample = on_sample
        self.timestamp_source = "user"
        self.skipped = 0
        self.send_errors = 0
        self.session = random.getrandbits(32)
        self._base = BaseRttTracker()
        self._base_lock = threading.Lock()
        self._setup()

    def _setup(self) -> None:
        """What a kind of prober adds to the common state (sockets, buffers)."""

    # --- what the engine calls ----------------------------------------------------------
    async def open(self) -> None:
        """Open sockets / connections. Raises OSError when that is impossible."""

    def send(self, now_ns: int, count: int) -> None:
        """Send ``count`` probes now (``now_ns``: CLOCK_MONOTONIC just read)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close sockets and cancel this prober's tasks."""

    def base_rtt(self, now_ns: int | None = None) -> float | None:
        """The base RTT (LEDBAT-style minimum of per-minute minima)."""
        with self._base_lock:
            return self._base.base(now_ns)

    def totals(self) -> ProbeTotals:
        """Counters since start."""
        t = self.tracker
        return ProbeTotals(
            sent=t.sent,
            received=t.received,
            lost=t.lost,
            late=t.late,
            duplicates=t.duplicates,
            reordered=t.reordered,
            dropped=t.dropped,
            skipped=self.skipped,
            send_errors=self.send_errors,
        )

    def sweep(self, now_ns: int, *, reserve: int = 0) -> None:
        """Record every probe past its deadline as lost."""
        self._record_lost(now_ns, self.tracker.expire(now_ns, reserve=reserve))

    # --- bookkeeping ----------------------------------------------------------------------
    def _register_sent(self, now_ns: int, offset_ns: int, user_tx: I64, kernel_tx: I64) -> None:
        self.tracker.on_sent(
            first_seq=self.tracker.next_seq,
            user_tx_ns=user_tx,
            kernel_tx_ns=kernel_tx,
            deadline_ns=now_ns + self.target.timeout_ns,
            offset_ns=offset_ns,
        )

    def _record_lost(self, now_ns: int, expired: Expired) -> None:
        n = int(expired.seq.shape[0])
        if n == 0:
            return
        nan = np.full(n, np.nan)
        sent = self.tracker.user_tx_ns[expired.slots]
        pos = self.ring.append(
            t_ns=now_ns,
            sent_ns=sent,
            seq=expired.seq,
            rtt_ns=nan,
            user_rtt_ns=nan,
            fwd_ns=nan,
            back_ns=nan,
            flags=FLAG_LOST,
        )
        self.tracker.ring_pos[expired.slots] = np.arange(pos, pos + n, dtype=np.int64)
        if self.on_sample is not None:
            for seq, s in zip(expired.seq.tolist(), sent.tolist(), strict=True):
                self.on_sample(
                    Sample(self.target.name, seq, s, None, None, None, None, True, "user")
                )

    def _record_replies(
        self,
        now_ns: int,
        offset_now_ns: int,
        *,
        seq: npt.NDArray[np.integer],
        rx_kernel: I64,
        rx_user: I64,
        refl_rx: I64,
        refl_tx: I64,
        rtt_override: I64 | None = None,
    ) -> None:
        """Join a batch of replies (arrival order) and record the received ones.

        ``refl_rx``/``refl_tx`` are the reflector's stamps (0 when there are none, as for
        TCP connect). ``rtt_override`` gives the network RTT directly (TCP_INFO), 0 = none.
        """
        tr = self.tracker
        cls = tr.on_replies(seq)
        if np.any(cls.duplicate | cls.late):
            self._flag(cls.slots[cls.duplicate], FLAG_DUP)
            known = cls.late & (tr.seq[cls.slots] == seq.astype(np.int64))
            self._flag(cls.slots[known], FLAG_LATE)
        got = cls.received
        if not np.any(got):
            return
        slots = cls.slots[got]
        step = np.abs(tr.offset_ns[slots] - offset_now_ns) > CLOCK_STEP_NS
        if np.any(step):
            tr.drop(slots[step])
            keep = ~step
            got = got.copy()
            got[got] = keep
            slots = slots[keep]
            if slots.shape[0] == 0:
                return
        user_tx = tr.user_tx_ns[slots]
        kernel_tx = tr.kernel_tx_ns[slots]
        krx = rx_kernel[got]
        urx = rx_user[got]
        rrx = refl_rx[got]
        rtx = refl_tx[got]
        has_refl = (rrx != 0) & (rtx != 0)
        turn = np.where(has_refl, rtx - rrx, 0)
        kernel = (kernel_tx != 0) & (krx != 0)
        tx = np.where(kernel, kernel_tx, user_tx)
        rx = np.where(kernel, krx, urx)
        rtt = (rx - tx - turn).astype(np.float64)
        user_rtt = (urx - user_tx - turn).astype(np.float64)
        if rtt_override is not None:
            ov = rtt_override[got]
            kernel = ov > 0
            rtt = np.where(kernel, ov, user_rtt).astype(np.float64)
        fwd = np.where(has_refl, (rrx - tx).astype(np.float64), np.nan)
        back = np.where(has_refl, (rx - rtx).astype(np.float64), np.nan)
        flags = (
            FLAG_RECEIVED
            | np.where(kernel, FLAG_KERNEL, 0)
            | np.where(cls.reordered[got], FLAG_REORDERED, 0)
        ).astype(np.uint8)
        seqs = seq[got].astype(np.int64)
        pos = self.ring.append(
            t_ns=now_ns,
            sent_ns=user_tx,
            seq=seqs,
            rtt_ns=rtt,
            user_rtt_ns=user_rtt,
            fwd_ns=fwd,
            back_ns=back,
            flags=flags,
        )
        tr.ring_pos[slots] = np.arange(pos, pos + slots.shape[0], dtype=np.int64)
        self.histogram.add(rtt)
        self.timestamp_source = "kernel" if kernel[-1] else "user"
        with self._base_lock:
            self._base.update(now_ns, float(rtt.min()))
        if self.on_sample is not None:
            name = self.target.name
            for i in range(seqs.shape[0]):
                self.on_sample(
                    Sample(
                        name,
                        int(seqs[i]),
                        int(user_tx[i]),
                        int(rtt[i]),
                        int(user_rtt[i]),
                        _opt_int(fwd[i]),
                        _opt_int(back[i]),
                        False,
                        "kernel" if kernel[i] else "user",
                    )
                )

    def _record_reply(
        self,
        now_ns: int,
        offset_now_ns: int,
        *,
        seq: int,
        rx_kernel: int,
        rx_user: int,
        refl_rx: int,
        refl_tx: int,
        rtt_override: int | None = None,
    ) -> None:
        """Scalar twin of ``_record_replies`` for one reply: the same arithmetic on Python
        ints, because numpy's per-call overhead dominates for a single element."""
        tr = self.tracker
        outcome = tr.on_reply(seq)
        slot = seq & (tr.capacity - 1)
        if outcome in (DUPLICATE, LATE):
            pos = int(tr.ring_pos[slot]) if int(tr.seq[slot]) == seq else -1
            if pos >= 0:
                self.ring.set_flags(
                    np.array([pos]), FLAG_DUP if outcome == DUPLICATE else FLAG_LATE
                )
            return
        if abs(int(tr.offset_ns[slot]) - offset_now_ns) > CLOCK_STEP_NS:
            tr.drop(slot)
            return
        user_tx = int(tr.user_tx_ns[slot])
        kernel_tx = int(tr.kernel_tx_ns[slot])
        has_refl = refl_rx != 0 and refl_tx != 0
        turn = refl_tx - refl_rx if has_refl else 0
        kernel = kernel_tx != 0 and rx_kernel != 0
        tx = kernel_tx if kernel else user_tx
        rx = rx_kernel if kernel else rx_user
        rtt = rx - tx - turn
        user_rtt = rx_user - user_tx - turn
        if rtt_override is not None:
            kernel = rtt_override > 0
            rtt = rtt_override if kernel else user_rtt
        fwd = float(refl_rx - tx) if has_refl else math.nan
        back = float(rx - refl_tx) if has_refl else math.nan
        flags = FLAG_RECEIVED | (FLAG_KERNEL if kernel else 0)
        if outcome == REORDERED:
            flags |= FLAG_REORDERED
        pos = self.ring.append_one(
            t_ns=now_ns,
            sent_ns=user_tx,
            seq=seq,
            rtt_ns=float(rtt),
            user_rtt_ns=float(user_rtt),
            fwd_ns=fwd,
            back_ns=back,
            flags=flags,
        )
        tr.ring_pos[slot] = pos
        self.histogram.add_one(rtt)
        source = "kernel" if kernel else "user"
        self.timestamp_source = source
        with self._base_lock:
            self._base.update(now_ns, float(rtt))
        if self.on_sample is not None:
            self.on_sample(
                Sample(
                    self.target.name,
                    seq,
                    user_tx,
                    rtt,
                    user_rtt,
                    _opt_int(fwd),
                    _opt_int(back),
                    False,
                    source,
                )
            )

    def _flag(self, slots: I64, flag: int) -> None:
        pos = self.tracker.ring_pos[slots]
        self.ring.set_flags(pos[pos >= 0], flag)


class UdpProber(Prober):
    """UDP probes against a ``detnet reflect --udp`` reflector, via the native core."""

    def _setup(self) -> None:
        self._sock: native.ProbeSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent = np.zeros(max(self.target.batch, 1), native.SENT_DTYPE)
        self._replies = np.zeros(RECV_BATCH, native.REPLY_DTYPE)
        self.recv_errors = 0

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = native.ProbeSocket(
            self.address,
            self.target.port,
            session=self.session,
            size=self.target.size,
            key=self.target.key,
        )
        self.timestamp_source = "kernel" if self._sock.kernel_rx else "user"
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def send(self, now_ns: int, count: int) -> None:
        sock = self._sock
        if sock is None:
            return
        self.sweep(now_ns, reserve=count)
        offset = native.realtime_ns() - now_ns
        if count > self._sent.shape[0]:
            self._sent = np.zeros(count, native.SENT_DTYPE)
        first = self.tracker.next_seq
        try:
            n = sock.send(first, count, self._sent)
        except OSError:
            # e.g. ECONNREFUSED after an ICMP port unreachable: the probes count as lost.
            n = 0
            self.send_errors += 1
        out = self._sent[:n]
        user_tx = out["user_tx_ns"]
        kernel_tx = out["kernel_tx_ns"]
        if n < count:
            # Probes the kernel did not take still count as sent, and will time out lost.
            now_rt = native.realtime_ns()
            user_tx = np.concatenate((user_tx, np.full(count - n, now_rt, np.int64)))
            kernel_tx = np.concatenate((kernel_tx, np.zeros(count - n, np.int64)))
        self._register_sent(now_ns, offset, user_tx, kernel_tx)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buf = self._replies
        while True:
            try:
                n = sock.recv(buf)
            except OSError:
                # ICMP errors (port unreachable) surface here once; the reader is level
                # triggered, so datagrams still queued come with the next callback.
                self.recv_errors += 1
                return
            if n:
                self._process(buf[:n])
            if n < buf.shape[0]:
                return

    def _process(self, r: npt.NDArray[np.void]) -> None:
        now = native.monotonic_ns()
        offset_now = native.realtime_ns() - now
        self.sweep(now)
        if r.shape[0] == 1:
            one = r[0]
            self._record_reply(
                now,
                offset_now,
                seq=int(one["seq"]),
                rx_kernel=int(one["kernel_rx_ns"]),
                rx_user=int(one["user_rx_ns"]),
                refl_rx=int(one["refl_rx_ns"]),
                refl_tx=int(one["refl_tx_ns"]),
            )
            return
        self._record_replies(
            now,
            offset_now,
            seq=r["seq"],
            rx_kernel=r["kernel_rx_ns"],
            rx_user=r["user_rx_ns"],
            refl_rx=r["refl_rx_ns"],
            refl_tx=r["refl_tx_ns"],
        )

    async def aclose(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class TcpConnectProber(Prober):
    """Handshake latency: one non-blocking connect per probe, kernel TCP_INFO RTT."""

    def _setup(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self.timestamp_source = "kernel"

    def send(self, now_ns: int, count: int) -> None:
        self.sweep(now_ns, reserve=count)
        offset = native.realtime_ns() - now_ns
        for _ in range(count):
            seq = self.tracker.next_seq
            tx = native.realtime_ns()
            self._register_sent(now_ns, offset, np.array([tx], np.int64), np.zeros(1, np.int64))
            task = asyncio.get_running_loop().create_task(self._connect(seq, tx))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, seq: int, tx_ns: int) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # No lingering FIN/TIME_WAIT churn: close with RST once the handshake is timed.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            try:
                async with asyncio.timeout(self.target.timeout_ns / 1e9):
                    await loop.sock_connect(sock, (self.address, self.target.port))
            except (OSError, TimeoutError):
                # Refused, unreachable or timed out: the probe is lost at its deadline.
                return
            rx = native.realtime_ns()
            rtt_us, _ = native.tcp_info_rtt(sock.fileno())
            now = native.monotonic_ns()
            self.sweep(now)
            self._record_reply(
                now,
                native.realtime_ns() - now,
                seq=seq,
                rx_kernel=0,
                rx_user=rx,
                refl_rx=0,
                refl_tx=0,
                rtt_override=rtt_us * 1000,
            )
        finally:
            sock.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class TcpEchoProber(Prober):
    """In-connection RTT: framed probe packets over one kept-open TCP connection.

    A frame is one probe packet of ``target.size`` bytes; the server answers each with
    the reply packet of the same size. Timestamps are user space (TCP gives no per-segment
    kernel RX stamp to a stream reader), the reflector's stamps split the directions.
    """

    def _setup(self) -> None:
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False
        self.reconnects = 0

    async def open(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.address, self.target.port),
            self.target.timeout_ns / 1e9,
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer))

    def send(self, now_ns: int, count: int) -> None:
        self.sweep(now_ns, reserve=count)
        offset = native.realtime_ns() - now_ns
        tx = np.zeros(count, np.int64)
        writer = self._writer
        for i in range(count):
            seq = self.tracker.next_seq + i
            tx[i] = native.realtime_ns()
            if writer is not None:
                frame = native.encode_probe(
                    session=self.session,
                    seq=seq,
                    tx_ns=int(tx[i]),
                    size=self.target.size,
                    key=self.target.key,
                )
                writer.write(frame)
        self._register_sent(now_ns, offset, tx, np.zeros(count, np.int64))
        if writer is None:
            self._start_reconnect()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = self.target.size
        try:
            while True:
                data = await reader.readexactly(size)
                rx = native.realtime_ns()
                now = native.monotonic_ns()
                try:
                    p = native.decode_probe(data, key=self.target.key)
                except native.PacketError:
                    continue  # a frame that is not our reply: ignore, like the UDP path
                if not p.is_reply or p.session != self.session:
                    continue
                self.sweep(now)
                self._record_reply(
                    now,
                    rx - now,
                    seq=p.seq,
                    rx_kernel=0,
                    rx_user=rx,
                    refl_rx=p.refl_rx_ns,
                    refl_tx=p.refl_tx_ns,
                )
        except (OSError, asyncio.IncompleteReadError):
            pass  # connection lost: reconnect below; probes in flight time out as lost
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
        if not self._closing:
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._closing or (self._reconnect is not None and not self._reconnect.done()):
            return
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = min(self.target.interval_ns / 1e9, 0.1)
        while not self._closing and self._writer is None:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                self.reconnects += 1
            except (OSError, TimeoutError):
                delay = min(delay * 2, 1.0)

    async def aclose(self) -> None:
        self._closing = True
        tasks = [t for t in (self._reconnect, self._reader_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None


def make_prober(
    target: Target,
    *,
    address: str,
    capacity: int,
    on_sample: SampleCallback | None = None,
) -> Prober:
    """The prober for ``target`` (already resolved to ``address``)."""
    # Room for every probe that can be in flight (timeout / interval deadlines of
    # ``batch`` probes), with a margin for Poisson bursts.
    inflight = (target.timeout_ns // target.interval_ns + 2) * target.batch
    tracker_capacity = min(max(4 * inflight, 1024), 1 << 22)
    cls: type[Prober]
    if target.protocol == "udp":
        cls = UdpProber
    elif target.mode == "connect":
        cls = TcpConnectProber
    else:
        cls = TcpEchoProber
    return cls(
        target,
        address=address,
        capacity=capacity,
        tracker_capacity=tracker_capacity,
        on_sample=on_sample,
    )
