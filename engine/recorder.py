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

One module past 500 lines on purpose: it is the one measurement core, and its one-step
and two-step paths, vectorised and scalar, sit side by side so that a reader (and the
property test that holds them equal) sees every branch of the arithmetic in one place.
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
# what samples and metrics say (docs/protocol.md, "Timestamp sources and labels"), its ring
# flag what the window statistics read.
SOURCE_USER = 0  # user-space clock reads next to the syscalls
SOURCE_KERNEL = 1  # kernel TX/RX software stamps, one-step turnaround (or TCP_INFO's RTT)
SOURCE_KERNEL_2STEP = 2  # ... and the reflector's kernel TX stamp, sent two-step
SOURCE_KERNEL_ECHO = 3  # kernel stamps of a verbatim echo: the server's wake-up included
SOURCE_HARDWARE = 4  # the NIC's TX and RX stamps
SOURCE_NAMES: tuple[str, ...] = ("user", "kernel", "kernel-2step", "kernel-echo", "hardware")
SOURCE_FLAGS: tuple[int, ...] = (0, FLAG_KERNEL, FLAG_KERNEL, FLAG_KERNEL, FLAG_KERNEL)
_SOURCE_FLAGS = np.array(SOURCE_FLAGS, np.uint8)
_SOURCE_BY_KERNEL = np.array((SOURCE_USER, SOURCE_KERNEL), np.uint8)  # [kernel stamps used]

# Row kinds and follow-up sources of the native REPLY_DTYPE (detnet.native's KIND_* and
# FOLLOWUP_*; tests/unit/test_recorder.py holds them equal).
KIND_REPLY, KIND_REPLY_2STEP, KIND_FOLLOWUP, KIND_ECHO = 0, 1, 2, 3
FOLLOWUP_NONE, FOLLOWUP_KERNEL = 0, 1

# A two-step reply waits for its reflector TX stamp at most this long past the wait the
# prober asked the reflector for (a follow-up lost on the way); then it is recorded
# one-step. Stamps that overtake their reply (reordering) wait in a table this big.
SETTLE_MARGIN_NS = 50_000_000
MAX_EARLY_STAMPS = 256
LOST_STAMP = -1  # in that table: the reflector said it has no stamp for this reply
# Batches of two-step rows at least this long take the vectorised path; below it numpy's
# per-call overhead costs more than the rows one at a time.
VECTOR_MIN_ROWS = 16


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
    kind: int = KIND_REPLY  # KIND_*: one-step, two-step, follow-up or echo
    followup_source: int = FOLLOWUP_NONE  # FOLLOWUP_*: a reflector TX stamp in this row
    followup_seq: int = 0  # ... for this probe
    refl_tx_kernel_ns: int = 0  # ... its kernel TX stamp (0 with FOLLOWUP_LOST)
    rx_hw_ns: int = 0  # raw hardware RX stamp


