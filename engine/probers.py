"""Probers: the thin I/O adapters that send probes of one target and read its replies.

Each prober owns a ``ProbeRecorder`` (``prober.recorder``, ``engine/recorder.py``): the
sans-I/O core that keeps the target's probes in flight, its records, RTT histogram and
base RTT, and does all of the RTT arithmetic. What is left here is I/O: sockets, tasks,
reconnects, clock reads, and handing what they return to the recorder. ``send(now,
count)`` is called by the engine's scheduler.

- ``UdpProber``: the native ``ProbeSocket`` registered with ``loop.add_reader``; network
  RTT from kernel stamps (kernel RX - kernel TX - the reflector's kernel RX -> kernel TX,
  sent two-step), user-space stamps where the kernel gave none. A plain UDP echo server
  is recognised by itself (or named with ``mode=echo``): its replies have no turnaround.
- ``IcmpProber``: the same over ``IcmpProbeSocket`` (ICMP echo; the target's kernel
  answers).
- ``TcpConnectProber``: one non-blocking connect per probe; RTT from the kernel's
  ``TCP_INFO`` (SYN -> SYN-ACK), the user-space connect time beside it.
- ``TcpEchoProber``: framed probe packets over one kept-open connection, reconnecting
  after a failure (probes sent meanwhile are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct

import numpy as np

from detnet import native
from detnet.engine.parse import escape
from detnet.engine.recorder import (
    KIND_ECHO,
    SETTLE_MARGIN_NS,
    SOURCE_KERNEL,
    SOURCE_KERNEL_2STEP,
    SOURCE_KERNEL_ECHO,
    SOURCE_USER,
    ProbeRecorder,
    Reply,
    SampleCallback,
)
from detnet.engine.targets import Target

log = logging.getLogger("detnet.probe")

RECV_BATCH = 1024
TX_STAMP_BATCH = 256
# How long a reflector may hold a reply's kernel TX stamp for the session's next reply
# before sending it in a follow-up: two probe intervals (so at steady probing the stamp
# rides in the next reply, free), within these bounds (a record waits at most this long).
FOLLOWUP_WAIT_MIN_NS = 1_000_000
FOLLOWUP_WAIT_MAX_NS = 50_000_000


def followup_wait_ns(interval_ns: int) -> int:
    """The follow-up wait a prober asks for at ``interval_ns``, in the protocol's 100 µs
    steps."""
    wait = min(max(2 * interval_ns, FOLLOWUP_WAIT_MIN_NS), FOLLOWUP_WAIT_MAX_NS)
    return wait // 100_000 * 100_000


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
        self._said: set[str] = set()
        self._setup()

    def _say_once(self, what: str, message: str, *args: object) -> None:
        """Log ``message`` about this target (after its name and URL) the first time
        ``what`` happens: a peer that answers strangely is said once, not per packet."""
        if what not in self._said:
            self._said.add(what)
            log.warning("target %s (%s)" + message, self.target.name, self.target.url, *args)

    def _bad_hmac(self) -> None:
        self._say_once(
            "hmac",
            ": replies fail the HMAC check (a different key on each side, or a key on one "
            "side only): they count as lost",
        )

    def _setup(self) -> None:
        """What a kind of prober adds to the common state (sockets, buffers)."""

    async def open(self) -> None:
        """Open sockets / connections. Raises OSError when that is impossible."""

    def send(self, now_ns: int, count: int) -> None:
        """Send ``count`` probes now (``now_ns``: CLOCK_MONOTONIC just read)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close sockets and cancel this prober's tasks."""


class _DatagramProber(Prober):
    """A native probe socket on the loop: sends, drains replies and late TX stamps, says
    once what a target that answers strangely sends instead."""

    def _setup(self) -> None:
        self._sock: native.ProbeSocket | native.IcmpProbeSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent = np.zeros(max(self.target.batch, 1), native.SENT_DTYPE)
        self._replies = np.zeros(RECV_BATCH, native.REPLY_DTYPE)
        self._stamps = np.zeros(TX_STAMP_BATCH, native.SENT_DTYPE)
        self.recv_errors = 0

    def _socket(self) -> native.ProbeSocket | native.IcmpProbeSocket:
        raise NotImplementedError

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = self._sock = self._socket()
        self.recorder.expect_source(self._expected_source(sock))
        # The wake descriptor: readable on replies and on late TX stamps (the error queue
        # never puts it into POLLERR, which would stop uvloop's watcher for good).
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _expected_source(self, sock: native.ProbeSocket | native.IcmpProbeSocket) -> int:
        return SOURCE_KERNEL if sock.kernel_rx else SOURCE_USER

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
        hw_tx = out["hw_tx_ns"]
        if n < count:
            # Probes the kernel did not take still count as sent, and will time out lost.
            now_rt = native.realtime_ns()
            user_tx = np.concatenate((user_tx, np.full(count - n, now_rt, np.int64)))
            kernel_tx = np.concatenate((kernel_tx, np.zeros(count - n, np.int64)))
            hw_tx = np.concatenate((hw_tx, np.zeros(count - n, np.int64)))
        rec.on_sent(
            now_ns=now_ns,
            offset_ns=offset,
            user_tx_ns=user_tx,
            kernel_tx_ns=kernel_tx,
            hw_tx_ns=hw_tx if hw_tx.any() else None,
        )

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # TX stamps first: a reply never leaves before its request's stamp is queued.
        while (k := sock.take_tx_stamps(self._stamps)) > 0:
            self.recorder.on_late_tx(self._stamps[:k])
            if k < self._stamps.shape[0]:
                break
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
                self._on_rows(buf[:n])
                self.recorder.record_native(buf[:n], now_ns=now, offset_now_ns=offset_now)
            if sock.foreign != self.recorder.foreign:
                self._on_foreign(sock)
            if isinstance(sock, native.ProbeSocket) and sock.bad_hmac:
                self._bad_hmac()
            if n < buf.shape[0]:
                return

    def _on_rows(self, rows: np.ndarray) -> None:
        """What the rows say about the peer, before they are recorded."""

    def _on_foreign(self, sock: native.ProbeSocket | native.IcmpProbeSocket) -> None:
        self.recorder.foreign = sock.foreign
        first = sock.first_foreign
        if first is not None:
            self._say_once(
                "foreign",
                ": got a reply that is neither ours nor an echo of our probe: %s (counted in "
                "detnet_probes_foreign_replies_total; is this the right port, and a detnet "
                "reflector or an echo server?)",
                escape(first.describe()),
            )

    async def aclose(self) -> None:
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


