"""The reflector in pure Python (fallback of ``_reflector.pxi``; docs/protocol.md).

Same decisions and counters as the Cython fast path, in the same batches (read up to
``batch`` datagrams, answer them, then read the kernel's TX stamps), so that a stamp can
ride in a reply only from the next batch on in both implementations.

Two-step: a request that asks for it (capability block in its fill) gets a version-2
reply, sent with a per-message request for a kernel software TX stamp. The stamp, read
from the error queue, goes back in the next reply to the same session (address, port
and session id), or in a follow-up packet once its wait is over (``flush()``). The
session table and the stamps pending per session are bounded; a session that does not
fit gets one-step replies.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import OrderedDict, deque
from typing import Any

from detnet.native import _py_codec as c
from detnet.native._common import (
    DEFAULT_WAIT_NS,
    MAX_WAIT_NS,
    MIN_WAIT_NS,
    SOF_OPT_ID,
    SOF_OPT_TSONLY,
    SOF_RX_SOFTWARE,
    SOF_SOFTWARE,
    SOF_TX_SOFTWARE,
    check_reflector_args,
)
from detnet.native._py_bucket import SourceBuckets
from detnet.native._py_sockets import (
    ANC_SIZE,
    SO_TIMESTAMPING,
    Wake,
    enable_timestamps,
    monotonic_ns,
    read_errqueue,
    realtime_ns,
    rx_stamps,
)

SESSIONS = 1024  # two-step sessions tracked at once
PER_SESSION = 64  # stamps pending per session; more in flight get one-step replies
SERVE_ROUNDS = 64
REFLECTOR_COUNTERS = (
    "received",
    "replied",
    "invalid",
    "bad_hmac",
    "rate_limited",
    "two_step",
    "untracked",
    "stamped",
    "carried",
    "followups",
    "lost",
    "followups_limited",
)
# One datagram as recvmsg returns it: data, ancillary data, flags, source address.
_Datagram = tuple[bytes, list[tuple[int, int, bytes]], int, Any]
_TX_CMSG = [(socket.SOL_SOCKET, SO_TIMESTAMPING, struct.pack("=I", SOF_TX_SOFTWARE))]
_AWAITING = 0


class _Pending:
    """One two-step reply whose kernel TX stamp has not been delivered yet."""

    __slots__ = ("due", "key", "pre_tx", "seq", "source", "stamp")

    def __init__(self, seq: int, due: int, pre_tx: int) -> None:
        self.seq = seq
        self.due = due
        self.pre_tx = pre_tx  # the clock read before sending: a stamp cannot be older
        self.key = -1
        self.stamp = 0
        self.source = _AWAITING  # then FOLLOWUP_KERNEL, or FOLLOWUP_LOST


class _Session:
    __slots__ = ("address", "pending", "session")

    def __init__(self, address: tuple[object, ...], session: int) -> None:
        self.address = address
        self.session = session
        self.pending: deque[_Pending] = deque()


class Reflector:
    """The reflector on a bound non-blocking UDP socket (recvmsg/sendmsg loop)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        key: bytes | None = None,
        rate_pps: float = 0.0,
        burst: int = 32,
        batch: int = 64,
        two_step: bool = False,
        followup_wait_ns: int = DEFAULT_WAIT_NS,
        sessions: int = SESSIONS,
    ) -> None:
        self._key = c.checked_key(key)
        check_reflector_args(
            rate_pps=rate_pps,
            burst=burst,
            batch=batch,
            followup_wait_ns=followup_wait_ns,
            sessions=sessions,
        )
        self._sock = sock
        self._rate = float(rate_pps)
        self._batch = batch
        self._wait = followup_wait_ns
        self._max_sessions = sessions
        self._buckets = SourceBuckets(rate_pps=rate_pps, burst=burst)
        self._sessions: OrderedDict[tuple[object, ...], _Session] = OrderedDict()
        self._by_key: dict[int, _Pending] = {}
        self._next_key = 0
        self._pending = 0
        self._wake: Wake | None = None
        self.received = self.replied = self.invalid = self.bad_hmac = self.rate_limited = 0
        self.two_step = self.untracked = self.stamped = self.carried = 0
        self.followups = self.lost = self.followups_limited = 0
        sock.setblocking(False)
        self._ts_flags = SOF_RX_SOFTWARE | SOF_SOFTWARE
        if two_step:
            self._ts_flags |= SOF_OPT_ID | SOF_OPT_TSONLY
        self.kernel_rx, _ = enable_timestamps(sock, self._ts_flags)
        # Two-step needs the OPT_ID counter: without SO_TIMESTAMPING there is none.
        self.two_step_enabled = bool(two_step) and self._ts_on()

    def _ts_on(self) -> bool:
        try:
            value = self._sock.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING)
        except OSError:
            return False
        return bool(value & SOF_OPT_ID)

    def fileno(self) -> int:
        """A descriptor readable while the socket has datagrams or TX stamps queued: watch
        this one (not the socket) so error-queue entries never surface as POLLERR."""
        if self._wake is None:
            self._wake = Wake(self._sock.fileno())
        return self._wake.fileno()

    def close(self) -> None:
        """Close the wake descriptor (the socket belongs to the caller)."""
        if self._wake is not None:
            self._wake.close()
            self._wake = None

    def _session(self, address: tuple[object, ...], session: int) -> _Session | None:
        """The session's entry (created if the table has room), or None."""
        key = (*address[:2], session)
        entry = self._sessions.get(key)
        if entry is None:
            if len(self._sessions) >= self._max_sessions:
                idle = next((k for k, s in self._sessions.items() if not s.pending), None)
                if idle is None:
                    return None
                del self._sessions[idle]
            entry = self._sessions[key] = _Session(address, session)
        else:
            self._sessions.move_to_end(key)
        return entry

    @staticmethod
    def _has_room(entry: _Session, now: int) -> bool:
        """Room for one more stamp, counting the one this reply will carry away."""
        if len(entry.pending) < PER_SESSION:
            return True
        head = entry.pending[0]
        return head.source != _AWAITING or head.due <= now

    def serve(self) -> int:
        """Handle every datagram pending now (up to 64 batches); return how many were read."""
        read = 0
        for _ in range(SERVE_ROUNDS):
            got = self._read_batch()
            if not got:
                if self.two_step_enabled:
                    # Woken by the error queue (a late or stray TX stamp), or by nothing:
                    # read it, or the wake descriptor stays readable.
                    self._drain()
                break
            read += len(got)
            self._answer(got)
            if len(got) < self._batch:
                break
        return read

    def _read_batch(
        self,
    ) -> list[_Datagram]:
        got: list[_Datagram] = []
        while len(got) < self._batch:
            try:
                got.append(self._sock.recvmsg(c.MAX_SIZE, ANC_SIZE))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # stale ICMP error of an earlier reply: not our input
                raise
        return got

    def _answer(self, got: list[_Datagram]) -> None:
        self.received += len(got)
        user_rx = realtime_ns()
        now = monotonic_ns()
        keyed = self._key is not None
        out: list[tuple[bytearray, tuple[object, ...], _Session | None, _Pending | None]] = []
        for data, ancdata, msg_flags, addr in got:
            n = len(data)
            if msg_flags & socket.MSG_TRUNC:
                self.invalid += 1
                continue
            f = c.Fields()
            code = c.check_header(data, n, f)
            if code == c.OK and (f.flags & c.FLAG_REPLY or f.refl_rx_ns or f.refl_tx_ns):
                code = c.E_FLAGS  # a reply or a stamped packet: never reflect it
            if code != c.OK:
                self.invalid += 1
                continue
            if c.check_hmac(self._key, f.flags, data, n) != c.OK:
                self.bad_hmac += 1
                continue
            if self._rate > 0 and not self._buckets.allow(addr[0], now):
                self.rate_limited += 1
                continue
            rx_sw = rx_stamps(ancdata)[0]
            wait = c.asks_two_step(data, n, f.flags) if self.two_step_enabled else -1
            entry = self._session(addr, f.session) if wait >= 0 else None
            if entry is not None and not self._has_room(entry, now):
                entry = None
            if wait >= 0 and entry is None:
                self.untracked += 1
            reply = bytearray(n)  # fresh fill: never an echo of the request's payload
            flags = c.FLAG_REPLY | (c.FLAG_HMAC if keyed else 0)
            pending = None
            if entry is None:
                c.HEADER.pack_into(
                    reply,
                    0,
                    c.MAGIC,
                    c.VERSION,
                    flags,
                    n,
                    f.session,
                    0,
                    f.seq,
                    f.tx_ns,
                    rx_sw or user_rx,
                    0,
                )
            else:
                carried = self._carry(entry, now)
                source = carried.source if carried else c.FOLLOWUP_NONE
                rx_source = c.TS_KERNEL if rx_sw else c.TS_USER
                c.HEADER.pack_into(
                    reply,
                    0,
                    c.MAGIC,
                    c.VERSION_TWO_STEP,
                    flags,
                    n,
                    f.session,
                    rx_source << 24 | source << 16,
                    f.seq,
                    f.tx_ns,
                    rx_sw or user_rx,
                    0,
                )
                if carried:
                    c.EXT.pack_into(reply, c.HEADER_SIZE, carried.seq, carried.stamp)
                wait_ns = wait * c.WAIT_UNIT_NS if wait else self._wait
                wait_ns = min(max(wait_ns, MIN_WAIT_NS), MAX_WAIT_NS)
                pending = _Pending(f.seq, now + wait_ns, 0)
                entry.pending.append(pending)
                self._pending += 1
            out.append((reply, addr, entry, pending))
        if out:
            self._send(out)

    def _carry(self, entry: _Session, now: int) -> _Pending | None:
        """The session's oldest pending stamp, if it is ready (or its wait is over)."""
        if not entry.pending:
            return None
        head = entry.pending[0]
        if head.source == _AWAITING:
            if head.due > now:
                return None
            head.source = c.FOLLOWUP_LOST
            self._by_key.pop(head.key, None)
            self.lost += 1
        entry.pending.popleft()
        self._pending -= 1
        self.carried += 1
        return head

    def _send(
        self, out: list[tuple[bytearray, tuple[object, ...], _Session | None, _Pending | None]]
    ) -> None:
        keyed = self._key is not None
        tx = realtime_ns()
        stamped = 0
        for reply, addr, entry, pending in out:
            n = len(reply)
            if keyed:
                tx = realtime_ns()  # the HMAC covers the stamp
            struct.pack_into("!Q", reply, 40, tx)
            if keyed:
                assert self._key is not None
                reply[n - c.HMAC_SIZE :] = c.mac(self._key, memoryview(reply)[: n - c.HMAC_SIZE])
            try:
                if pending is None:
                    self._sock.sendto(reply, addr)
                else:
                    self._sock.sendmsg([reply], _TX_CMSG, 0, addr)
            except OSError:
                if pending is not None and entry is not None:
                    entry.pending.remove(pending)
                    self._pending -= 1
                    self._resync()
                continue  # full buffer or unreachable source: a dropped reply, not a crash
            self.replied += 1
            if pending is not None:
                pending.pre_tx = tx
                pending.key = self._next_key
                self._by_key[pending.key] = pending
                self._next_key = (self._next_key + 1) & 0xFFFFFFFF
                self.two_step += 1
                stamped += 1
        if stamped:
            self._drain()

    def _drain(self) -> None:
        """Read the kernel TX stamps queued for the socket; attach them to their replies."""
        for key, sw, _ in read_errqueue(self._sock):
            pending = self._by_key.pop(key, None)
            if pending is None or pending.source != _AWAITING or not sw:
                continue
            if sw < pending.pre_tx:
                continue  # a stale key (see _resync): leave it to be reported lost
            pending.stamp = sw
            pending.source = c.FOLLOWUP_KERNEL
            self.stamped += 1

    def _resync(self) -> None:
        """After a failed stamped send the kernel may or may not have used a key: restart
        its OPT_ID counter (off and on again) so ours matches it; stamps awaited under the
        old numbering are reported lost when their wait is over."""
        self._drain()
        for pending in self._by_key.values():
            pending.key = -1
        self._by_key.clear()
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, self._ts_flags & ~SOF_OPT_ID)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, self._ts_flags)
        except OSError:
            self.two_step_enabled = False
        self._next_key = 0

    def flush(self, now_ns: int | None = None) -> int:
        """Read TX stamps, then send a follow-up for every stamp whose wait is over at
        ``now_ns`` (CLOCK_MONOTONIC; now when None); return how many were sent."""
        now = monotonic_ns() if now_ns is None else now_ns
        if self._pending:
            self._drain()
        sent = 0
        size = c.two_step_min_size(self._key is not None)
        flags = c.FLAG_REPLY | c.FLAG_FOLLOWUP | (c.FLAG_HMAC if self._key is not None else 0)
        for entry in self._sessions.values():
            while entry.pending and entry.pending[0].due <= now:
                head = entry.pending.popleft()
                self._pending -= 1
                if head.source == _AWAITING:
                    head.source = c.FOLLOWUP_LOST
                    self._by_key.pop(head.key, None)
                    self.lost += 1
                if self._rate > 0 and not self._buckets.allow(str(entry.address[0]), now):
                    self.followups_limited += 1
                    continue
                packet = bytearray(size)
                c.HEADER.pack_into(
                    packet,
                    0,
                    c.MAGIC,
                    c.VERSION_TWO_STEP,
                    flags,
                    size,
                    entry.session,
                    head.source << 16,
                    head.seq,
                    0,
                    0,
                    0,
                )
                c.EXT.pack_into(packet, c.HEADER_SIZE, head.seq, head.stamp)
                if self._key is not None:
                    packet[size - c.HMAC_SIZE :] = c.mac(
                        self._key, memoryview(packet)[: size - c.HMAC_SIZE]
                    )
                try:
                    self._sock.sendto(packet, entry.address)
                except OSError:
                    continue
                sent += 1
                self.followups += 1
        return sent

    def next_followup_ns(self) -> int:
        """CLOCK_MONOTONIC ns when the next follow-up is due (call flush() then), 0: none."""
        dues = [s.pending[0].due for s in self._sessions.values() if s.pending]
        return min(dues) if dues else 0

    def pending_followups(self) -> int:
        """Two-step stamps not yet delivered (in a reply or a follow-up)."""
        return self._pending

    def stats(self) -> dict[str, int]:
        """Counters since start (see docs/protocol.md, "Counters")."""
        return {name: int(getattr(self, name)) for name in REFLECTOR_COUNTERS}
