"""The agent's sampling: which pods this node runs (``pods.NodePods``), their processes
(``procfs.ProcResolver``), their counters into per-pod meters (``rates.PodMeter``), and
on demand an immutable ``Snapshot`` of every pod's rates, which the HTTP side serves.

A tick is synchronous and cheap: one ``pread`` per resolved pod (an unchanged file is
not even parsed), a bounded slice of ``/proc`` while some pod is unresolved; the
service runs it on absolute deadlines. Rates are computed only when a snapshot is
asked for (a request, a scrape), at most once per tick. Meters of pods that are gone
are dropped with them.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from detnet.controller.agent.pods import LocalPod, NodePods, cgroup_keys
from detnet.controller.agent.procfs import Reading
from detnet.controller.agent.rates import DEFAULT_MAX_RATE, UNKNOWN, NodeMeter, Rates
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

    def forget(self, key: str) -> None:
        """Resolve this pod again (its file did not parse)."""
        ...


class PodSample(NamedTuple):
    """One pod and its rates at a tick (all None for a pod that is not measurable); a
    NamedTuple for the cost, as ``Rates``."""

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
        self._meter = NodeMeter(interval_ns=interval_ns, window_ns=window_ns, max_rate=max_rate)
        self._keys: list[str] = []  # cgroup UIDs of the measurable pods, metered in order
        self._seen_changes = -1
        self._cached: Snapshot | None = None
        self._tick_wall = 0.0
        self._tick_ns = 0
        self.last_snapshot: Snapshot | None = None  # the last one built, whenever that was
        self.synced = False  # a tick has run since the pod list synced
        self.ticks = 0
        self.outcomes: Counter[str] = Counter()  # segments broken: resets, re-resolutions...
        self.cost_seconds = 0.0
        self.cost_buckets = [0] * (len(COST_BUCKETS) + 1)  # cumulative only at export

    def tick(self, now_ns: int) -> None:
        """Read every pod's counters once into the meter. Rates are worked out only when
        a snapshot is asked for (``snapshot()``): at most once per tick, and not at all
        while nobody asks."""
        started = self._cpu()
        if self._pods.changes != self._seen_changes:
            self._seen_changes = self._pods.changes
            self._keys = list(cgroup_keys(self._pods.pods.values()))
            self._resolver.want(self._keys)
        self._resolver.scan(now_ns)
        broken, malformed = self._meter.observe(self._keys, self._resolver.read())
        if broken:
            self.outcomes.update(broken)
        for key in malformed:
            self._resolver.forget(key)  # through another process, if the pod has one
        self._cached = None
        self._tick_wall, self._tick_ns = self._wall(), now_ns
        self.synced = self.synced or self._pods.synced
        self.ticks += 1
        cost = (self._cpu() - started) / 1e9
        self.cost_seconds += cost
        self.cost_buckets[bisect.bisect_left(COST_BUCKETS, cost)] += 1

    def snapshot(self) -> Snapshot | None:
        """Every pod with its rates as of the last tick (None before the first)."""
        if self._cached is not None or not self.ticks:
            return self._cached
        samples: list[PodSample] = []
        measured = unknown = not_measurable = 0
        egress = ingress = 0.0
        by_cgroup = self._meter.rates()
        for pod in self._pods.pods.values():
            rates = by_cgroup.get(pod.cgroup_uid, UNKNOWN) if pod.measurable else UNKNOWN
            if not pod.measurable:
                not_measurable += 1
            elif rates.egress_bps is not None and rates.ingress_bps is not None:
                measured += 1
                egress += rates.egress_bps
                ingress += rates.ingress_bps
            else:
                unknown += 1
            samples.append(PodSample(pod, rates))
        self._cached = self.last_snapshot = Snapshot(
            node=self._pods.node,
            at=format_at(self._tick_wall),
            mono_ns=self._tick_ns,
            interval_s=self._interval_ns / 1e9,
            pods=tuple(samples),
            measured=measured,
            unknown=unknown,
            not_measurable=not_measurable,
            egress_bps=egress,
            ingress_bps=ingress,
        )
        return self._cached
