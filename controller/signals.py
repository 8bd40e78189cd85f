"""The policy's evidence: critical endpoints judged against their apps' SLOs, per node.

Pure: engine ``WindowStats`` in, ``SignalState`` verdicts out. A probe target is either a
whole app (probed through its Service address: no node) or one endpoint of an app (one
ready replica, on a node). Every configured signal of every target is judged: *violated*
above its threshold, *stable* at or below ``stable_fraction`` of it. The verdicts carry
the target's node, so the policy can act where the congestion is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from detnet.engine.slo import Signal, Slo
from detnet.engine.stats import WindowStats
from detnet.engine.targets import Endpoint

# How each signal is spelled in a decision's reasons: says which statistic was used.
SIGNAL_LABELS: dict[Signal, str] = {
    "jitter": "jitter_iqr",
    "latency": "latency_p99",
    "queue_delay": "queue_delay",
    "loss": "loss_ratio",
}


@dataclass(frozen=True, kw_only=True)
class SignalState:
    """One target's signal against its app's threshold at one decision."""

    target: str
    app: str
    node: str | None
    signal: Signal
    threshold: float  # ms for time signals, ratio for loss
    value: float | None  # None: no data
    violated: bool
    stable: bool

    def describe(self) -> str:
        """``robot-control jitter_iqr 2.31 ms > 1.00 ms`` style text."""
        label = SIGNAL_LABELS[self.signal]
        who = self.target if self.node is None else f"{self.target} on {self.node}"
        if self.value is None:
            return f"{who} {label} no data"
        if self.signal == "loss":
            val, thr = f"{self.value:.4f}", f"{self.threshold:.4f}"
        else:
            val, thr = fmt_ms(self.value), fmt_ms(self.threshold)
        return f"{who} {label} {val} {'>' if self.violated else '<='} {thr}"


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Every verdict of one decision, and where the trouble is.

    Node sets hold node names; ``None`` in a set stands for targets without a node (a
    Service address), whose trouble cannot be placed and so concerns every node."""

    signals: tuple[SignalState, ...]
    no_data: tuple[str, ...]  # targets (or apps without any target) with no data
    violated_nodes: frozenset[str | None]
    unstable_nodes: frozenset[str | None]  # not stable: violated, above the fraction, no data
    no_data_nodes: frozenset[str | None]

    @property
    def violations(self) -> tuple[SignalState, ...]:
        """The violated signals."""
        return tuple(s for s in self.signals if s.violated)


def signal_value(stats: WindowStats, signal: Signal) -> float | None:
    """The statistic a signal is judged on, in ms (or a ratio for loss)."""
    if signal == "loss":
        # A window with nothing due yet says nothing about loss.
        return stats.loss_ratio if stats.sent > 0 else None
    ns = {
        "jitter": stats.jitter_iqr_ns,
        "latency": stats.rtt_p99_ns,
        "queue_delay": stats.queue_delay_ns,
    }[signal]
    return None if ns is None else ns / 1e6


def targets_of(slos: Sequence[Slo], endpoints: Mapping[str, Endpoint]) -> dict[str, list[str]]:
    """Each app's probe targets: its endpoints, else the target named like the app (its
    Service address; with no data when the app has no ready endpoint at all)."""
    out: dict[str, list[str]] = {slo.app: [] for slo in slos}
    for target, ep in endpoints.items():
        if ep.app in out:
            out[ep.app].append(target)
    for app, targets in out.items():
        if not targets:
            targets.append(app)
    return out


def evaluate(
    slos: Sequence[Slo],
    stats: Mapping[str, WindowStats | None],
    *,
    endpoints: Mapping[str, Endpoint],
    stable_fraction: float,
) -> Evaluation:
    """Judge every configured signal of every target of every app."""
    states: list[SignalState] = []
    no_data: list[str] = []
    violated: set[str | None] = set()
    unstable: set[str | None] = set()
    missing_nodes: set[str | None] = set()
    by_app = targets_of(slos, endpoints)
    for slo in slos:
        for target in sorted(by_app[slo.app]):
            ep = endpoints.get(target, Endpoint(slo.app))
            window = stats.get(target)
            missing = False
            for signal, threshold in slo.thresholds().items():
                value = None if window is None else signal_value(window, signal)
                state = SignalState(
                    target=target,
                    app=slo.app,
                    node=ep.node,
                    signal=signal,
                    threshold=threshold,
                    value=value,
                    violated=value is not None and value > threshold,
                    stable=value is not None and value <= stable_fraction * threshold,
                )
                states.append(state)
                missing = missing or value is None
                if state.violated:
                    violated.add(ep.node)
                if not state.stable:
                    unstable.add(ep.node)
            if missing:
                no_data.append(target)
                missing_nodes.add(ep.node)
    return Evaluation(
        signals=tuple(states),
        no_data=tuple(no_data),
        violated_nodes=frozenset(violated),
        unstable_nodes=frozenset(unstable),
        no_data_nodes=frozenset(missing_nodes),
    )


def fmt_ms(value: float) -> str:
    """Milliseconds as in the SLO; sub-0.1 ms values in µs so they do not print as 0.00."""
    return f"{value:.2f} ms" if value >= 0.1 or value == 0 else f"{value * 1e3:.1f} µs"
