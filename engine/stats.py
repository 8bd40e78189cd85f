"""Window statistics over a target's ring buffers (the controller decides on these).

``WindowStats`` is the contract with the controller. The rest is sans-I/O: numpy over a
``RingSnapshot`` (a copy of a ring), so it is safe to call from any thread. Every quantile
equals numpy's default ``np.percentile`` (method "linear") on the same samples.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from detnet.engine.ring import (
    FLAG_DUP,
    FLAG_KERNEL,
    FLAG_LOST,
    FLAG_RECEIVED,
    FLAG_REORDERED,
    RingSnapshot,
)


@dataclass(frozen=True, kw_only=True)
class WindowStats:
    """Statistics of one target over its window. Times in ns; None where there is no data."""

    target: str
    protocol: str
    timestamp_source: str  # what the latest samples used (recorder.SOURCE_NAMES)
    sent: int  # probes whose reply was due inside the window
    received: int
    lost: int
    duplicates: int
    reordered: int
    loss_ratio: float | None
    rtt_min_ns: float | None
    rtt_p50_ns: float | None
    rtt_p90_ns: float | None
    rtt_p99_ns: float | None
    rtt_max_ns: float | None
    jitter_iqr_ns: float | None  # Q3 - Q1 of RTT: the prototype's "jitter"
    jitter_rfc3550_ns: float | None
    ipdv_fwd_p50_ns: float | None
    ipdv_fwd_p99_ns: float | None
    ipdv_back_p50_ns: float | None
    ipdv_back_p99_ns: float | None
    base_rtt_ns: float | None
    queue_delay_ns: float | None  # p90 RTT minus base RTT


# --- computation -----------------------------------------------------------------------
# Everything below is sans-I/O: it works on a RingSnapshot (a copy), never on live rings.


F64 = npt.NDArray[np.float64]

# RFC 3550's gain is 1/16; terms older than this many samples weigh < 1e-28 and are dropped.
_RFC3550_TERMS = 1024


def percentiles(values: npt.ArrayLike, qs: Sequence[float]) -> F64:
    """Percentiles ``qs`` (0..100) of ``values``, equal to ``np.percentile(values, qs)``
    (method "linear"), read at the neighbouring ranks after one sort (small inputs) or one
    ``np.partition`` (large ones).

    Raises ValueError on an empty input.
    """
    arr = np.array(values, dtype=np.float64)  # a copy: sort and partition work in place
    n = arr.shape[0]
    if n == 0:
        raise ValueError("percentiles of an empty sample")
    lower, upper, gamma, high, kth = _ranks(n, tuple(float(q) for q in qs))
    # Both leave the same values at the ranks read; for a window's few hundred samples
    # one sort is cheaper than finding the distinct ranks to partition at.
    if n <= _SORT_BELOW:
        arr.sort()
    else:
        arr.partition(kth)
    a = arr[lower]
    b = arr[upper]
    diff = b - a
    out = a + diff * gamma
    out[high] = (b - diff * (1 - gamma))[high]
    return out


_SORT_BELOW = 1024


@functools.lru_cache(maxsize=256)
def _ranks(
    n: int, qs: tuple[float, ...]
) -> tuple[
    npt.NDArray[np.intp], npt.NDArray[np.intp], F64, npt.NDArray[np.bool_], npt.NDArray[np.intp]
]:
    """The ranks and weights of ``qs`` in ``n`` samples: numpy's linear-method arithmetic,
    step for step, so results are bit-identical (cached: windows repeat their sizes)."""
    quantiles = np.true_divide(np.asarray(qs, dtype=np.float64), 100)
    virtual = (n - 1) * quantiles
    lower = np.floor(virtual).astype(np.intp)
    upper = np.minimum(lower + 1, n - 1)
    gamma = virtual - lower
    kth = np.unique(np.concatenate((lower, upper)))
    high = gamma >= 0.5
    for a in (lower, upper, gamma, high, kth):
        a.flags.writeable = False  # shared by every caller through the cache
    return lower, upper, gamma, high, kth


def iqr(values: npt.ArrayLike) -> float:
    """Interquartile range (p75 - p25, numpy's linear percentiles): the prototype's jitter."""
    q1, q3 = percentiles(values, (25, 75))
    return float(q3 - q1)


def rfc3550_jitter(rtt_ns: npt.ArrayLike) -> float | None:
    """RFC 3550 interarrival jitter over RTTs in arrival order, starting from J=0.

    J += (|D| - J) / 16 for each consecutive pair, D being the RTT difference (for a round
    trip the difference of transit times is the difference of RTTs). Computed in closed
    form, J_n = sum (1/16)(15/16)^(n-k) |D_k|, with numpy. None with fewer than 2 samples.
    """
    x = np.asarray(rtt_ns, dtype=np.float64)
    if x.shape[0] < 2:
        return None
    d = np.abs(np.diff(x[-(_RFC3550_TERMS + 1) :]))
    weights = (15.0 / 16.0) ** np.arange(d.shape[0] - 1, -1, -1, dtype=np.float64) / 16.0
    return float(np.dot(weights, d))


def ipdv(delay_ns: npt.ArrayLike, seq: npt.ArrayLike) -> F64:
    """IPDV (RFC 3393/5481) of one direction: delay[i+1] - delay[i] over pairs of received
    probes with consecutive sequence numbers. A lost probe leaves a gap in the sequence,
    so no pair ever bridges a loss. NaN delays (no reflector stamps) are left out."""
    d = np.asarray(delay_ns, dtype=np.float64)
    s = np.asarray(seq, dtype=np.int64)
    keep = ~np.isnan(d)
    d, s = d[keep], s[keep]
    if s.shape[0] < 2:
        return np.empty(0, np.float64)
    if np.any(s[1:] <= s[:-1]):  # reordered arrivals: pair by sequence, not arrival
        order = np.argsort(s, kind="stable")
        d, s = d[order], s[order]
    pair = (s[1:] - s[:-1]) == 1
    return (d[1:] - d[:-1])[pair]


class BaseRttTracker:
    """Base RTT as LEDBAT keeps it: the minimum of per-interval minima over the last
    ``buckets`` intervals of ``bucket_ns`` (default 10 one-minute buckets). Sans-I/O."""

    def __init__(self, *, bucket_ns: int = 60_000_000_000, buckets: int = 10) -> None:
        self.bucket_ns = bucket_ns
        self._mins: deque[tuple[int, float]] = deque(maxlen=buckets)

    def update(self, now_ns: int, rtt_min_ns: float) -> None:
        """Fold in the minimum RTT of samples completed at ``now_ns`` (CLOCK_MONOTONIC)."""
        if math.isnan(rtt_min_ns):
            return
        bucket = now_ns // self.bucket_ns
        if self._mins and self._mins[-1][0] == bucket:
            if rtt_min_ns < self._mins[-1][1]:
                self._mins[-1] = (bucket, rtt_min_ns)
        else:
            self._mins.append((bucket, rtt_min_ns))

    def base(self, now_ns: int | None = None) -> float | None:
        """The base RTT, or None before any sample (or when every bucket is too old)."""
        if now_ns is None:
            mins = [m for _, m in self._mins]
        else:
            oldest = now_ns // self.bucket_ns - (self._mins.maxlen or 1) + 1
            mins = [m for b, m in self._mins if b >= oldest]
        return min(mins) if mins else None


def _opt(x: float | np.floating | None) -> float | None:
    return None if x is None else float(x)


def window_stats(
    snap: RingSnapshot,
    *,
    target: str,
    protocol: str,
    base_rtt_ns: float | None,
    default_source: str = "user",
) -> WindowStats:
    """Compute a target's WindowStats from a snapshot of its ring (the window)."""
    flags = snap.flags
    got = (flags & FLAG_RECEIVED) != 0
    received = int(np.count_nonzero(got))
    lost = int(np.count_nonzero(flags & FLAG_LOST))
    sent = received + lost
    rtt = snap.rtt_ns[got]
    seq = snap.seq[got]
    source = default_source
    if received:
        # The flag says kernel or user; the recorder's name says which kernel source.
        if not flags[got][-1] & FLAG_KERNEL:
            source = "user"
        elif default_source == "user":
            source = "kernel"
    q: list[float | None] = [None] * 5
    jitter_iqr: float | None = None
    if received:
        p = percentiles(rtt, (0, 25, 50, 75, 90, 99, 100))
        q = [float(p[0]), float(p[2]), float(p[4]), float(p[5]), float(p[6])]
        jitter_iqr = float(p[3] - p[1])
    fwd = ipdv(snap.fwd_ns[got], seq)
    back = ipdv(snap.back_ns[got], seq)
    fwd_q = percentiles(np.abs(fwd), (50, 99)) if fwd.shape[0] else None
    back_q = percentiles(np.abs(back), (50, 99)) if back.shape[0] else None
    if base_rtt_ns is not None and q[0] is not None:
        base_rtt_ns = min(base_rtt_ns, q[0])  # the tracker may lag the newest batch
    queue = None
    if base_rtt_ns is not None and q[2] is not None:
        queue = max(q[2] - base_rtt_ns, 0.0)
    return WindowStats(
        target=target,
        protocol=protocol,
        timestamp_source=source,
        sent=sent,
        received=received,
        lost=lost,
        duplicates=int(np.count_nonzero(flags & FLAG_DUP)),
        reordered=int(np.count_nonzero(flags & FLAG_REORDERED)),
        loss_ratio=(lost / sent) if sent else None,
        rtt_min_ns=q[0],
        rtt_p50_ns=q[1],
        rtt_p90_ns=q[2],
        rtt_p99_ns=q[3],
        rtt_max_ns=q[4],
        jitter_iqr_ns=jitter_iqr,
        jitter_rfc3550_ns=rfc3550_jitter(rtt),
        ipdv_fwd_p50_ns=None if fwd_q is None else _opt(fwd_q[0]),
        ipdv_fwd_p99_ns=None if fwd_q is None else _opt(fwd_q[1]),
        ipdv_back_p50_ns=None if back_q is None else _opt(back_q[0]),
        ipdv_back_p99_ns=None if back_q is None else _opt(back_q[1]),
        base_rtt_ns=base_rtt_ns,
        queue_delay_ns=queue,
    )