class UdpProber(_DatagramProber):
    """UDP probes against a ``detnet reflect --udp`` reflector (two-step stamps) or any
    UDP echo server, via the native core."""

    def _setup(self) -> None:
        super()._setup()
        self.echo = self.target.mode == "echo"  # the peer echoes verbatim (said or seen)

    def _socket(self) -> native.ProbeSocket:
        wait = followup_wait_ns(self.target.interval_ns)
        sock = native.ProbeSocket(
            self.address,
            self.target.port,
            session=self.session,
            size=self.target.size,
            key=self.target.key,
            two_step=not self.echo,
            followup_wait_ns=wait,
            hardware="auto",
        )
        self.recorder.settle_ns = wait + SETTLE_MARGIN_NS
        return sock

    def _expected_source(self, sock: native.ProbeSocket | native.IcmpProbeSocket) -> int:
        if not sock.kernel_rx:
            return SOURCE_USER
        if self.echo:
            return SOURCE_KERNEL_ECHO
        assert isinstance(sock, native.ProbeSocket)
        return SOURCE_KERNEL_2STEP if sock.two_step else SOURCE_KERNEL

    def _on_rows(self, rows: np.ndarray) -> None:
        if not self.echo and (rows["kind"] == KIND_ECHO).any():
            self.echo = True
            if self._sock is not None and self._sock.kernel_rx:
                self.recorder.expect_source(SOURCE_KERNEL_ECHO)
            self._say_once(
                "echo",
                " echoes our probes verbatim: measuring it as an echo server "
                "(timestamp_source kernel-echo: the server's wake-up is part of the RTT); "
                "add ?mode=echo (or mode: echo) to say so",
            )


class IcmpProber(_DatagramProber):
    """ICMP echo probes (ping socket, or raw socket with CAP_NET_RAW): the target's kernel
    answers, so kernel stamps make the RTT kernel-to-kernel without any reflector."""

    def _expected_source(self, sock: native.ProbeSocket | native.IcmpProbeSocket) -> int:
        return SOURCE_KERNEL_ECHO if sock.kernel_rx else SOURCE_USER

    def _socket(self) -> native.IcmpProbeSocket:
        # IcmpNotPermitted (an OSError) says in one line what to set: the engine reports
        # it as the target's error.
        return native.IcmpProbeSocket(
            self.address, session=self.session, size=self.target.size, hardware="auto"
        )


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

    def _foreign(self, frame: bytes) -> None:
        self.recorder.foreign += 1
        self._say_once(
            "foreign",
            ": got a frame that is neither our reply nor an echo of our probe: %d bytes "
            "starting %s (counted in detnet_probes_foreign_replies_total; is this a detnet "
            "echo server?)",
            len(frame),
            frame[:16].hex(),
        )

    def _echoed(self) -> None:
        self._say_once(
            "echo",
            " echoes our probes verbatim: measuring it as an echo server (no reflector "
            "stamps, the server's wake-up is part of the RTT)",
        )

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
                except native.HmacError:
                    self._bad_hmac()
                    continue
                except native.PacketError:
                    self._foreign(data)  # a frame that is not our reply: count, go on
                    continue
                if p.session != self.session:
                    self._foreign(data)
                    continue
                if p.is_reply:
                    reply = Reply(p.seq, rx, refl_rx_ns=p.refl_rx_ns, refl_tx_ns=p.refl_tx_ns)
                else:
                    self._echoed()  # our own request back: a plain TCP echo server
                    reply = Reply(p.seq, rx)
                self.recorder.record_reply(reply, now_ns=now, offset_now_ns=rx - now)
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
    elif target.protocol == "icmp":
        cls = IcmpProber
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
