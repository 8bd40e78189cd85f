"""Probers: the thin I/O adapters that send probes of one target and read its replies.

Each prober owns a ``ProbeRecorder`` (``prober.recorder``, ``engine/recorder.py``): the
sans-I/O core that keeps the target's probes in flight, its records, RTT histogram and
base RTT, and does all of the RTT arithmetic. What is left here is I/O: sockets, tasks,
reconnects, clock reads, and handing what they return to the recorder. ``send(now,
count)`` is called by the engine's scheduler.

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
import random
import socket
import struct

import numpy as np

from detnet import native
from detnet.engine.recorder import (
    SOURCE_KERNEL,
    SOURCE_USER,
    ProbeRecorder,
    Reply,
    SampleCallback,
)
from detnet.engine.targets import Target

RECV_BATCH = 1024


class Prober:
    """What every prober shares: its target, address, session and recorder."""

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
        self.recorder = ProbeRecorder(
            name=target.name,
            timeout_ns=target.timeout_ns,
            capacity=capacity,
            tracker_capacity=tracker_capacity,
            on_sample=on_sample,
        )
        self.session = random.getrandbits(32)
        self._setup()

    def _setup(self) -> None:
        """What a kind of prober adds to the common state (sockets, buffers)."""

    async def open(self) -> None:
        """Open sockets / connections. Raises OSError when that is impossible."""

    def send(self, now_ns: int, count: int) -> None:
        """Send ``count`` probes now (``now_ns``: CLOCK_MONOTONIC just read)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close sockets and cancel this prober's tasks."""


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
        self.recorder.expect_source(SOURCE_KERNEL if self._sock.kernel_rx else SOURCE_USER)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def send(self, now_ns: int, count: int) -> None:
        sock = self._sock
        if sock is None:
            return
        rec = self.recorder
        offset = native.realtime_ns() - now_ns
        if count > self._sent.shape[0]:
            self._sent = np.zeros(count, native.SENT_DTYPE)
        try:
            n = sock.send(rec.next_seq, count, self._sent)
        except OSError:
            # e.g. ECONNREFUSED after an ICMP port unreachable: the probes count as lost.
            n = 0
            rec.send_errors += 1
        out = self._sent[:n]
        user_tx = out["user_tx_ns"]
        kernel_tx = out["kernel_tx_ns"]
        if n < count:
            # Probes the kernel did not take still count as sent, and will time out lost.
            now_rt = native.realtime_ns()
            user_tx = np.concatenate((user_tx, np.full(count - n, now_rt, np.int64)))
            kernel_tx = np.concatenate((kernel_tx, np.zeros(count - n, np.int64)))
        rec.on_sent(now_ns=now_ns, offset_ns=offset, user_tx_ns=user_tx, kernel_tx_ns=kernel_tx)

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
                now = native.monotonic_ns()
                offset_now = native.realtime_ns() - now
                self.recorder.record_native(buf[:n], now_ns=now, offset_now_ns=offset_now)
            if n < buf.shape[0]:
                return

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
        self.recorder.expect_source(SOURCE_KERNEL)

    def send(self, now_ns: int, count: int) -> None:
        rec = self.recorder
        offset = native.realtime_ns() - now_ns
        for _ in range(count):
            seq = rec.next_seq
            tx = native.realtime_ns()
            rec.on_sent(
                now_ns=now_ns,
                offset_ns=offset,
                user_tx_ns=np.array([tx], np.int64),
                kernel_tx_ns=np.zeros(1, np.int64),
            )
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
            self.recorder.record_reply(
                Reply(seq, rx, rtt_override_ns=rtt_us * 1000),
                now_ns=now,
                offset_now_ns=native.realtime_ns() - now,
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
        rec = self.recorder
        offset = native.realtime_ns() - now_ns
        tx = np.zeros(count, np.int64)
        writer = self._writer
        for i in range(count):
            seq = rec.next_seq + i
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
        rec.on_sent(
            now_ns=now_ns, offset_ns=offset, user_tx_ns=tx, kernel_tx_ns=np.zeros(count, np.int64)
        )
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
                self.recorder.record_reply(
                    Reply(p.seq, rx, refl_rx_ns=p.refl_rx_ns, refl_tx_ns=p.refl_tx_ns),
                    now_ns=now,
                    offset_now_ns=rx - now,
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
