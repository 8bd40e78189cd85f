"""The agent's Prometheus metrics, built at scrape time from its state (the collector
runs on the HTTP server's thread: it copies the counters it reads, and gets the
snapshot, which is immutable, through ``AgentParts.snapshot``). Names are in
docs/agent.md ("Metrics").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from detnet.controller.agent.sampler import COST_BUCKETS

if TYPE_CHECKING:
    from detnet.controller.agent.auth import Authenticator
    from detnet.controller.agent.pods import NodePods
    from detnet.controller.agent.procfs import ProcResolver
    from detnet.controller.agent.sampler import Sampler, Snapshot
    from detnet.controller.agent.server import UsageRoute


@dataclass
class AgentParts:
    """What the collector reads; ``api_errors`` counts Kubernetes API failures by code."""

    node: str
    pods: NodePods
    resolver: ProcResolver
    sampler: Sampler
    auth: Authenticator
    route: UsageRoute
    snapshot: Callable[[], Snapshot | None]
    api_errors: Counter[str] = field(default_factory=Counter)
    skipped_samples: int = 0


class AgentCollector(Collector):
    """Per-node totals, pods by state, sampling cost, errors by kind, requests."""

    def __init__(self, parts: AgentParts) -> None:
        self._p = parts

    def collect(self) -> Iterator[Metric]:
        """Fresh metric families from the current state."""
        p = self._p
        node = [p.node]
        snap = p.snapshot()
        egress = GaugeMetricFamily(
            "detnet_agent_egress_bytes_per_second",
            "Egress of the node's measured pods over the last interval (their sum)",
            labels=["node"],
        )
        ingress = GaugeMetricFamily(
            "detnet_agent_ingress_bytes_per_second",
            "Ingress of the node's measured pods over the last interval (their sum)",
            labels=["node"],
        )
        pods = GaugeMetricFamily(
            "detnet_agent_pods",
            "Pods of the node by state: measured, unknown (not resolved or just reset), "
            "not_measurable (hostNetwork)",
            labels=["node", "state"],
        )
        if snap is not None:
            egress.add_metric(node, snap.egress_bps)
            ingress.add_metric(node, snap.ingress_bps)
            pods.add_metric([p.node, "measured"], snap.measured)
            pods.add_metric([p.node, "unknown"], snap.unknown)
            pods.add_metric([p.node, "not_measurable"], snap.not_measurable)
        yield egress
        yield ingress
        yield pods

        buckets, acc = [], 0
        counts = list(p.sampler.cost_buckets)
        for edge, n in zip((*COST_BUCKETS, float("inf")), counts, strict=True):
            acc += n
            buckets.append(("+Inf" if edge == float("inf") else repr(edge), acc))
        cost = HistogramMetricFamily(
            "detnet_agent_sample_cpu_seconds",
            "CPU time of one sampling tick (every pod read once)",
            labels=["node"],
        )
        cost.add_metric(node, buckets, p.sampler.cost_seconds)
        yield cost
        skipped = CounterMetricFamily(
            "detnet_agent_samples_skipped",
            "Sampling deadlines missed (the loop was late) and skipped",
            labels=["node"],
        )
        skipped.add_metric(node, p.skipped_samples)
        yield skipped
        scanned = CounterMetricFamily(
            "detnet_agent_scanned_pids",
            "PIDs examined in /proc to find pods' processes",
            labels=["node"],
        )
        scanned.add_metric(node, p.resolver.examined)
        yield scanned

        errors = CounterMetricFamily(
            "detnet_agent_errors",
            "Errors by kind: /proc entries unreadable or malformed, processes that vanished, "
            "Kubernetes API failures (api_<code>), pods beyond the agent's bound",
            labels=["node", "kind"],
        )
        by_kind: dict[str, int] = dict(p.resolver.errors)
        for code, n in dict(p.api_errors).items():
            by_kind[f"api_{code}"] = n
        if p.pods.dropped:
            by_kind["pods_dropped"] = p.pods.dropped
        for kind, n in sorted(by_kind.items()):
            errors.add_metric([p.node, kind], n)
        yield errors
        events = CounterMetricFamily(
            "detnet_agent_counter_breaks",
            "Rate segments broken (unknown for one interval): reset, interfaces, source",
            labels=["node", "reason"],
        )
        for reason, n in sorted(dict(p.sampler.outcomes).items()):
            events.add_metric([p.node, reason], n)
        yield events

        requests = CounterMetricFamily(
            "detnet_agent_usage_requests", "/v1/usage answers by status code", labels=["code"]
        )
        for code, n in sorted(dict(p.route.requests).items()):
            requests.add_metric([code], n)
        yield requests
        auth = CounterMetricFamily(
            "detnet_agent_auth_decisions",
            "Authentication decisions by reason (ok, no_token, malformed, invalid, forbidden, "
            "unavailable, busy)",
            labels=["reason"],
        )
        for reason, n in sorted(dict(p.auth.counts).items()):
            auth.add_metric([reason], n)
        yield auth
        reviews = CounterMetricFamily(
            "detnet_agent_token_reviews", "TokenReviews sent to the API server (cache misses)"
        )
        reviews.add_metric([], p.auth.reviews)
        yield reviews
