"""ProbeRecorder: the measurement core of one target, sans-I/O.

Raw replies go in, records come out. The recorder owns the target's ``SequenceTracker``
(probes in flight), its ``RttRing`` (finished probes), the RTT histogram and the base-RTT
tracker, and turns each reply into a record: the timestamp source (kernel or user-space
stamps), the reflector's turnaround subtracted, samples spanning a clock step dropped,
forward/backward delays, flags. Probes past their deadline become lost records.

Time comes in as arguments (``now_ns``: CLOCK_MONOTONIC, ``offset_now_ns``: realtime -
monotonic, both just read by the caller); nothing here reads a clock or touches a socket.
The probers (``engine/probers.py``) are the I/O around it.

A batch of replies is a ``Replies`` (arrays) and goes through ``record_replies()`` and the
vectorised ``delays()``; one reply is a ``Reply`` and goes through ``record_reply()``, their
scalar twin, because numpy's per-call overhead dominates for a single element.
tests/unit/test_recorder.py holds the two paths equal, record for record, on arbitrary
inputs. A new reply field (a second timestamp step, say) is added to ``Reply``,
``Replies``, ``delays()`` and ``record_reply()`` here, and nowhere else.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

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

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

# A sample whose realtime-monotonic offset moved more than this between send and receive
# spans a clock step (NTP slews at most 0.5 ms/s, far below): it is dropped, not used.
CLOCK_STEP_NS = 5_000_000

# Timestamp sources: which clocks a record's RTT comes from. A code per record; its name is
# what samples and metrics say, its ring flag what the window statistics read. A new source
# (a two-step reflector TX stamp, hardware stamps) is a new code here, with its name and flag.
SOURCE_USER = 0  # user-space clock reads next to the syscalls
SOURCE_KERNEL = 1  # kernel TX/RX software stamps, or the kernel's own RTT (TCP_INFO)
SOURCE_NAMES: tuple[str, ...] = ("user", "kernel")
SOURCE_FLAGS: tuple[int, ...] = (0, FLAG_KERNEL)
_SOURCE_FLAGS = np.array(SOURCE_FLAGS, np.uint8)
_SOURCE_BY_KERNEL = np.array((SOURCE_USER, SOURCE_KERNEL), np.uint8)  # [kernel stamps used]


# --- inputs -----------------------------------------------------------------------------
class Reply(NamedTuple):
    """One raw reply. Stamps in ns, CLOCK_REALTIME; 0 where there is none.

    A NamedTuple, not a frozen dataclass: it is built once per reply on the hot path, and
    a frozen dataclass costs about three times as much to construct.
    """

    seq: int
    rx_user_ns: int  # user-space receive stamp
    rx_kernel_ns: int = 0  # kernel RX stamp
    refl_rx_ns: int = 0  # the reflector's receive stamp
    refl_tx_ns: int = 0  # the reflector's send stamp
    rtt_override_ns: int | None = None  # network RTT measured elsewhere (TCP_INFO); 0: none


# The native REPLY_DTYPE field behind each field of Reply, in Reply's order (the override
# has none: it comes from TCP_INFO).
NATIVE_FIELDS: tuple[str, ...] = ("seq", "user_rx_ns", "kernel_rx_ns", "refl_rx_ns", "refl_tx_ns")


@dataclass(frozen=True)
class Replies:
    """A batch of raw replies in arrival order: the fields of ``Reply``, as equal-length
    arrays."""

    seq: npt.NDArray[np.integer]
    rx_user_ns: I64
    rx_kernel_ns: I64
    refl_rx_ns: I64
    refl_tx_ns: I64
    rtt_override_ns: I64 | None = None

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    @classmethod
    def from_native(cls, r: npt.NDArray[np.void]) -> Replies:
        """A native ``REPLY_DTYPE`` array (views, no copies)."""
        return cls(*[r[name] for name in NATIVE_FIELDS])

    def take(self, mask: npt.NDArray[np.bool_]) -> Replies:
        """The replies where ``mask`` is true."""
        ov = self.rtt_override_ns
        return Replies(
            seq=self.seq[mask],
            rx_user_ns=self.rx_user_ns[mask],
            rx_kernel_ns=self.rx_kernel_ns[mask],
            refl_rx_ns=self.refl_rx_ns[mask],
            refl_tx_ns=self.refl_tx_ns[mask],
            rtt_override_ns=None if ov is None else ov[mask],
        )


# --- the arithmetic ---------------------------------------------------------------------
@dataclass(frozen=True)
class Delays:
    """What a batch of received replies measured. Float ns, NaN where absent."""

    rtt_ns: F64  # network RTT: the statistics use this one
    user_rtt_ns: F64  # the same probe's RTT from user-space stamps
    fwd_ns: F64  # reflector RX - sender TX (carries the hosts' clock offset)
    back_ns: F64  # sender RX - reflector TX
    source: U8  # SOURCE_* of each RTT


def delays(*, user_tx_ns: I64, kernel_tx_ns: I64, replies: Replies) -> Delays:
    """The delays of received replies, given their probes' TX stamps (same order).

    RTT is kernel RX - kernel TX when both kernel stamps exist, else the user-space pair;
    either minus the reflector's turnaround (its TX - RX) when it sent both stamps.
    ``rtt_override_ns`` > 0 replaces the RTT (and makes it a kernel one).
    """
    krx, urx = replies.rx_kernel_ns, replies.rx_user_ns
    rrx, rtx = replies.refl_rx_ns, replies.refl_tx_ns
    has_refl = (rrx != 0) & (rtx != 0)
    turn = np.where(has_refl, rtx - rrx, 0)
    kernel = (kernel_tx_ns != 0) & (krx != 0)
    tx = np.where(kernel, kernel_tx_ns, user_tx_ns)
    rx = np.where(kernel, krx, urx)
    rtt = (rx - tx - turn).astype(np.float64)
    user_rtt = (urx - user_tx_ns - turn).astype(np.float64)
    if replies.rtt_override_ns is not None:
        ov = replies.rtt_override_ns
        kernel = ov > 0
        rtt = np.where(kernel, ov, user_rtt).astype(np.float64)
    return Delays(
        rtt_ns=rtt,
        user_rtt_ns=user_rtt,
        fwd_ns=np.where(has_refl, (rrx - tx).astype(np.float64), np.nan),
        back_ns=np.where(has_refl, (rx - rtx).astype(np.float64), np.nan),
        source=_SOURCE_BY_KERNEL.take(kernel.view(np.uint8)),
    )


# --- outputs ----------------------------------------------------------------------------
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
    timestamp_source: str  # a SOURCE_NAMES entry ("user" for lost probes)


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


# --- the recorder -----------------------------------------------------------------------
class ProbeRecorder:
    """Probes in flight and finished probes of one target: replies and losses to records.

    Called on the event loop; ``ring``, ``histogram``, ``base_rtt()``, ``totals()`` and
    ``timestamp_source`` may be read from other threads.
    """

    def __init__(
        self,
        *,
        name: str,
        timeout_ns: int,
        capacity: int,
        tracker_capacity: int,
        on_sample: SampleCallback | None = None,
    ) -> None:
        self.name = name
        self.timeout_ns = timeout_ns
        self.tracker = SequenceTracker(tracker_capacity)
        self.ring = RttRing(capacity)
        self.histogram = CumulativeHistogram(RTT_EDGES_S)
        self.on_sample = on_sample
        self.skipped = 0  # the scheduler's missed send slots, counted by the engine
        self.send_errors = 0  # sends the kernel refused, counted by the prober
        self._source = SOURCE_USER
        self._base = BaseRttTracker()
        self._base_lock = threading.Lock()
        self._native_dtype: np.dtype[np.void] | None = None
        self._native_pick: Callable[[Any], Any] = operator.itemgetter(0)

    # --- reading ------------------------------------------------------------------------
    @property
    def timestamp_source(self) -> str:
        """What the latest record's RTT came from; before any, what the prober expects."""
        return SOURCE_NAMES[self._source]

    def expect_source(self, source: int) -> None:
        """Say which source (``SOURCE_*``) the prober expects, until a record says."""
        if not 0 <= source < len(SOURCE_NAMES):
            raise ValueError(f"unknown timestamp source {source}")
        self._source = source

    @property
    def next_seq(self) -> int:
        """The sequence number of the next probe to send."""
        return self.tracker.next_seq

    @property
    def in_flight(self) -> int:
        """Probes sent and not finished yet."""
        return self.tracker.in_flight

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

    # --- sending and losses -------------------------------------------------------------
    def on_sent(self, *, now_ns: int, offset_ns: int, user_tx_ns: I64, kernel_tx_ns: I64) -> None:
        """Record probes ``next_seq ..`` as sent at ``now_ns`` (their TX stamps; kernel 0
        where there is none), first finishing the oldest ones if their slots are needed."""
        n = int(user_tx_ns.shape[0])
        self.sweep(now_ns, reserve=n)
        self.tracker.on_sent(
            first_seq=self.tracker.next_seq,
            user_tx_ns=user_tx_ns,
            kernel_tx_ns=kernel_tx_ns,
            deadline_ns=now_ns + self.timeout_ns,
            offset_ns=offset_ns,
        )

    def sweep(self, now_ns: int, *, reserve: int = 0) -> None:
        """Record every probe past its deadline as lost (and the oldest ones when
        ``reserve`` new probes need their slots)."""
        self._record_lost(now_ns, self.tracker.expire(now_ns, reserve=reserve))

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
            user = SOURCE_NAMES[SOURCE_USER]
            for seq, s in zip(expired.seq.tolist(), sent.tolist(), strict=True):
                self.on_sample(Sample(self.name, seq, s, None, None, None, None, True, user))

    # --- replies ------------------------------------------------------------------------
    def record_native(
        self, replies: npt.NDArray[np.void], *, now_ns: int, offset_now_ns: int
    ) -> None:
        """Record a native ``REPLY_DTYPE`` batch: one reply takes the scalar path."""
        if replies.shape[0] != 1:
            self.record_replies(
                Replies.from_native(replies), now_ns=now_ns, offset_now_ns=offset_now_ns
            )
            return
        if replies.dtype is not self._native_dtype:
            names = replies.dtype.names or ()
            self._native_pick = operator.itemgetter(*(names.index(n) for n in NATIVE_FIELDS))
            self._native_dtype = replies.dtype
        # One item() call gives every field as a Python int: five field reads would cost
        # ten times as much, more than all the arithmetic.
        seq, rx_user, rx_kernel, refl_rx, refl_tx = self._native_pick(replies.item(0))
        self._record_one(now_ns, offset_now_ns, seq, rx_user, rx_kernel, refl_rx, refl_tx, None)

    def record_replies(self, replies: Replies, *, now_ns: int, offset_now_ns: int) -> None:
        """Join a batch of replies (arrival order) to the probes in flight and record the
        received ones; flag the records that duplicates and late replies belong to."""
        self.sweep(now_ns)  # the tracker needs every overdue probe expired first
        tr = self.tracker
        cls = tr.on_replies(replies.seq)
        got = cls.received
        if np.any(got):
            slots = cls.slots[got]
            step = np.abs(tr.offset_ns[slots] - offset_now_ns) > CLOCK_STEP_NS
            if np.any(step):
                tr.drop(slots[step])
                got = got.copy()
                got[got] = ~step
                slots = slots[~step]
            if slots.shape[0] == len(replies):  # the common case: every reply is a sample
                self._write(now_ns, slots, replies, cls.reordered)
            elif slots.shape[0]:
                self._write(now_ns, slots, replies.take(got), cls.reordered[got])
        # After the records are written, so that a duplicate arriving in the same batch as
        # its original finds the record (as it does when the two come one at a time).
        if np.any(cls.duplicate | cls.late):
            self._flag(cls.slots[cls.duplicate], FLAG_DUP)
            seq = replies.seq.astype(np.int64, copy=False)
            known = cls.late & (tr.seq[cls.slots] == seq)
            self._flag(cls.slots[known], FLAG_LATE)

    def _write(
        self, now_ns: int, slots: I64, got: Replies, reordered: npt.NDArray[np.bool_]
    ) -> None:
        tr = self.tracker
        user_tx = tr.user_tx_ns[slots]
        d = delays(user_tx_ns=user_tx, kernel_tx_ns=tr.kernel_tx_ns[slots], replies=got)
        # Table lookups and in-place ORs on uint8: np.where with scalars costs more here.
        flags = _SOURCE_FLAGS.take(d.source)
        flags |= FLAG_RECEIVED
        flags[reordered] |= FLAG_REORDERED
        seqs = got.seq.astype(np.int64)
        pos = self.ring.append(
            t_ns=now_ns,
            sent_ns=user_tx,
            seq=seqs,
            rtt_ns=d.rtt_ns,
            user_rtt_ns=d.user_rtt_ns,
            fwd_ns=d.fwd_ns,
            back_ns=d.back_ns,
            flags=flags,
        )
        tr.ring_pos[slots] = np.arange(pos, pos + slots.shape[0], dtype=np.int64)
        self.histogram.add(d.rtt_ns)
        self._source = int(d.source[-1])
        with self._base_lock:
            self._base.update(now_ns, float(d.rtt_ns.min()))
        if self.on_sample is not None:
            for i in range(seqs.shape[0]):
                self.on_sample(
                    Sample(
                        self.name,
                        int(seqs[i]),
                        int(user_tx[i]),
                        int(d.rtt_ns[i]),
                        int(d.user_rtt_ns[i]),
                        _opt_int(d.fwd_ns[i]),
                        _opt_int(d.back_ns[i]),
                        False,
                        SOURCE_NAMES[d.source[i]],
                    )
                )

    def record_reply(self, reply: Reply, *, now_ns: int, offset_now_ns: int) -> None:
        """Scalar twin of ``record_replies`` for one reply: the same records, on Python ints."""
        self._record_one(now_ns, offset_now_ns, *reply)

    def _record_one(  # positional parameters on purpose: the per-reply hot path
        self,
        now_ns: int,
        offset_now_ns: int,
        seq: int,
        rx_user: int,
        rx_kernel: int,
        refl_rx: int,
        refl_tx: int,
        override: int | None,
    ) -> None:
        self.sweep(now_ns)
        tr = self.tracker
        outcome = tr.on_reply(seq)
        slot = seq & (tr.capacity - 1)
        if outcome in (DUPLICATE, LATE):
            if int(tr.seq[slot]) == seq:
                pos = int(tr.ring_pos[slot])
                if pos >= 0:
                    self.ring.set_flags(
                        np.array([pos]), FLAG_DUP if outcome == DUPLICATE else FLAG_LATE
                    )
            return
        if abs(int(tr.offset_ns[slot]) - offset_now_ns) > CLOCK_STEP_NS:
            tr.drop(slot)
            return
        # The arithmetic of delays(), inline: a function call here costs a tenth of the path.
        user_tx = int(tr.user_tx_ns[slot])
        kernel_tx = int(tr.kernel_tx_ns[slot])
        has_refl = refl_rx != 0 and refl_tx != 0
        turn = refl_tx - refl_rx if has_refl else 0
        kernel = kernel_tx != 0 and rx_kernel != 0
        tx = kernel_tx if kernel else user_tx
        rx = rx_kernel if kernel else rx_user
        rtt = rx - tx - turn
        user_rtt = rx_user - user_tx - turn
        if override is not None:
            kernel = override > 0
            rtt = override if kernel else user_rtt
        fwd = float(refl_rx - tx) if has_refl else math.nan
        back = float(rx - refl_tx) if has_refl else math.nan
        source = SOURCE_KERNEL if kernel else SOURCE_USER
        flags = FLAG_RECEIVED | SOURCE_FLAGS[source]
        if outcome == REORDERED:
            flags |= FLAG_REORDERED
        tr.ring_pos[slot] = self.ring.append_one(
            t_ns=now_ns,
            sent_ns=user_tx,
            seq=seq,
            rtt_ns=float(rtt),
            user_rtt_ns=float(user_rtt),
            fwd_ns=fwd,
            back_ns=back,
            flags=flags,
        )
        self.histogram.add_one(rtt)
        self._source = source
        with self._base_lock:
            self._base.update(now_ns, float(rtt))
        if self.on_sample is not None:
            self.on_sample(
                Sample(
                    self.name,
                    seq,
                    user_tx,
                    rtt,
                    user_rtt,
                    _opt_int(fwd),
                    _opt_int(back),
                    False,
                    SOURCE_NAMES[source],
                )
            )

    def _flag(self, slots: I64, flag: int) -> None:
        pos = self.tracker.ring_pos[slots]
        self.ring.set_flags(pos[pos >= 0], flag)
