"""A tbf (token bucket filter) qdisc's burst, and when a new one may replace it in place:
one rule for every tbf detnet sets.

The tc enforcer (``controller/enforce/tc.py``) shapes best-effort workloads with it, and
the lab shapes its bottleneck and its Cilium stand-in's pods (``lab/topology.py``,
``lab/kubepods.py``) with it. It lives in the engine because that is the lowest layer
both may import: the lab must not import ``detnet.controller``, and the native core is
for the per-packet hot path. Pure arithmetic, no I/O.
"""

from __future__ import annotations

import math
from typing import NamedTuple

MIN_BURST_BYTES = 15_140  # 10 full-size Ethernet frames
FRAME_BYTES = 1_514


def tbf_burst_bytes(mbps: float) -> int:
    """A bucket of ~1 ms at ``mbps`` Mbit/s, never below 10 full-size frames.

    Smaller buckets starve a high-rate shaper between timer ticks; larger ones let a
    best-effort pod dump a burst into the shared bottleneck at line rate."""
    return max(MIN_BURST_BYTES, int(mbps * 125))  # mbps * 1e6 / 8 bytes/s * 1 ms


def tbf_bucket_bytes(rate_bytes_per_s: int, buffer_ticks: int) -> int:
    """The bytes a present tbf's bucket holds, from its netlink parameters: the kernel
    keeps the bucket as a time, ``buffer`` in 64 ns ticks (PSCHED_SHIFT), at ``rate``."""
    return (buffer_ticks << 6) * rate_bytes_per_s // 1_000_000_000


class TbfPlan(NamedTuple):
    """How to set a tbf: the burst to give it, and whether the present tbf may take it
    in place (``tc qdisc change``) or must be replaced by a fresh one."""

    burst: int
    in_place: bool


def tbf_plan(mbps: float, burst: int, held: int | None) -> TbfPlan:
    """Set a tbf to ``mbps`` with a bucket of ``burst`` bytes where the present one holds
    ``held`` bytes (None: no tbf there).

    A tbf changed in place keeps its queue, and the kernel sends a packet only once the
    bucket holds all of it (``tbf_dequeue``); it splits a GSO packet only on its way in,
    at the bucket it had then. So a packet queued under a bigger bucket than the new one
    blocks the queue for good: in the lab, cuts from 346 to 269 Mbit/s (43 to 34 kB)
    stopped a pod's TCP flows for the rest of the run, one cut in about eight. In place,
    then, only when the new bucket holds at least what the old one did, after the
    rounding on its way to the kernel (``tc`` and pyroute2 turn the burst into whole
    microseconds, then ticks: less than two microseconds' bytes at the rate). A burst
    short of that by a frame or less (a constant burst at a new rate) is raised to it; a
    bucket that truly shrinks takes a fresh tbf, whose queue starts empty (the packets
    queued in the old one are dropped)."""
    if held is None:
        return TbfPlan(burst, in_place=False)
    need = held + math.ceil(mbps / 4) + 1  # two microseconds at mbps / 8 bytes each
    if burst >= need:
        return TbfPlan(burst, in_place=True)
    if need - burst <= FRAME_BYTES:
        return TbfPlan(need, in_place=True)
    return TbfPlan(burst, in_place=False)
