"""One sampling tick of the agent: which pods this node runs (``pods.NodePods``), their
processes (``procfs.ProcResolver``), their counters into per-pod meters
(``rates.PodMeter``), and an immutable ``Snapshot`` that the HTTP side serves as is.

The tick is synchronous and cheap (one ``pread`` per resolved pod, a bounded slice of
``/proc`` while some pod is unresolved); the service runs it on absolute deadlines.
The snapshot is replaced whole, so the HTTP thread reads a consistent one without a
lock. Meters of pods that are gone are dropped with them.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from detnet.controller.agent.pods import LocalPod, NodePods, cgroup_keys
from detnet.controller.agent.procfs import Reading
from detnet.controller.agent.rates import DEFAULT_MAX_RATE, UNKNOWN, PodMeter, Rates
from detnet.controller.agent.wire import format_at

# CPU seconds of one tick: tens of µs for a few pods, a few ms for hundreds or a scan.
COST_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class CounterSource(Protocol):
    """Where the counters come from (``procfs.ProcResolver``)."""

    def want(self, keys: Collection[str]) -> None:
        """Resolve exactly these pods (by the UID their cgroup carries)."""
        ...

    def scan(self, now_ns: int) -> int:
        """Look for unresolved pods' processes (bounded)."""
        ...

    def read(self) -> dict[str, Reading]:
        """The counters of every resolved pod, now."""
        ...


@dataclass(frozen=True)
class PodSample:
    """One pod and its rates at a tick (all None for a pod that is not measurable)."""

    pod: LocalPod
    rates: Rates


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Every pod of the node at one tick, with the node's totals."""

    node: str
    at: str  # wire format, UTC
    mono_ns: int
    interval_s: float
    pods: tuple[PodSample, ...]
    measured: int  # pods whose last-interval rates are known
    unknown: int  # measurable pods whose rates are not (yet) known
    not_measurable: int  # hostNetwork pods
    egress_bps: float  # sums over the measured pods
    ingress_bps: float


class Sampler:
    """Runs ticks and keeps the latest snapshot (see the module docstring)."""

    def __init__(
        self,
        *,
        pods: NodePods,
        resolver: CounterSource,
        interval_ns: int,
        window_ns: int = 1_000_000_000,
        max_rate: float = DEFAULT_MAX_RATE,
        wall: Callable[[], float] = time.time,
        cpu: Callable[[], int] = time.thread_time_ns,
    ) -> None:
        self._pods = pods
        self._resolver = resolver
        self._interval_ns = interval_ns
        self._window_ns = window_ns
        self._max_rate = max_rate
        self._wall, self._cpu = wall, cpu
        self._meters: dict[str, PodMeter] = {}
        self._seen_changes = -1
        self.snapshot: Snapshot | None = None
        self.synced_snapshot = False  # a snapshot taken after the pod list synced
        self.ticks = 0
        self.outcomes: Counter[str] = Counter()  # resets, interface changes, re-resolutions
        self.cost_seconds = 0.0
        self.cost_buckets = [0] * (len(COST_BUCKETS) + 1)  # cumulative only at export

    def tick(self, now_ns: int) -> Snapshot:
        """Sample every pod once; the new snapshot (also kept in ``snapshot``)."""
        started = self._cpu()
        pods = self._pods.pods
        if self._pods.changes != self._seen_changes:
            self._seen_changes = self._pods.changes
            self._resolver.want(cgroup_keys(pods.values()).keys())
            for uid in [u for u in self._meters if u not in pods]:
                del self._meters[uid]
        self._resolver.scan(now_ns)
        readings = self._resolver.read()
        samples: list[PodSample] = []
        measured = unknown = not_measurable = 0
        egress = ingress = 0.0
        for uid, pod in pods.items():
            if not pod.measurable:
                not_measurable += 1
                samples.append(PodSample(pod, UNKNOWN))
                continue
            meter = self._meters.get(uid)
            if meter is None:
                meter = self._meters[uid] = PodMeter(
                    interval_ns=self._interval_ns,
                    window_ns=self._window_ns,
                    max_rate=self._max_rate,
                )
            reading = readings.get(pod.cgroup_uid)
            if reading is None:
                meter.observe(now_ns, None, source=None)
            else:
                outcome = meter.observe(reading.t_ns, reading.counters, source=reading.source)
                if outcome not in ("ok", "start"):
                    self.outcomes[outcome] += 1
            rates = meter.rates()
            if rates.egress_bps is not None and rates.ingress_bps is not None:
                measured += 1
                egress += rates.egress_bps
                ingress += rates.ingress_bps
            else:
                unknown += 1
            samples.append(PodSample(pod, rates))
        snap = Snapshot(
            node=self._pods.node,
            at=format_at(self._wall()),
            mono_ns=now_ns,
            interval_s=self._interval_ns / 1e9,
            pods=tuple(samples),
            measured=measured,
            unknown=unknown,
            not_measurable=not_measurable,
            egress_bps=egress,
            ingress_bps=ingress,
        )
        self.snapshot = snap
        self.synced_snapshot = self.synced_snapshot or self._pods.synced
        self.ticks += 1
        cost = (self._cpu() - started) / 1e9
        self.cost_seconds += cost
        self.cost_buckets[bisect.bisect_left(COST_BUCKETS, cost)] += 1
        return snap
