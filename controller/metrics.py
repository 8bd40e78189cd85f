"""The controller's Prometheus metrics (docs/metrics.md, "Controller"), on an injected
registry. These are the program's own events and state, so they are plain instrumented
Counters, Gauges and Histograms; the engine's windowed statistics have their own Collector.

One ``ControllerMetrics`` per process: the control loop records decisions, limits, usage,
SLO state and enforcement latency; enforcers record pods, API errors and leadership
through the same object so every name is registered exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from detnet.controller.aimd import Decision, Scope, Slo

BYTES_PER_MBIT = 1_000_000 / 8
# Enforcement spans one netlink call (~ms) to many API patches under a QPS limit (~s).
_ENFORCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# One control step is a stats read and a policy call: tens of µs to a few ms.
_STEP_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


# The API failures worth an alert from the first scrape (others appear when they occur).
API_ERROR_CODES = ("connection", "401", "403", "404", "409", "422", "429", "500", "503")
# Why an agent gave no usage (controller/usage.py UsageReport), zeroed when agents are used.
USAGE_ERROR_KINDS = (
    "no_agent", "timeout", "connection", "http_401", "http_403", "http_503",
    "malformed", "wrong_node", "no_token",
)  # fmt: skip


class ControllerMetrics:
    """Every controller metric, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.limit = Gauge(
            "detnet_egress_limit_bytes_per_second",
            'Current egress limit of a best-effort workload (node "": on every node)',
            ["workload", "node"],
            registry=registry,
        )
        self.usage = Gauge(
            "detnet_egress_usage_bytes_per_second",
            'Measured egress usage of a best-effort workload (node "": summed over nodes)',
            ["workload", "node"],
            registry=registry,
        )
        self.usage_unknown_pods = Gauge(
            "detnet_usage_unknown_pods",
            "Best-effort pods whose usage is unknown (their node's agent did not answer)",
            ["workload"],
            registry=registry,
        )
        self.usage_errors = Counter(
            "detnet_usage_errors",
            "Failed usage requests to node agents, by kind (timeout, connection, http_401...)",
            ["kind"],
            registry=registry,
        )
        self.decisions = Counter(
            "detnet_decisions", "Policy decisions by action", ["action"], registry=registry
        )
        self.slo_violated = Gauge(
            "detnet_slo_violated",
            "1 while the signal breaks its SLO",
            ["target", "signal"],
            registry=registry,
        )
        self.slo_threshold = Gauge(
            "detnet_slo_threshold_seconds",
            "The SLO of the time signals",
            ["target", "signal"],
            registry=registry,
        )
        self.slo_loss = Gauge(
            "detnet_slo_max_loss_ratio", "The loss SLO", ["target"], registry=registry
        )
        self.enforcement_latency = Histogram(
            "detnet_enforcement_latency_seconds",
            "From decision to every pod (or interface) patched",
            ["enforcer"],
            buckets=_ENFORCE_BUCKETS,
            registry=registry,
        )
        self.enforcement_errors = Counter(
            "detnet_enforcement_errors",
            "Limits that could not be applied (retried at the next control step)",
            ["enforcer"],
            registry=registry,
        )
        self.enforced_pods = Gauge(
            "detnet_enforced_pods",
            "Pods carrying the current limit",
            ["workload"],
            registry=registry,
        )
        self.api_errors = Counter(
            "detnet_api_errors",
            "Kubernetes API errors by HTTP status (connection for transport errors)",
            ["code"],
            registry=registry,
        )
        self.leader = Gauge(
            "detnet_leader", "1 while this replica holds the lease", registry=registry
        )
        self.loop_seconds = Histogram(
            "detnet_control_loop_seconds",
            "Duration of one control step",
            buckets=_STEP_BUCKETS,
            registry=registry,
        )
        self._violated_endpoints: set[tuple[str, str]] = set()
        self._series: dict[int, set[tuple[str, str]]] = {}
        # Export zeros from the first scrape: an alert on increase() never sits on a
        # missing series, and misses no first error.
        for action in ("decrease", "increase", "hold"):
            self.decisions.labels(action=action)
        for code in API_ERROR_CODES:
            self.api_errors.labels(code=code)

    def expect(self, *, enforcer: str, agent_usage: bool) -> None:
        """Zero the error counters this run can increment (the enforcer's, and the
        agents' when usage comes from them)."""
        self.enforcement_errors.labels(enforcer=enforcer)
        if agent_usage:
            for kind in USAGE_ERROR_KINDS:
                self.usage_errors.labels(kind=kind)

    def set_slos(self, slos: Iterable[Slo]) -> None:
        """Export the thresholds, and start every configured signal as not violated."""
        for slo in slos:
            for signal, threshold in slo.thresholds().items():
                self.slo_violated.labels(target=slo.app, signal=signal).set(0)
                if signal == "loss":
                    self.slo_loss.labels(target=slo.app).set(threshold)
                else:
                    self.slo_threshold.labels(target=slo.app, signal=signal).set(threshold / 1e3)

    def set_limits(self, limits: Mapping[Scope, int]) -> None:
        """Export limits given in Mbit/s as bytes per second; scopes no longer limited
        (a node that stopped running the workload) leave the metric."""
        self._replace(self.limit, {(s.workload, s.node): m for s, m in limits.items()})

    def set_usage(self, usage: Mapping[Scope, float]) -> None:
        """Export usage given in Mbit/s as bytes per second; unknown scopes leave it."""
        self._replace(self.usage, {(s.workload, s.node): m for s, m in usage.items()})

    def _replace(self, gauge: Gauge, values: Mapping[tuple[str, str], float]) -> None:
        """Set ``gauge`` to exactly ``values`` (Mbit/s, exported as bytes/s): label sets
        it had before and not now are removed, so a series never outlives its scope."""
        before = self._series.get(id(gauge), set())
        for labels in before - values.keys():
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
        for labels, mbit in values.items():
            gauge.labels(*labels).set(mbit * BYTES_PER_MBIT)
        self._series[id(gauge)] = set(values)

    def set_unknown_pods(self, unknown: Mapping[str, int]) -> None:
        """Export how many pods of each workload have unknown usage."""
        for workload, n in unknown.items():
            self.usage_unknown_pods.labels(workload=workload).set(n)

    def record_decision(self, decision: Decision) -> None:
        """Count the decision and export each signal's SLO state (an endpoint that is
        no longer probed leaves the metric; the apps' own series stay)."""
        self.decisions.labels(action=decision.action).inc()
        states = {(s.target, s.signal): 1 if s.violated else 0 for s in decision.signals}
        for key in self._violated_endpoints - states.keys():
            with contextlib.suppress(KeyError):
                self.slo_violated.remove(*key)
        self._violated_endpoints = {key for key in states if "/" in key[0]}
        for (target, signal), value in states.items():
            self.slo_violated.labels(target=target, signal=signal).set(value)

    def api_error(self, code: int | str) -> None:
        """Count one Kubernetes API error (``"connection"`` for transport errors)."""
        self.api_errors.labels(code=str(code)).inc()
