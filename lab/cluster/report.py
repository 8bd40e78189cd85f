"""The cluster lab's figures, from what a run recorded: sans-I/O, so tests feed it
synthetic runs (tests/unit/test_cluster_report.py).

The critical figures are the one-node lab's (``lab/report.py``, reused, not restated),
evaluated over *endpoints*: every probed replica of a critical app (``APP@NODE``) with
its app's SLO. A window is within SLO when every probed endpoint is; time to protect and
SLO attainment are ``summarise_run``'s over those endpoints. Best-effort figures are per
node, from the sink's per-pod byte counts:

- ``nodes[N].best_effort_mbps``: node N's best-effort goodput over the whole congestion
  phase; ``nodes[N].utilisation``: that divided by N's spare capacity (its uplink minus
  the critical load leaving it);
- ``best_effort_utilisation``: the congested nodes' goodput from the protection onwards
  over their spare capacity, ``summarise_run``'s definition on the congested node(s) —
  the trade-off the controller makes is made there; ``settled_utilisation`` the same over
  the second half of the congestion, once the climb back has ended;
- ``nodes[N].limits_mbps``: the egress limit on each best-effort pod of N when the run
  ended, as the Cilium stand-in last applied it (None: no limit).

``enforcement_latency_ms``: for each decision that changed a limit, and each pod the
change applies to (the workload's pods, on the scope's node under node scope), from the
decision's ``ts`` to the stand-in's ``applied`` time of the first record for that pod
carrying the new value and seen before the next change to that same value (which
may have caused it); p50 and p99 over all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detnet.engine.slo import Slo
from detnet.lab.cluster.quantity import egress_limit
from detnet.lab.report import (
    PHASES,
    RunData,
    Timeline,
    mean_goodput,
    mean_spare,
    missed_line,
    step_line,
    summarise_run,
)


@dataclass(frozen=True, kw_only=True)
class PodRef:
    """A pod the report knows: its workload and node."""

    name: str
    workload: str
    node: str


@dataclass(frozen=True, kw_only=True)
class ClusterRunData:
    """What one run recorded; times in seconds since the run started.

    ``probes``: endpoint (``APP@NODE``) -> (t, rtt_ms, NaN when lost); ``goodput``:
    node -> (t_end, Mbit/s) per one-second sink report; ``decisions``: the controller's
    JSON decision lines (``ts`` wall clock, plus ``t_s``); ``bandwidth``: the stand-ins'
    change records (wall-clock ``seen``/``applied``); ``patches``: the controller's pod
    PATCH requests as ``{"namespace", "pod", "t_s"}``."""

    probes: Mapping[str, Sequence[tuple[float, float]]]
    goodput: Mapping[str, Sequence[tuple[float, float]]] = field(default_factory=dict)
    decisions: Sequence[Mapping[str, Any]] = ()
    bandwidth: Sequence[Mapping[str, Any]] = ()
    patches: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True, kw_only=True)
class ClusterSetup:
    """What the summary needs besides the data: the endpoints and their apps' SLOs, the
    best-effort pods, the nodes and their capacity."""

    slos: Mapping[str, Slo]  # by app
    endpoints: Sequence[str]  # APP@NODE of every critical replica
    pods: Sequence[PodRef]  # the best-effort pods
    nodes: Sequence[str]
    congested: Sequence[str]
    uplink_mbps: float
    critical_mbps: Mapping[str, float]  # critical load leaving each node
    # A step during congestion (``--step``): when, and for a knee step the congested
    # nodes' uplink rate after it.
    step_at_s: float | None = None
    stepped_uplink_mbps: float | None = None


def split_key(key: str) -> tuple[str, str]:
    """``APP@NODE`` (or ``WORKLOAD@NODE``) -> (APP, NODE); no ``@``: (key, "")."""
    app, _, node = key.partition("@")
    return app, node


def endpoint_slos(setup: ClusterSetup, probed: Sequence[str]) -> list[Slo]:
    """One Slo per probed endpoint, named after it (``app``), with its app's thresholds."""
    out = []
    for key in probed:
        slo = setup.slos.get(split_key(key)[0])
        if slo is not None:
            out.append(
                Slo(
                    app=key,
                    max_jitter_ms=slo.max_jitter_ms,
                    max_latency_ms=slo.max_latency_ms,
                    max_queue_delay_ms=slo.max_queue_delay_ms,
                    max_loss_ratio=slo.max_loss_ratio,
                )
            )
    return out


