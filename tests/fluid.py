"""A fluid model of one congested node uplink, to run the policy closed-loop without I/O.

Every 10 ms: each best-effort workload sends ``min(cap, demand)``, where a new cap takes
effect ``actuation_s`` after the policy decided it; the uplink (a tbf of ``link_mbps``
with ``buffer_ms`` of queue) serves ``link_mbps``; the queue grows with the excess and
drops what overflows; a critical probe's RTT is the base RTT plus the queueing delay plus
a little noise; ``burstiness`` scatters each tick's sending rate around its mean (the
shapers' buckets, TCP's bursts), so the queue stirs before the mean reaches the link,
as a real one does. The real engine statistics (``window_stats``) and the real lab report
(``summarise_run``) are computed over the samples, so the figures mean what the lab's
do. It is a model: TCP's own dynamics, bursts from the pods' shapers and CPU noise are
not in it, so the lab, not this, is where figures are measured.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from detnet.controller.aimd import AsymmetricAimd, Observation, PolicyParams, Scope, Slo
from detnet.engine.ring import FLAG_KERNEL, FLAG_RECEIVED, RingSnapshot
from detnet.engine.stats import WindowStats, window_stats
from detnet.lab.report import RunData, Timeline, summarise_run

TICK_S = 0.01
Demand = Callable[[float], float]  # Mbit/s wanted at time t (math.inf: as much as allowed)


def steady(mbps: float = math.inf) -> Demand:
    """A bulk flow that takes whatever its cap allows (up to ``mbps``)."""
    return lambda t: mbps


def bursty(*, mbit_per_period: float, period_s: float = 1.0) -> Demand:
    """Uploads of ``mbit_per_period`` every period, sent as fast as allowed (the model
    tracks what is left of the period's upload)."""
    state = {"period": -1, "left": 0.0}

    def demand(t: float) -> float:
        k = int(t // period_s)
        if k != state["period"]:
            state["period"], state["left"] = k, mbit_per_period
        return math.inf if state["left"] > 0 else 0.0

    demand.state = state  # type: ignore[attr-defined]
    return demand


@dataclass
class FluidRun:
    """The recorded run: probe samples, goodput per second, the decisions."""

    data: RunData
    summary: dict[str, object]
    caps: list[tuple[float, float]] = field(default_factory=list)  # (t, sum of caps)


def run(
    *,
    params: PolicyParams,
    slo: Slo,
    demands: Mapping[str, Demand],
    timeline: Timeline,
    link_mbps: float | Callable[[float], float] = 100.0,
    buffer_ms: float = 30.0,
    base_rtt_ms: float = 0.03,
    noise_ms: float = 0.005,
    actuation_s: float = 0.1,
    control_s: float = 0.25,
    window_s: float = 5.0,
    seed: int = 1,
    burstiness: float = 0.05,
) -> FluidRun:
    """Run ``timeline`` with the policy in the loop; demands start with congestion."""
    rng = random.Random(seed)
    policy = AsymmetricAimd(params=params, slos=[slo], workloads={name: None for name in demands})
    limits: dict[Scope, int] = policy.initial_limits()
    pending: list[tuple[float, dict[Scope, int]]] = []
    applied = dict(limits)
    c_start, c_end = timeline.bounds("congestion")
    link = link_mbps if callable(link_mbps) else (lambda t, c=link_mbps: c)
    queue_mbit = 0.0
    t_s: list[float] = []
    rtt_ms: list[float] = []
    sent_mbit: dict[str, float] = dict.fromkeys(demands, 0.0)
    per_second: list[tuple[float, float]] = []
    second_mbit = 0.0
    decisions: list[dict[str, object]] = []
    caps: list[tuple[float, float]] = []
    next_control = 0.0
    steps = round(timeline.total_s / TICK_S)
    for i in range(steps):
        t = i * TICK_S
        while pending and pending[0][0] <= t:
            applied = pending.pop(0)[1]
        c = link(t)
        wants: dict[str, float] = {}
        for name, demand in demands.items():
            if c_start <= t < c_end:
                wants[name] = min(float(applied[Scope(name)]), demand(t))
                state = getattr(demand, "state", None)
                if state is not None:
                    wants[name] = min(wants[name], state["left"] / TICK_S)
        # TCP is ack-clocked: with a full buffer the senders together get the link, no more.
        room = c + (buffer_ms / 1e3 * c - queue_mbit) / TICK_S
        total = sum(wants.values())
        scale = min(1.0, room / total) if total > 0 else 1.0
        arrivals = 0.0
        for name, want in wants.items():
            rate = want * scale * max(0.0, rng.gauss(1.0, burstiness))
            state = getattr(demands[name], "state", None)
            if state is not None:
                state["left"] -= rate * TICK_S
            sent_mbit[name] += rate * TICK_S
            arrivals += rate
        served = min(c, arrivals + queue_mbit / TICK_S)
        queue_mbit = max(0.0, queue_mbit + (arrivals - served) * TICK_S)
        second_mbit += served * TICK_S
        if (i + 1) % round(1 / TICK_S) == 0:
            per_second.append((t + TICK_S, second_mbit * 0.95))  # goodput: minus framing
            second_mbit = 0.0
        t_s.append(t)
        rtt_ms.append(base_rtt_ms + queue_mbit / c * 1e3 + rng.uniform(0, noise_ms))
        if t + 1e-9 >= next_control:
            next_control += control_s
            now_ns = round(t * 1e9)
            usage = {Scope(n): sent_mbit[n] / control_s for n in demands}
            sent_mbit = dict.fromkeys(demands, 0.0)
            since = policy.evidence_since({}).get(slo.app, 0)
            stats = _stats(slo.app, t_s, rtt_ms, now_ns, window_s, since, base_rtt_ms)
            recent = _stats(slo.app, t_s, rtt_ms, now_ns, 1.0, since, base_rtt_ms)
            start = bisect.bisect_left(t_s, t - control_s)
            trace = [
                (round(t_s[k] * 1e9), max(0.0, rtt_ms[k] - base_rtt_ms))
                for k in range(start, len(t_s))
            ]
            d = policy.decide(
                now_ns=now_ns,
                observation=Observation(
                    stats={slo.app: stats},
                    recent={slo.app: recent},
                    trace={slo.app: trace},
                    actuation_ns=round(actuation_s * 1e9),
                    usage=usage,
                ),
                limits=limits,
            )
            limits = dict(d.limits)
            if d.changed:
                pending.append((t + actuation_s, dict(limits)))
            caps.append((t, float(sum(limits.values()))))
            decisions.append(
                {
                    "t_s": round(t, 3),
                    "action": d.action,
                    "limits": {str(k): v for k, v in limits.items()},
                    "reasons": list(d.reasons),
                }
            )
    data = RunData(
        probes={slo.app: list(zip(t_s, rtt_ms, strict=True))},
        goodput=per_second,
        decisions=decisions,
    )
    c0 = link(0.0)
    summary = summarise_run(data, slos=[slo], timeline=timeline, bottleneck_mbps=c0)
    return FluidRun(data=data, summary=summary, caps=caps)


def _stats(
    name: str,
    t_s: list[float],
    rtt_ms: list[float],
    now_ns: int,
    window_s: float,
    since_ns: int,
    base_ms: float,
) -> WindowStats | None:
    lo = max(now_ns - round(window_s * 1e9), since_ns) / 1e9
    t = np.asarray(t_s)
    keep = t >= lo
    if not keep.any():
        return None
    n = int(keep.sum())
    ns = (np.asarray(rtt_ms)[keep] * 1e6).astype(np.float64)
    snap = RingSnapshot(
        t_ns=(t[keep] * 1e9).astype(np.int64),
        sent_ns=(t[keep] * 1e9).astype(np.int64),
        seq=np.arange(n, dtype=np.int64),
        rtt_ns=ns,
        user_rtt_ns=ns,
        fwd_ns=np.full(n, np.nan),
        back_ns=np.full(n, np.nan),
        flags=np.full(n, FLAG_RECEIVED | FLAG_KERNEL, np.uint8),
    )
    return window_stats(snap, target=name, protocol="udp", base_rtt_ns=base_ms * 1e6)
