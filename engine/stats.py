"""Window statistics over a target's ring buffers (the controller decides on these).

CONTRACT (filled in by the engine work): ``WindowStats`` is final; the computation is not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class WindowStats:
    """Statistics of one target over its window. Times in ns; None where there is no data."""

    target: str
    protocol: str
    timestamp_source: str  # "kernel" or "user": what the latest samples used
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
