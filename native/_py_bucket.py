"""The token bucket in pure Python (fallback of ``_bucket.pxi``), sans-I/O: time comes in.

``TokenBucket`` is the one token-bucket arithmetic of detnet: the reflectors' per-source
limits, the TCP reflector's frame limit (``engine/reflector.py``) and the Kubernetes
client's QPS limiter (``controller/kube/api.py``, an asyncio wrapper that sleeps
``wait_ns()``) all use it. ``SourceBuckets`` is the bounded per-source table of them.
The Cython twin does the same IEEE double operations in the same order, so both give
the same verdicts on the same arrivals (``tests/unit/test_native_parity.py``); its
table is a fixed C array (no Python object per packet), this one an LRU dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict

SOURCE_TABLE_SIZE = 4096  # sources with a bucket at once; the stalest is forgotten
_MAX_WAIT_NS = 1 << 53  # beyond this, ns stop being exact in a double


def check_bucket_args(*, rate: float, burst: float) -> None:
    """ValueError unless ``rate`` (tokens/s) > 0 and ``burst`` >= 1, both finite."""
    if not (0 < rate < math.inf and 1 <= burst < math.inf):
        raise ValueError(
            f"token bucket: rate must be > 0 and burst >= 1, got rate {rate}, burst {burst}"
        )


def check_source_args(*, rate_pps: float, burst: float) -> None:
    """ValueError unless ``rate_pps`` is 0 (unlimited) or a valid bucket rate."""
    if rate_pps == 0:
        return
    if not rate_pps > 0:
        raise ValueError(f"rate_pps {rate_pps} must be >= 0 (0 = unlimited)")
    check_bucket_args(rate=rate_pps, burst=burst)


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; full at ``now_ns``.

    Times are nanoseconds on one monotonic clock; a time earlier than the last one seen
    counts as no time passed. ``borrow()`` may leave the bucket in debt (below zero):
    later takers wait for the debt to be paid."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, *, rate: float, burst: float, now_ns: int) -> None:
        check_bucket_args(rate=rate, burst=burst)
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = self._burst
        self._last = int(now_ns)

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """The bucket's size."""
        return self._burst

    @property
    def tokens(self) -> float:
        """Tokens as of the last call (negative: in debt)."""
        return self._tokens

    def _refill(self, now_ns: int) -> None:
        if now_ns > self._last:
            self._tokens += (now_ns - self._last) * self._rate / 1e9
            if self._tokens > self._burst:
                self._tokens = self._burst
            self._last = now_ns

    def take(self, now_ns: int) -> bool:
        """Take one token if there is one; False (nothing taken) when there is not."""
        self._refill(now_ns)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def borrow(self, now_ns: int) -> None:
        """Take one token now, into debt if the bucket has none."""
        self._refill(now_ns)
        self._tokens -= 1.0

    def wait_ns(self, now_ns: int) -> int:
        """Nanoseconds from ``now_ns`` until ``take()`` succeeds (0: now)."""
        self._refill(now_ns)
        if self._tokens >= 1.0:
            return 0
        need = (1.0 - self._tokens) * 1e9 / self._rate
        if need >= _MAX_WAIT_NS:
            return _MAX_WAIT_NS
        wait = math.ceil(need)
        # Rounding may leave the refill a hair short of one token: wait that much longer.
        while self._tokens + wait * self._rate / 1e9 < 1.0:
            wait += 1
        return wait


class SourceBuckets:
    """A ``TokenBucket`` per source (an IP address as text) in a bounded table.

    ``rate_pps`` 0 means unlimited. A source seen for the first time gets a full bucket;
    with ``SOURCE_TABLE_SIZE`` sources present, the one seen longest ago is forgotten."""

    def __init__(self, *, rate_pps: float, burst: float) -> None:
        check_source_args(rate_pps=rate_pps, burst=burst)
        self._rate = float(rate_pps)
        self._burst = float(burst)
        self._table: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, source: str, now_ns: int) -> bool:
        """Take one token from ``source``'s bucket; False when it is empty."""
        if self._rate <= 0:
            return True
        bucket = self._table.pop(source, None)
        if bucket is None:
            bucket = TokenBucket(rate=self._rate, burst=self._burst, now_ns=now_ns)
        self._table[source] = bucket
        if len(self._table) > SOURCE_TABLE_SIZE:
            self._table.popitem(last=False)
        return bucket.take(now_ns)