def _sum_goodput(data: ClusterRunData, nodes: Sequence[str]) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for node in nodes:
        for t, mbps in data.goodput.get(node, ()):
            total[t] = total.get(t, 0.0) + mbps
    return sorted(total.items())


def changed_scopes(decision: Mapping[str, Any]) -> dict[str, int]:
    """Scopes (``WORKLOAD`` or ``WORKLOAD@NODE``) whose limit this decision changed."""
    limits, previous = decision.get("limits"), decision.get("previous")
    if not isinstance(limits, Mapping):
        return {}
    previous = previous if isinstance(previous, Mapping) else {}
    out = {}
    for scope, value in limits.items():
        if isinstance(value, int | float) and previous.get(scope) != value:
            out[str(scope)] = int(value)
    return out


def _pods_of(scope: str, pods: Sequence[PodRef]) -> list[PodRef]:
    workload, node = split_key(scope)
    return [p for p in pods if p.workload == workload and (not node or p.node == node)]


def enforcement_latencies(
    decisions: Sequence[Mapping[str, Any]],
    bandwidth: Sequence[Mapping[str, Any]],
    pods: Sequence[PodRef],
) -> list[tuple[float, float]]:
    """Per limit change and pod (module docstring): seconds from the decision to the
    stand-in seeing the patched pod, and to the rate applied; unmatched changes
    (superseded before being applied) are left out."""
    changes: dict[str, list[tuple[float, str]]] = {}  # pod -> (decision ts, value), in order
    for d in sorted(decisions, key=lambda d: float(d.get("ts") or 0.0)):
        ts = d.get("ts")
        if not isinstance(ts, int | float):
            continue
        for scope, mbps in changed_scopes(d).items():
            for pod in _pods_of(scope, pods):
                changes.setdefault(pod.name, []).append((float(ts), f"{mbps}M"))
    applied: dict[str, list[tuple[float, float, str]]] = {}  # pod -> (seen, applied, value)
    for r in bandwidth:
        if r.get("event", "bandwidth") != "bandwidth" or r.get("error"):
            continue
        at, value, name = r.get("applied"), r.get("value"), r.get("pod")
        seen = r.get("seen", at)
        if (
            isinstance(at, int | float)
            and isinstance(seen, int | float)
            and isinstance(value, str)
            and isinstance(name, str)
        ):
            applied.setdefault(name, []).append((float(seen), float(at), value))
    out = []
    for name, seq in changes.items():
        records = sorted(applied.get(name, []))
        for i, (ts, value) in enumerate(seq):
            # A record seen after the next change to the same value may be that change's.
            later = [t for t, v in seq[i + 1 :] if v == value]
            bound = later[0] if later else math.inf
            for seen, at, got in records:
                if seen >= ts and got == value:
                    if seen < bound:
                        out.append((seen - ts, at - ts))
                    break
    return out


def latency_summary(pairs: Sequence[tuple[float, float]]) -> dict[str, float | int | None]:
    """``p50``/``p99`` (ms) from decision to rate applied, ``seen_p50``/``seen_p99`` to
    the stand-in seeing the patch (the API path alone), and ``n``."""
    if not pairs:
        return {"p50": None, "p99": None, "seen_p50": None, "seen_p99": None, "n": 0}
    a = np.asarray(pairs, dtype=float) * 1e3
    s50, s99 = np.percentile(a[:, 0], [50, 99])
    p50, p99 = np.percentile(a[:, 1], [50, 99])
    return {
        "p50": round(float(p50), 3),
        "p99": round(float(p99), 3),
        "seen_p50": round(float(s50), 3),
        "seen_p99": round(float(s99), 3),
        "n": len(pairs),
    }


def _final_limits(
    bandwidth: Sequence[Mapping[str, Any]], pods: Sequence[PodRef]
) -> dict[str, dict[str, float | None]]:
    last: dict[str, Mapping[str, Any]] = {}
    for r in sorted(
        (r for r in bandwidth if r.get("event", "bandwidth") == "bandwidth" and not r.get("error")),
        key=lambda r: float(r.get("applied") or 0.0),
    ):
        last[str(r.get("pod"))] = r
    out: dict[str, dict[str, float | None]] = {}
    for pod in pods:
        rate = (last.get(pod.name) or {}).get("rate_bytes_per_s")
        mbps = round(rate * 8 / 1e6, 3) if isinstance(rate, int | float) else None
        out.setdefault(pod.node, {})[pod.workload] = mbps
    return out


