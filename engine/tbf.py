"""The burst of a tbf (token bucket filter) qdisc: one formula for every tbf detnet sets.

The tc enforcer (``controller/enforce/tc.py``) shapes best-effort workloads with it, and
the lab shapes its bottleneck and its Cilium stand-in's pods (``lab/topology.py``,
``lab/kubepods.py``) with it. It lives in the engine because that is the lowest layer
both may import: the lab must not import ``detnet.controller``, and the native core is
for the per-packet hot path. Pure arithmetic, no I/O.
"""

from __future__ import annotations

MIN_BURST_BYTES = 15_140  # 10 full-size Ethernet frames


def tbf_burst_bytes(mbps: float) -> int:
    """A bucket of ~1 ms at ``mbps`` Mbit/s, never below 10 full-size frames.

    Smaller buckets starve a high-rate shaper between timer ticks; larger ones let a
    best-effort pod dump a burst into the shared bottleneck at line rate."""
    return max(MIN_BURST_BYTES, int(mbps * 125))  # mbps * 1e6 / 8 bytes/s * 1 ms