# The native REPLY_DTYPE field behind each field of Reply, in Reply's order (the override
# has none: it comes from TCP_INFO).
NATIVE_FIELDS: tuple[str, ...] = ("seq", "user_rx_ns", "kernel_rx_ns", "refl_rx_ns", "refl_tx_ns")
NATIVE_TWO_STEP_FIELDS: tuple[str, ...] = (
    "kind",
    "followup_source",
    "followup_seq",
    "refl_tx_kernel_ns",
    "hw_rx_ns",
)


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
        """A native ``REPLY_DTYPE`` array (views, no copies) of one-step replies: the
        two-step fields are not read (``record_native`` sends other rows elsewhere)."""
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
    foreign: int = 0  # datagrams or frames that were neither our replies nor an echo


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
        self.foreign = 0  # replies that are not ours (nor an echo), counted by the prober
        # Two-step replies waiting for their stamp, by tracker slot (the tracker's send
        # stamps stay there until the slot is reused, which settles them first): due time
        # (0: none waiting), what the reply carried, flags gathered meanwhile. Stamps that
        # came before their reply wait in a small table. The prober sets settle_ns from
        # the wait it asked for.
        self.settle_ns = SETTLE_MARGIN_NS
        cap = self.tracker.capacity
        self._aw_due = np.zeros(cap, np.int64)
        self._aw = np.zeros((5, cap), np.int64)  # rx_user, rx_kernel, rx_hw, refl_rx, refl_tx
        self._aw_flags = np.zeros(cap, np.uint8)
        self._awaiting = 0
        self._next_due = 0  # the earliest due time among the waiting (0: none)
        self._early: dict[int, int] = {}
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
            foreign=self.foreign,
        )

    @property
    def awaiting_stamps(self) -> int:
        """Two-step replies waiting for their reflector TX stamp."""
        return self._awaiting

    # --- sending and losses -------------------------------------------------------------
    def on_sent(
        self,
        *,
        now_ns: int,
        offset_ns: int,
        user_tx_ns: I64,
        kernel_tx_ns: I64,
        hw_tx_ns: I64 | None = None,
    ) -> None:
        """Record probes ``next_seq ..`` as sent at ``now_ns`` (their TX stamps; kernel and
        hardware 0 where there is none), first finishing the oldest ones if their slots
        are needed."""
        n = int(user_tx_ns.shape[0])
        self.sweep(now_ns, reserve=n)
        if self._awaiting:
            tr = self.tracker
            reused = (tr.next_seq + np.arange(n, dtype=np.int64)) & (tr.capacity - 1)
            waiting = reused[self._aw_due[reused] != 0]
            if waiting.shape[0]:
                self._write_awaited(now_ns, waiting, np.zeros(waiting.shape[0], np.int64))
        self.tracker.on_sent(
            first_seq=self.tracker.next_seq,
            user_tx_ns=user_tx_ns,
            kernel_tx_ns=kernel_tx_ns,
            hw_tx_ns=hw_tx_ns,
            deadline_ns=now_ns + self.timeout_ns,
            offset_ns=offset_ns,
        )

    def on_late_tx(self, stamps: npt.NDArray[np.void]) -> int:
        """TX stamps that came after their send returned (native ``SENT_DTYPE`` rows from
        ``take_tx_stamps()``); return how many belonged to probes still in flight."""
        late_tx = self.tracker.late_tx
        return sum(
            late_tx(int(seq), kernel_tx_ns=int(k), hw_tx_ns=int(h))
            for seq, k, h in zip(
                stamps["seq"].tolist(),
                stamps["kernel_tx_ns"].tolist(),
                stamps["hw_tx_ns"].tolist(),
                strict=True,
            )
        )

    def sweep(self, now_ns: int, *, reserve: int = 0) -> None:
        """Record every probe past its deadline as lost (and the oldest ones when
        ``reserve`` new probes need their slots); two-step replies whose stamp is overdue
        are recorded one-step."""
        self._record_lost(now_ns, self.tracker.expire(now_ns, reserve=reserve))
        if self._awaiting and now_ns >= self._next_due:
            due = self._aw_due
            slots = np.flatnonzero((due != 0) & (due <= now_ns))
            # In arrival order (the order their records would have had).
            slots = slots[np.lexsort((self.tracker.seq[slots], due[slots]))]
            self._write_awaited(now_ns, slots, np.zeros(slots.shape[0], np.int64))
            rest = due[due != 0]
            self._next_due = int(rest.min()) if rest.shape[0] else 0

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
        """Record a native ``REPLY_DTYPE`` batch. Batches of one-step replies, and long
        ones of two-step replies and follow-ups, take vectorised paths; one reply, short
        two-step batches and batches with echoes or hardware stamps take the scalar one,
        row by row."""
        n = replies.shape[0]
        if n != 1:
            kind = replies["kind"]
            if not kind.any() and not replies["followup_source"].any():
                if not replies["hw_rx_ns"].any():
                    self.record_replies(
                        Replies.from_native(replies), now_ns=now_ns, offset_now_ns=offset_now_ns
                    )
                    return
            elif (
                n >= VECTOR_MIN_ROWS
                and not self._early
                and not (kind == KIND_ECHO).any()
                and not replies["hw_rx_ns"].any()
            ):
                self._record_two_step(replies, now_ns=now_ns, offset_now_ns=offset_now_ns)
                return
        if replies.dtype is not self._native_dtype:
            names = replies.dtype.names or ()
            fields = NATIVE_FIELDS + NATIVE_TWO_STEP_FIELDS
            self._native_pick = operator.itemgetter(*(names.index(f) for f in fields))
            self._native_dtype = replies.dtype
        # One tolist() gives every field as a Python int: ten field reads per row would
        # cost twenty times as much, more than all the arithmetic.
        self.sweep(now_ns)  # once for the batch: the rows share the time
        pick, take = self._native_pick, self._take_one
        for row in replies.tolist():
            seq, rx_user, rx_kernel, refl_rx, refl_tx, *rest = pick(row)
            take(now_ns, offset_now_ns, seq, rx_user, rx_kernel, refl_rx, refl_tx, None, *rest)

    def _record_two_step(self, r: npt.NDArray[np.void], *, now_ns: int, offset_now_ns: int) -> None:
        """A batch of one- and two-step replies and follow-ups, vectorised: the replies
        first (one-step ones recorded, two-step ones waiting), then every stamp the batch
        carries. The records are those of the rows one at a time; within the batch their
        order may differ (a stamp that follows its reply in the same batch)."""
        self.sweep(now_ns)
        tr = self.tracker
        kind = r["kind"]
        rows = r[kind != KIND_FOLLOWUP]
        if rows.shape[0]:
            batch = Replies.from_native(rows)
            cls = tr.on_replies(batch.seq)
            got = cls.received.copy()
            slots = cls.slots[got]
            step = np.abs(tr.offset_ns[slots] - offset_now_ns) > CLOCK_STEP_NS
            if np.any(step):
                tr.drop(slots[step])
                got[got] = ~step
                slots = slots[~step]
            two = rows["kind"][got] == KIND_REPLY_2STEP
            if not two.all():
                one = got.copy()
                one[got] = ~two
                self._write(now_ns, slots[~two], batch.take(one), cls.reordered[one])
            if two.any():
                wait = got.copy()
                wait[got] = two
                self._await(now_ns, slots[two], batch.take(wait), cls.reordered[wait])
            if np.any(cls.duplicate | cls.late):
                self._flag_or_await(cls.slots[cls.duplicate], FLAG_DUP)
                seq = batch.seq.astype(np.int64, copy=False)
                known = cls.late & (tr.seq[cls.slots] == seq)
                self._flag_or_await(cls.slots[known], FLAG_LATE)
        src = r["followup_source"]
        has = src != FOLLOWUP_NONE
        if has.any():
            fseq = r["followup_seq"][has].astype(np.int64)
            stamp = np.where(src[has] == FOLLOWUP_KERNEL, r["refl_tx_kernel_ns"][has], 0)
            slot = fseq & (tr.capacity - 1)
            mine = (self._aw_due[slot] != 0) & (tr.seq[slot] == fseq)
            if not mine.all():
                for q, t in zip(fseq[~mine].tolist(), stamp[~mine].tolist(), strict=True):
                    self._on_stamp(now_ns, q, t)  # overtaking or unknown: the scalar rule
            if mine.any():
                # A stamp reported twice (a retransmitted follow-up) counts once.
                first = np.unique(slot[mine], return_index=True)[1]
                take = np.sort(first)
                self._write_awaited(now_ns, slot[mine][take], stamp[mine][take])

    def _await(
        self, now_ns: int, slots: I64, got: Replies, reordered: npt.NDArray[np.bool_]
    ) -> None:
        """Two-step replies (their slots) wait for their stamps."""
        aw = self._aw
        aw[0, slots] = got.rx_user_ns
        aw[1, slots] = got.rx_kernel_ns
        aw[2, slots] = 0
        aw[3, slots] = got.refl_rx_ns
        aw[4, slots] = got.refl_tx_ns
        self._aw_flags[slots] = np.where(reordered, FLAG_REORDERED, 0)
        due = now_ns + self.settle_ns
        self._aw_due[slots] = due
        if not self._awaiting:
            self._next_due = due
        self._awaiting += int(slots.shape[0])

    def _flag_or_await(self, slots: I64, flag: int) -> None:
        waiting = self._aw_due[slots] != 0
        if waiting.any():
            self._aw_flags[slots[waiting]] |= flag
        self._flag(slots[~waiting], flag)

    def _write_awaited(self, now_ns: int, slots: I64, stamps: I64) -> None:
        """Record waiting two-step replies: with the reflector's kernel TX stamp, or
        one-step where it is 0 (lost, or not in time)."""
        n = int(slots.shape[0])
        if n == 0:
            return
        tr, aw = self.tracker, self._aw
        self._aw_due[slots] = 0
        self._awaiting -= n
        flags = self._aw_flags[slots]
        if n == 1 or aw[2, slots].any():  # one (numpy costs more), or hardware stamps
            for slot, stamp, extra in zip(
                slots.tolist(), stamps.tolist(), flags.tolist(), strict=True
            ):
                rx_user, rx_kernel, rx_hw, refl_rx, refl_tx = aw[:, slot].tolist()
                self._write_one(
                    now_ns, int(tr.seq[slot]), slot, int(tr.user_tx_ns[slot]),
                    int(tr.kernel_tx_ns[slot]), int(tr.hw_tx_ns[slot]), rx_user, rx_kernel,
                    rx_hw, refl_rx, stamp or refl_tx, None, extra,
                    SOURCE_KERNEL_2STEP if stamp else SOURCE_KERNEL,
                )  # fmt: skip
            return
        got = Replies(
            seq=tr.seq[slots],
            rx_user_ns=aw[0, slots],
            rx_kernel_ns=aw[1, slots],
            refl_rx_ns=aw[3, slots],
            refl_tx_ns=np.where(stamps != 0, stamps, aw[4, slots]),
        )
        kernel_source = np.where(stamps != 0, SOURCE_KERNEL_2STEP, SOURCE_KERNEL).astype(np.uint8)
        self._write(now_ns, slots, got, None, extra_flags=flags, kernel_source=kernel_source)

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
        self,
        now_ns: int,
        slots: I64,
        got: Replies,
        reordered: npt.NDArray[np.bool_] | None,
        *,
        extra_flags: U8 | None = None,
        kernel_source: U8 | None = None,
    ) -> None:
        tr = self.tracker
        user_tx = tr.user_tx_ns[slots]
        d = delays(user_tx_ns=user_tx, kernel_tx_ns=tr.kernel_tx_ns[slots], replies=got)
        source = d.source
        if kernel_source is not None:  # which kernel source: one-step, two-step
            source = np.where(source == SOURCE_KERNEL, kernel_source, source)
        # Table lookups and in-place ORs on uint8: np.where with scalars costs more here.
        flags = _SOURCE_FLAGS.take(source)
        flags |= FLAG_RECEIVED
        if reordered is not None:
            flags[reordered] |= FLAG_REORDERED
        if extra_flags is not None:
            flags |= extra_flags
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
        self._source = int(source[-1])
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
                        SOURCE_NAMES[source[i]],
                    )
                )

    def record_reply(self, reply: Reply, *, now_ns: int, offset_now_ns: int) -> None:
        """Scalar twin of ``record_replies`` for one reply: the same records, on Python ints.
        Also takes what the batch path does not: two-step replies, follow-ups, echoes."""
        self.sweep(now_ns)
        self._take_one(now_ns, offset_now_ns, *reply)

    def _take_one(  # positional parameters on purpose: the per-reply hot path
        self,
        now_ns: int,
        offset_now_ns: int,
        seq: int,
        rx_user: int,
        rx_kernel: int,
        refl_rx: int,
        refl_tx: int,
        override: int | None,
        kind: int = KIND_REPLY,
        followup_source: int = FOLLOWUP_NONE,
        followup_seq: int = 0,
        refl_tx_kernel: int = 0,
        rx_hw: int = 0,
    ) -> None:
        """One reply (``Reply``'s fields in order), the overdue probes already swept."""
        if followup_source != FOLLOWUP_NONE:
            # The stamp of an earlier reply first: that reply's record comes before ours.
            stamp = refl_tx_kernel if followup_source == FOLLOWUP_KERNEL else 0
            self._on_stamp(now_ns, followup_seq, stamp)
        if kind == KIND_FOLLOWUP:
            return
        tr = self.tracker
        outcome = tr.on_reply(seq)
        slot = seq & (tr.capacity - 1)
        if outcome in (DUPLICATE, LATE):
            if int(tr.seq[slot]) == seq:
                flag = FLAG_DUP if outcome == DUPLICATE else FLAG_LATE
                pos = int(tr.ring_pos[slot])
                if pos >= 0:
                    self.ring.set_flags(np.array([pos]), flag)
                elif self._aw_due[slot]:
                    self._aw_flags[slot] |= flag
            return
        if abs(int(tr.offset_ns[slot]) - offset_now_ns) > CLOCK_STEP_NS:
            tr.drop(slot)
            return
        user_tx = int(tr.user_tx_ns[slot])
        kernel_tx = int(tr.kernel_tx_ns[slot])
        hw_tx = int(tr.hw_tx_ns[slot])
        flags = FLAG_REORDERED if outcome == REORDERED else 0
        if kind == KIND_REPLY_2STEP:
            stamp = self._early.pop(seq, 0)
            if stamp:  # it came first: the stamp, or LOST_STAMP (record one-step now)
                lost = stamp == LOST_STAMP
                self._write_one(
                    now_ns, seq, slot, user_tx, kernel_tx, hw_tx, rx_user, rx_kernel, rx_hw,
                    refl_rx, refl_tx if lost else stamp, None, flags,
                    SOURCE_KERNEL if lost else SOURCE_KERNEL_2STEP,
                )  # fmt: skip
                return
            aw = self._aw
            aw[0, slot], aw[1, slot], aw[2, slot] = rx_user, rx_kernel, rx_hw
            aw[3, slot], aw[4, slot] = refl_rx, refl_tx
            self._aw_flags[slot] = flags
            due = now_ns + self.settle_ns
            self._aw_due[slot] = due
            if not self._awaiting:
                self._next_due = due
            self._awaiting += 1
            return
        self._write_one(
            now_ns, seq, slot, user_tx, kernel_tx, hw_tx, rx_user, rx_kernel, rx_hw,
            refl_rx, refl_tx, override, flags,
            SOURCE_KERNEL_ECHO if kind == KIND_ECHO else SOURCE_KERNEL,
        )  # fmt: skip

    def _on_stamp(self, now_ns: int, seq: int, stamp: int) -> None:
        """The reflector's kernel TX stamp of reply ``seq`` (0: it has none)."""
        tr = self.tracker
        slot = seq & (tr.capacity - 1)
        if int(tr.seq[slot]) != seq:
            return
        if self._aw_due[slot]:
            self._write_awaited(now_ns, np.array([slot]), np.array([stamp], np.int64))
        elif tr.ring_pos[slot] < 0:
            # Overtook its reply (reordering); a stamp for a reply that was lost stays here
            # until the table is full. The first report counts, as for a reply that waits
            # (and as the vectorised path counts a batch's stamps).
            early = self._early
            early.setdefault(seq, stamp or LOST_STAMP)
            if len(early) > MAX_EARLY_STAMPS:
                del early[next(iter(early))]

    def _write_one(  # positional parameters on purpose: the per-reply hot path
        self,
        now_ns: int,
        seq: int,
        slot: int,
        user_tx: int,
        kernel_tx: int,
        hw_tx: int,
        rx_user: int,
        rx_kernel: int,
        rx_hw: int,
        refl_rx: int,
        refl_tx: int,
        override: int | None,
        flags: int,
        kernel_source: int,
    ) -> None:
        # The arithmetic of delays(), inline, extended by the stamps only this path sees.
        has_refl = refl_rx != 0 and refl_tx != 0
        turn = refl_tx - refl_rx if has_refl else 0
        kernel = kernel_tx != 0 and rx_kernel != 0
        tx = kernel_tx if kernel else user_tx
        rx = rx_kernel if kernel else rx_user
        source = kernel_source if kernel else SOURCE_USER
        rtt = rx - tx - turn
        if rx_hw and hw_tx:
            # The NIC's clock on both ends: never mixed with software stamps, and the
            # one-way delays (which compare with the reflector's clock) stay software.
            rtt = rx_hw - hw_tx - turn
            source = SOURCE_HARDWARE
        user_rtt = rx_user - user_tx - turn
        if override is not None:
            kernel = override > 0
            rtt = override if kernel else user_rtt
            source = SOURCE_KERNEL if kernel else SOURCE_USER
        fwd = float(refl_rx - tx) if has_refl else math.nan
        back = float(rx - refl_tx) if has_refl else math.nan
        flags |= FLAG_RECEIVED | SOURCE_FLAGS[source]
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
        tr = self.tracker
        if int(tr.seq[slot]) == seq:
            tr.ring_pos[slot] = pos
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