def _patched_by_node(
    patches: Sequence[Mapping[str, Any]], pods: Sequence[PodRef]
) -> dict[str, dict[str, list[float]]]:
    """Per node, each patched pod's patched limits in Mbit/s (a value that sets no limit,
    as Cilium reads it, adds none)."""
    node_of = {p.name: p.node for p in pods}
    out: dict[str, dict[str, list[float]]] = {}
    for patch in patches:
        pod = str(patch.get("pod"))
        if pod not in node_of:
            continue
        value = patch.get("value")
        rate = egress_limit(value if isinstance(value, str) else None).bytes_per_s
        limits = out.setdefault(node_of[pod], {}).setdefault(pod, [])
        if rate is not None:
            limits.append(round(rate * 8 / 1e6, 3))
    return out


def summarise_cluster_run(
    data: ClusterRunData,
    *,
    setup: ClusterSetup,
    timeline: Timeline,
    enforcer: str | None,
    usage_source: str,
) -> dict[str, Any]:
    """One RUN of the cluster report (module docstring; docs/lab.md lists the fields)."""
    probed = [e for e in setup.endpoints if data.probes.get(e)]
    congested = RunData(
        probes=data.probes,
        goodput=_sum_goodput(data, setup.congested),
        decisions=data.decisions,
    )
    knee = setup.stepped_uplink_mbps is not None
    core = summarise_run(
        congested,
        slos=endpoint_slos(setup, probed),
        timeline=timeline,
        bottleneck_mbps=setup.uplink_mbps * len(setup.congested),
        critical_mbps=sum(setup.critical_mbps.get(n, 0.0) for n in setup.congested),
        bottleneck_from_s=setup.step_at_s if knee else None,
        bottleneck_after_mbps=(
            setup.stepped_uplink_mbps * len(setup.congested)
            if setup.stepped_uplink_mbps is not None
            else None
        ),
        step_at_s=setup.step_at_s,
    )
    phases: dict[str, Any] = {}
    for phase in PHASES:
        start, end = timeline.bounds(phase)
        apps: dict[str, dict[str, Any]] = {}
        for key, stats in core["phases"][phase]["apps"].items():
            apps.setdefault(split_key(key)[0], {})[key] = stats
        phases[phase] = {
            "apps": apps,
            "best_effort_mbps": {
                n: mean_goodput(RunData(probes={}, goodput=data.goodput.get(n, ())), start, end)
                for n in setup.nodes
            },
        }
    limits = _final_limits(data.bandwidth, setup.pods)
    patched_by_node = _patched_by_node(data.patches, setup.pods)
    nodes = {}
    c_start, c_end = timeline.bounds("congestion")
    for n in setup.nodes:
        mbps = phases["congestion"]["best_effort_mbps"][n]
        critical = setup.critical_mbps.get(n, 0.0)
        stepped = setup.stepped_uplink_mbps if n in setup.congested else None
        spare = mean_spare(
            c_start,
            c_end,
            before=setup.uplink_mbps - critical,
            step_s=setup.step_at_s if stepped is not None else None,
            after=None if stepped is None else stepped - critical,
        )
        node_patches = patched_by_node.get(n, {})
        lowest = [v for limits in node_patches.values() for v in limits]
        nodes[n] = {
            "best_effort_mbps": mbps,
            "utilisation": None if mbps is None or spare <= 0 else mbps / spare,
            "limits_mbps": limits.get(n, {}),
            "patched_pods": len(node_patches),
            "lowest_patch_mbps": min(lowest) if lowest else None,
        }
    patched = {(p.get("namespace"), p.get("pod")) for p in data.patches}
    return {
        "time_to_protect_s": core["time_to_protect_s"],
        "slo_attainment": core["slo_attainment"],
        "missed_windows": core["missed_windows"],
        "best_effort_utilisation": core["best_effort_utilisation"],
        "settled_utilisation": core["settled_utilisation"],
        **{k: core[k] for k in ("increases", "violations_after_increase", "step") if k in core},
        "enforcer": enforcer,
        "usage_source": usage_source,
        "patches": len(data.patches),
        "patched_pods": len(patched),
        "patched": sorted(f"{ns}/{pod}" for ns, pod in patched),
        "enforcement_latency_ms": latency_summary(
            enforcement_latencies(data.decisions, data.bandwidth, setup.pods)
        ),
        "endpoints": probed,
        "nodes": nodes,
        "phases": phases,
        "decisions": [dict(d) for d in data.decisions],
    }


