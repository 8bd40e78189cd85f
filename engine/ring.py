"""Fixed-capacity numpy ring buffers holding one record per finished probe.

A record is written when a probe finishes: its reply arrived in time (received) or its
timeout passed (lost). Records are in completion order, so the completion time ``t_ns``
(CLOCK_MONOTONIC) never decreases along the ring and a time window is a binary search.
Duplicate and late replies later set flags on the record they belong to. The event loop
writes, the HTTP thread reads: both go through one lock, and readers get a copy
(``snapshot``) to compute on.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Record flags (bit set).
FLAG_RECEIVED = 0x01  # the reply came in time; the delay fields are valid
FLAG_LOST = 0x02  # no reply by the timeout
FLAG_LATE = 0x04  # a reply came after the timeout (the record stays lost)
FLAG_DUP = 0x08  # at least one duplicate reply came
FLAG_REORDERED = 0x10  # the reply came after a reply of a later probe
FLAG_KERNEL = 0x20  # the RTT comes from kernel timestamps (else user space)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class RingSnapshot:
    """A copy of the newest records, oldest first. Delays are float ns, NaN where absent."""

    t_ns: I64  # completion time, CLOCK_MONOTONIC
    sent_ns: I64  # send time, CLOCK_REALTIME (user-space stamp)
    seq: I64
    rtt_ns: F64  # network RTT the statistics use
    user_rtt_ns: F64  # the same RTT from user-space stamps
    fwd_ns: F64  # reflector RX - sender TX (includes the clock offset)
    back_ns: F64  # sender RX - reflector TX (includes the clock offset)
    flags: U8

    def __len__(self) -> int:
        return int(self.seq.shape[0])


class RttRing:
    """A ring of probe records with ``capacity`` slots (the oldest are overwritten)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError("ring capacity must be at least 2")
        self.capacity = capacity
        self._t = np.zeros(capacity, np.int64)
        self._sent = np.zeros(capacity, np.int64)
        self._seq = np.zeros(capacity, np.int64)
        self._rtt = np.full(capacity, np.nan)
        self._urtt = np.full(capacity, np.nan)
        self._fwd = np.full(capacity, np.nan)
        self._back = np.full(capacity, np.nan)
        self._flags = np.zeros(capacity, np.uint8)
        self._total = 0  # records ever written; the next record's absolute position
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """How many records were ever written (absolute position of the next one)."""
        return self._total

    def __len__(self) -> int:
        return min(self._total, self.capacity)

    def append(
        self,
        *,
        t_ns: int | I64,
        sent_ns: I64,
        seq: I64,
        rtt_ns: F64,
        user_rtt_ns: F64,
        fwd_ns: F64,
        back_ns: F64,
        flags: U8 | int,
    ) -> int:
        """Write ``len(seq)`` records (vectorised); return the absolute position of the first."""
        n = int(seq.shape[0])
        if n == 0:
            return self._total
        if n > self.capacity:
            # Only the newest ``capacity`` records can survive anyway.
            cut = n - self.capacity
            with self._lock:
                self._total += cut
            return (
                self.append(
                    t_ns=t_ns if isinstance(t_ns, int) else t_ns[cut:],
                    sent_ns=sent_ns[cut:],
                    seq=seq[cut:],
                    rtt_ns=rtt_ns[cut:],
                    user_rtt_ns=user_rtt_ns[cut:],
                    fwd_ns=fwd_ns[cut:],
                    back_ns=back_ns[cut:],
                    flags=flags if isinstance(flags, int) else flags[cut:],
                )
                - cut
            )
        with self._lock:
            first = self._total
            start = first % self.capacity
            end = start + n
            if end <= self.capacity:
                idx: slice | npt.NDArray[np.int64] = slice(start, end)
            else:
                idx = np.arange(start, end, dtype=np.int64) % self.capacity
            self._t[idx] = t_ns
            self._sent[idx] = sent_ns
            self._seq[idx] = seq
            self._rtt[idx] = rtt_ns
            self._urtt[idx] = user_rtt_ns
            self._fwd[idx] = fwd_ns
            self._back[idx] = back_ns
            self._flags[idx] = flags
            self._total = first + n
        return first

    def append_one(
        self,
        *,
        t_ns: int,
        sent_ns: int,
        seq: int,
        rtt_ns: float,
        user_rtt_ns: float,
        fwd_ns: float,
        back_ns: float,
        flags: int,
    ) -> int:
        """Write one record without building arrays; return its absolute position."""
        with self._lock:
            pos = self._total
            i = pos % self.capacity
            self._t[i] = t_ns
            self._sent[i] = sent_ns
            self._seq[i] = seq
            self._rtt[i] = rtt_ns
            self._urtt[i] = user_rtt_ns
            self._fwd[i] = fwd_ns
            self._back[i] = back_ns
            self._flags[i] = flags
            self._total = pos + 1
        return pos

    def set_flags(self, positions: I64, flags: int) -> None:
        """OR ``flags`` into the records at absolute ``positions`` still in the ring."""
        if positions.shape[0] == 0:
            return
        with self._lock:
            live = positions[(positions >= self._total - self.capacity) & (positions >= 0)]
            self._flags[live % self.capacity] |= np.uint8(flags)

    def snapshot(self, *, last_n: int | None = None, since_ns: int | None = None) -> RingSnapshot:
        """Copy the newest records: at most ``last_n``, and only those completed at or
        after ``since_ns`` (CLOCK_MONOTONIC); oldest first."""
        with self._lock:
            count = min(self._total, self.capacity)
            if last_n is not None:
                count = min(count, max(last_n, 0))
            if since_ns is not None and count:
                count -= self._older_than(count, since_ns)
            order = self._order(count)
            return RingSnapshot(
                t_ns=self._t[order],
                sent_ns=self._sent[order],
                seq=self._seq[order],
                rtt_ns=self._rtt[order],
                user_rtt_ns=self._urtt[order],
                fwd_ns=self._fwd[order],
                back_ns=self._back[order],
                flags=self._flags[order],
            )

    def _older_than(self, count: int, since_ns: int) -> int:
        """How many of the newest ``count`` records completed before ``since_ns``: a binary
        search of the ring's two sorted runs in place, no copy of the ring (a short recent
        window of a full ring costs microseconds, not a copy of every record)."""
        start = (self._total - count) % self.capacity
        first = self._t[start : min(start + count, self.capacity)]
        if first.shape[0] and since_ns <= first[-1]:
            return int(np.searchsorted(first, since_ns, side="left"))
        wrapped = self._t[: max(start + count - self.capacity, 0)]
        return first.shape[0] + int(np.searchsorted(wrapped, since_ns, side="left"))

    def _order(self, count: int) -> npt.NDArray[np.int64]:
        """Ring indices of the newest ``count`` records, oldest first."""
        start = self._total - count
        return np.arange(start, self._total, dtype=np.int64) % self.capacity


