"""The cluster lab's report from synthetic runs (lab/cluster/report.py): the endpoint
figures, the per-node goodput and limits, the decision-to-wire join, the table."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any

import pytest

from detnet.engine.slo import Slo
from detnet.lab.cluster.report import (
    ClusterRunData,
    ClusterSetup,
    PodRef,
    build_cluster_report,
    changed_scopes,
    enforcement_latencies,
    format_cluster_table,
    summarise_cluster_run,
)
from detnet.lab.report import Timeline

TA = "telemetry-upload@node-a"
TIMELINE = Timeline(quiet_s=2.0, congestion_s=6.0, recovery_s=2.0)
PODS = [
    PodRef(name="t-a", workload="telemetry-upload", node="node-a"),
    PodRef(name="t-b", workload="telemetry-upload", node="node-b"),
    PodRef(name="erp-b", workload="erp-dashboard", node="node-b"),
]
SETUP = ClusterSetup(
    slos={
        "robot-control": Slo(app="robot-control", max_jitter_ms=1.0, max_latency_ms=5.0),
        "safety-scanner": Slo(app="safety-scanner", max_latency_ms=10.0),
    },
    endpoints=["robot-control@node-a", "robot-control@node-b", "safety-scanner@node-a"],
    pods=PODS,
    nodes=["node-a", "node-b"],
    congested=["node-a"],
    uplink_mbps=100.0,
    critical_mbps={"node-a": 0.0, "node-b": 0.0},
)


def synthetic_run() -> ClusterRunData:
    """robot-control@node-a queues (20 ms, alternating with 1 ms) from congestion start
    (2 s) until 4 s; everything else is quiet. node-a sends 90 Mbit/s until 4 s, then 60;
    node-b 58 throughout the congestion."""
    robot_a, scanner = [], []
    for i in range(1000):
        t = i * 0.01
        bad = 2.0 <= t < 4.0
        robot_a.append((t, (20.0 if i % 2 else 1.0) if bad else 0.1))
        scanner.append((t, 0.2))
    goodput = {
        "node-a": [(float(e), 90.0 if e <= 4 else 60.0) for e in range(3, 9)],
        "node-b": [(float(e), 58.0) for e in range(3, 9)],
    }
    bandwidth: list[dict[str, Any]] = [
        {"event": "bandwidth", "pod": "t-a", "value": "80M", "rate_bytes_per_s": 10_000_000,
         "seen": 100.02, "applied": 100.03},
        {"event": "bandwidth", "pod": "t-b", "value": None, "rate_bytes_per_s": None,
         "seen": 99.0, "applied": 99.01},
    ]  # fmt: skip
    decisions = [
        {"ts": 100.0, "t_s": 2.5, "action": "decrease",
         "limits": {"telemetry-upload@node-a": 80}, "previous": {"telemetry-upload@node-a": 100}},
    ]  # fmt: skip
    return ClusterRunData(
        probes={"robot-control@node-a": robot_a, "safety-scanner@node-a": scanner},
        goodput=goodput,
        decisions=decisions,
        bandwidth=bandwidth,
        patches=[
            {"namespace": "be", "pod": "t-a", "t_s": 2.5, "value": "80M"},
            {"namespace": "be", "pod": "t-a", "t_s": 3.0, "value": "1G"},
            {"namespace": "be", "pod": "t-b", "t_s": 3.0, "value": "garbage"},
        ],
    )  # fmt: skip


def test_summary_of_a_synthetic_run() -> None:
    run = summarise_cluster_run(
        synthetic_run(), setup=SETUP, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent"
    )
    assert run["time_to_protect_s"] == pytest.approx(2.0)
    assert run["slo_attainment"] == 1.0  # 4 whole windows from 4 s to 8 s, all within SLO
    assert run["best_effort_utilisation"] == pytest.approx(0.6)  # node-a: 60 of 100
    assert run["endpoints"] == ["robot-control@node-a", "safety-scanner@node-a"]  # probed
    assert (run["enforcer"], run["usage_source"]) == ("kubernetes", "agent")
    assert (run["patches"], run["patched_pods"]) == (3, 2)
    assert run["patched"] == ["be/t-a", "be/t-b"]
    # per node: the lowest limit patched (an unparsable value is no limit, as Cilium reads it)
    assert (
        run["nodes"]["node-a"]["patched_pods"],
        run["nodes"]["node-a"]["lowest_patch_mbps"],
    ) == (1, 80.0)
    assert (
        run["nodes"]["node-b"]["patched_pods"],
        run["nodes"]["node-b"]["lowest_patch_mbps"],
    ) == (1, None)
    assert run["nodes"]["node-a"]["best_effort_mbps"] == pytest.approx(70.0)  # 90, 90, 60 x4
    assert run["nodes"]["node-b"]["best_effort_mbps"] == pytest.approx(58.0)
    assert run["nodes"]["node-b"]["utilisation"] == pytest.approx(0.58)
    assert run["nodes"]["node-a"]["limits_mbps"] == {"telemetry-upload": 80.0}
    assert run["nodes"]["node-b"]["limits_mbps"] == {
        "telemetry-upload": None,
        "erp-dashboard": None,
    }
    lat = run["enforcement_latency_ms"]
    assert (lat["n"], lat["p50"], lat["seen_p50"]) == (1, pytest.approx(30.0), pytest.approx(20.0))
    congestion = run["phases"]["congestion"]
    assert set(congestion["apps"]) == {"robot-control", "safety-scanner"}
    assert congestion["apps"]["robot-control"]["robot-control@node-a"]["rtt_p99_ms"] > 5.0
    assert congestion["best_effort_mbps"] == {
        "node-a": pytest.approx(70.0),
        "node-b": pytest.approx(58.0),
    }
    assert (
        run["phases"]["quiet"]["apps"]["safety-scanner"]["safety-scanner@node-a"]["loss_ratio"]
        == 0.0
    )


def test_a_run_never_protected() -> None:
    data = synthetic_run()
    broken = {k: [(t, math.nan) for t, _ in v] for k, v in data.probes.items()}
    run = summarise_cluster_run(
        ClusterRunData(probes=broken, goodput=data.goodput),
        setup=SETUP, timeline=TIMELINE, enforcer="dry-run", usage_source="none",
    )  # fmt: skip
    assert (run["time_to_protect_s"], run["slo_attainment"]) == (None, 0.0)
    assert run["enforcement_latency_ms"] == {
        "p50": None, "p99": None, "seen_p50": None, "seen_p99": None, "n": 0
    }  # fmt: skip


def test_changed_scopes() -> None:
    d = {"limits": {"a@n1": 80, "a@n2": 100, "b": 50}, "previous": {"a@n1": 100, "a@n2": 100}}
    assert changed_scopes(d) == {"a@n1": 80, "b": 50}
    assert changed_scopes({"limits": None}) == {}


def test_latency_join_per_scope() -> None:
    decisions = [
        {"ts": 100.0, "limits": {TA: 80}, "previous": {TA: 100}},
        {"ts": 101.5, "limits": {TA: 64}, "previous": {TA: 80}},
        {"ts": 103.0, "limits": {"erp-dashboard": 50}, "previous": {"erp-dashboard": 1000}},
    ]  # fmt: skip
    bandwidth = [
        {"pod": "t-a", "value": "80M", "seen": 100.02, "applied": 100.03},
        {"pod": "t-a", "value": "64M", "seen": 101.52, "applied": 101.56},
        {"pod": "erp-b", "value": "50M", "seen": 103.1, "applied": 103.2},
        {"pod": "t-b", "value": "80M", "seen": 100.5, "applied": 100.6},  # not node-a: no change
        {"pod": "erp-b", "value": "50M", "seen": 103.0, "applied": 103.1, "error": "tc failed"},
    ]
    got = sorted(enforcement_latencies(decisions, bandwidth, PODS))
    assert got == [
        pytest.approx((0.02, 0.03)), pytest.approx((0.02, 0.06)), pytest.approx((0.1, 0.2))
    ]  # fmt: skip


def test_latency_join_does_not_borrow_a_later_changes_record() -> None:
    scope = "telemetry-upload@node-a"
    decisions = [
        {"ts": 100.0, "limits": {scope: 80}, "previous": {scope: 100}},  # never applied
        {"ts": 101.0, "limits": {scope: 64}, "previous": {scope: 80}},
        {"ts": 102.0, "limits": {scope: 80}, "previous": {scope: 64}},
    ]
    bandwidth = [
        {"pod": "t-a", "value": "64M", "seen": 101.01, "applied": 101.02},
        {"pod": "t-a", "value": "80M", "seen": 102.01, "applied": 102.03},
    ]
    got = sorted(enforcement_latencies(decisions, bandwidth, PODS))
    assert got == [pytest.approx((0.01, 0.02)), pytest.approx((0.01, 0.03))]


def test_table_shows_runs_side_by_side() -> None:
    run = summarise_cluster_run(
        synthetic_run(), setup=SETUP, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent"
    )
    report = build_cluster_report(
        {"lab": {}}, {"cluster_scope": run, "node_scope": {"skipped": "no node scope here"}}
    )
    assert report["kind"] == "cluster"
    text = format_cluster_table(report)
    header = text.splitlines()[0]
    assert "cluster scope" in header
    assert "node scope" in header
    assert "robot-control@node-a" in text
    assert "best effort node-b, Mbit/s" in text
    assert "node_scope: skipped: no node scope here" in text
    assert "telemetry=80" in text


def test_plot_writes_the_runs_side_by_side(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from detnet.lab.plot import plot_cluster

    data = synthetic_run()
    with_limits = ClusterRunData(
        probes=data.probes,
        goodput=data.goodput,
        bandwidth=[{"node": "node-a", "pod": "telemetry-upload-abc-12345", "t_s": 2.5,
                    "rate_bytes_per_s": 10_000_000}],
    )  # fmt: skip
    path = tmp_path / "cluster.png"
    plot_cluster({"without_controller": data, "cluster_scope": with_limits}, TIMELINE, path,
                 nodes=["node-a", "node-b"])  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_view_line(tmp_path: Path) -> None:
    from detnet.lab.cluster.recording import ClusterRecorder
    from detnet.lab.live import ClusterLiveView

    rec = ClusterRecorder(
        stream=tmp_path / "none.jsonl",
        endpoint_of=lambda r: None,
        node_of_ip={"198.18.1.12": "node-a", "198.18.2.11": "node-b"},
    )
    rec.probes["robot-control@node-a"] = [(4.5, 2.0), (4.9, 4.0)]
    rec.t0 = 100.0
    rec.sink_line(b'{"ts": 105.0, "bytes": {"198.18.1.12": 8875000, "198.18.2.11": 7250000}}')
    rec.control_line(
        b'{"event": "decision", "ts": 104.0, "limits": {"telemetry-upload@node-a": 80}}'
    )
    out = io.StringIO()
    view = ClusterLiveView(out)
    view("cluster_scope", 5.0, "congestion", rec)
    view.close()
    line = out.getvalue()
    assert "robot@node-a   3.00 ms" in line
    assert "a: 71.0 b: 58.0" in line
    assert "tel@node-a=80" in line
    assert rec.run_data([]).decisions[0]["t_s"] == 4.0


def test_a_knee_step_on_the_congested_node() -> None:
    # The step at 4 s: node-a's uplink 100 -> 50 Mbit/s; node-b keeps its 100.
    setup = dataclasses.replace(SETUP, step_at_s=4.0, stepped_uplink_mbps=50.0)
    run = summarise_cluster_run(
        synthetic_run(), setup=setup, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent"
    )
    # From the protection (4 s) on, node-a's spare capacity is 50: 60 Mbit/s of it is 1.2.
    assert run["best_effort_utilisation"] == pytest.approx(1.2)
    # Over the congestion (2..8 s): 2 s at 100 and 4 s at 50, a mean of 200/3.
    assert run["nodes"]["node-a"]["utilisation"] == pytest.approx(70.0 / (200.0 / 3))
    assert run["nodes"]["node-b"]["utilisation"] == pytest.approx(0.58)
    step = run["step"]
    assert (step["at_s"], step["broke"], step["recovery_s"]) == (4.0, False, 0.0)
    assert step["best_effort_mbps_before"] == pytest.approx(90.0)  # the reports of 3..4 s
    assert step["best_effort_mbps_after"] == pytest.approx(60.0)
    text = format_cluster_table(build_cluster_report({"lab": {"step": "knee"}}, {"cs": run}))
    assert "cs: knee step at 4.0 s: SLO held" in text


def test_a_load_step_leaves_the_capacity_alone() -> None:
    setup = dataclasses.replace(SETUP, step_at_s=3.0)
    run = summarise_cluster_run(
        synthetic_run(), setup=setup, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent"
    )
    assert run["best_effort_utilisation"] == pytest.approx(0.6)
    assert run["nodes"]["node-a"]["utilisation"] == pytest.approx(0.7)
    step = run["step"]
    # robot-control@node-a queues until 4 s: the windows from 3 s break, from 4 s hold.
    assert (step["broke"], step["recovery_s"]) == (True, pytest.approx(1.0))
    assert "step" not in summarise_cluster_run(
        synthetic_run(), setup=SETUP, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent"
    )


def test_a_window_outside_the_slo_after_protection_names_the_endpoint() -> None:
    data = synthetic_run()
    # robot-control@node-a relapses for the window from 6 s: p99 past its 5 ms
    probes = dict(data.probes)
    probes["robot-control@node-a"] = [
        (t, 9.0 if 6.0 <= t < 7.0 and i % 10 == 0 else rtt)
        for i, (t, rtt) in enumerate(probes["robot-control@node-a"])
    ]
    run = summarise_cluster_run(
        ClusterRunData(probes=probes, goodput=data.goodput, decisions=data.decisions),
        setup=SETUP, timeline=TIMELINE, enforcer="kubernetes", usage_source="agent",
    )  # fmt: skip
    assert run["slo_attainment"] == pytest.approx(3 / 4)
    assert [w["t_s"] for w in run["missed_windows"]] == [6.0]
    (why,) = run["missed_windows"][0]["breaches"]["robot-control@node-a"]
    assert why.startswith("latency 9.00 > 5.00")
    text = format_cluster_table(build_cluster_report({"lab": {}}, {"cluster_scope": run}))
    assert "cluster scope: windows outside the SLO: 6.0 s (robot-control@node-a latency" in text