def build_cluster_report(
    config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``--json`` document: ``{"kind": "cluster", "config": ..., "runs": ...}``."""
    return {
        "kind": "cluster",
        "config": dict(config),
        "runs": {name: dict(run) for name, run in runs.items()},
    }


# ----------------------------------------------------------------------- the table


def _f(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) + suffix


def format_cluster_table(report: Mapping[str, Any]) -> str:
    """The three runs side by side, per endpoint and per node, as aligned text."""
    runs = report["runs"]
    names = list(runs)
    col = 26
    head = f"{'':<12}{'':<24}" + "".join(f"{n.replace('_', ' '):<{col}}" for n in names)
    sub = f"{'phase':<12}{'endpoint':<24}" + f"{'p99 ms  IQR ms  loss':<{col}}" * len(names)
    lines = [head, sub, "-" * len(head)]
    live = {n: r for n, r in runs.items() if "skipped" not in r}
    endpoints: list[str] = []
    for r in live.values():
        for e in r.get("endpoints", ()):
            if e not in endpoints:
                endpoints.append(e)
    for phase in PHASES:
        for i, ep in enumerate(endpoints):
            cells = []
            for n in names:
                r = runs[n]
                stats = None
                if "skipped" not in r:
                    stats = r["phases"][phase]["apps"].get(ep.partition("@")[0], {}).get(ep)
                if stats is None:
                    cells.append(f"{'-':<{col}}")
                    continue
                loss = None if stats["loss_ratio"] is None else 100 * stats["loss_ratio"]
                cell = (
                    f"{_f(stats['rtt_p99_ms']):>6}  {_f(stats['jitter_iqr_ms']):>6}  "
                    f"{_f(loss, '.1f', '%'):>5}"
                )
                cells.append(f"{cell:<{col}}")
            lines.append(f"{phase if i == 0 else '':<12}{ep:<24}" + "".join(cells))
    lines.append("")

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<36}" + "".join(f"{v:<{col}}" for v in values))

    def run_values(fn: Any) -> list[str]:
        return ["skipped" if "skipped" in runs[n] else fn(runs[n]) for n in names]

    nodes: list[str] = []
    for r in live.values():
        nodes += [n for n in r["nodes"] if n not in nodes]

    def pct(value: float | None) -> str:
        return _f(None if value is None else 100 * value, ".0f", "%")

    for node in nodes:
        row(
            f"best effort {node}, Mbit/s",
            run_values(lambda r, node=node: _f(r["nodes"][node]["best_effort_mbps"], ".1f")),
        )
    for node in nodes:
        row(
            f"limits at end {node}, Mbit/s",
            run_values(
                lambda r, node=node: (
                    " ".join(
                        f"{w[:9]}={_f(v, '.0f')}"
                        for w, v in r["nodes"][node]["limits_mbps"].items()
                        if v is not None
                    )
                    or "-"
                )
            ),
        )
    row("time to protect, s", run_values(lambda r: _f(r["time_to_protect_s"], ".1f")))
    row("SLO attainment", run_values(lambda r: pct(r["slo_attainment"])))
    row(
        "best-effort utilisation (congested)",
        run_values(lambda r: pct(r["best_effort_utilisation"])),
    )
    row("  settled (congestion's second half)", run_values(lambda r: pct(r["settled_utilisation"])))
    row(
        "violations after increases",
        run_values(
            lambda r: f"{r.get('violations_after_increase', '-')}/{r.get('increases', '-')}"
        ),
    )
    for n in names:
        missed = runs[n].get("missed_windows")
        if missed and runs[n].get("time_to_protect_s") is not None:
            lines.append(f"{n.replace('_', ' ')}: {missed_line(missed)}")
        step = runs[n].get("step")
        if step:
            lines.append(f"{n.replace('_', ' ')}: {step_line(report, step)}")
    row("pod patches (pods)", run_values(lambda r: f"{r['patches']} ({r['patched_pods']})"))
    row(
        "decision to wire p50/p99, ms",
        run_values(
            lambda r: (
                f"{_f(r['enforcement_latency_ms']['p50'], '.0f')}/"
                f"{_f(r['enforcement_latency_ms']['p99'], '.0f')}"
            )
        ),
    )
    row("usage source", run_values(lambda r: str(r["usage_source"])))
    row("decisions", run_values(lambda r: str(len(r["decisions"]))))
    for n in names:
        if "skipped" in runs[n]:
            lines.append(f"{n}: skipped: {runs[n]['skipped']}")
    return "\n".join(lines).rstrip() + "\n"