# Histogram edges (seconds) for RTTs: sub-millisecond resolution from 10 us up to 1 s.
RTT_EDGES_S: tuple[float, ...] = (
    10e-6, 20e-6, 30e-6, 50e-6, 75e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6, 750e-6,
    1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3, 1.0,
)  # fmt: skip
# Edges for the engine's send lateness: from 1 us (a prompt timer) to 1 s.
LATENESS_EDGES_S: tuple[float, ...] = (
    1e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative bucket counts (one per edge, then +Inf), and the sum in seconds."""

    edges_s: tuple[float, ...]
    cumulative: tuple[int, ...]  # len(edges_s) + 1, the last is the total count
    sum_s: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class CumulativeHistogram:
    """Prometheus-style histogram of ns values: counts only grow, so exported cumulative
    buckets never decrease. Values are bucketed with np.searchsorted as they arrive."""

    def __init__(self, edges_s: tuple[float, ...]) -> None:
        self.edges_s = edges_s
        # le buckets: value v falls in the first bucket whose edge is >= v.
        self._edges_list = [round(e * 1e9) for e in edges_s]
        self._edges_ns = np.array(self._edges_list, np.float64)
        self._counts = np.zeros(len(edges_s) + 1, np.int64)
        self._sum_ns = 0.0
        self._lock = threading.Lock()

    def add(self, values_ns: F64 | I64) -> None:
        """Count a batch of values (ns)."""
        if values_ns.shape[0] == 0:
            return
        idx = np.searchsorted(self._edges_ns, values_ns, side="left")
        add = np.bincount(idx, minlength=self._counts.shape[0])
        total = float(np.sum(values_ns))
        with self._lock:
            self._counts += add
            self._sum_ns += total

    def add_one(self, value_ns: int) -> None:
        """Count one value (ns) without building an array."""
        i = bisect.bisect_left(self._edges_list, value_ns)
        with self._lock:
            self._counts[i] += 1
            self._sum_ns += value_ns

    def snapshot(self) -> HistogramSnapshot:
        """A consistent copy, with cumulative counts."""
        with self._lock:
            cum = np.cumsum(self._counts)
            total = self._sum_ns
        return HistogramSnapshot(self.edges_s, tuple(int(c) for c in cum), total / 1e9)
