"""The policy under ``scope: node``: endpoints on nodes, cuts only where the congestion
is, escalation, and the invariants that hold per node."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.controller.aimd import (
    AsymmetricAimd,
    Decision,
    Endpoint,
    Observation,
    PolicyParams,
    Scope,
    Slo,
)
from detnet.engine.stats import WindowStats
from tests.unit.test_aimd import MS, S, window

SLOS = [Slo(app="robot", max_jitter_ms=1.0, max_queue_delay_ms=2.0)]
ENDPOINTS = {
    "robot/a": Endpoint("robot", node="node-a", pod="robot-1"),
    "robot/b": Endpoint("robot", node="node-b", pod="robot-2"),
}
PLACEMENTS = {"telemetry": frozenset({"node-a", "node-b"}), "erp": frozenset({"node-b"})}
A_TEL, B_TEL, B_ERP = (
    Scope("telemetry", "node-a"),
    Scope("telemetry", "node-b"),
    Scope("erp", "node-b"),
)


def policy(**overrides: object) -> AsymmetricAimd:
    params = PolicyParams(**{"scope": "node", "min_bandwidth": 10, **overrides})  # type: ignore[arg-type]
    return AsymmetricAimd(params=params, slos=SLOS, workloads={"telemetry": None, "erp": None})


def stats(
    a: WindowStats | None = None, b: WindowStats | None = None
) -> dict[str, WindowStats | None]:
    return {"robot/a": a or window("robot/a"), "robot/b": b or window("robot/b")}


def step(
    p: AsymmetricAimd,
    t: int,
    st_: Mapping[str, WindowStats | None],
    limits: Mapping[Scope, int],
    usage: Mapping[Scope, float] | None = None,
    placements: Mapping[str, frozenset[str]] = PLACEMENTS,
) -> Decision:
    obs = Observation(stats=st_, endpoints=ENDPOINTS, usage=usage or {}, placements=placements)
    return p.decide(now_ns=t, observation=obs, limits=limits)


def test_scopes_follow_placements() -> None:
    p = policy()
    assert p.scopes(PLACEMENTS) == [A_TEL, B_TEL, B_ERP]
    # A workload whose pods are not placed yet keeps one cluster-wide scope.
    assert p.scopes({"telemetry": frozenset({"node-a"})}) == [A_TEL, Scope("erp")]
    assert policy(scope="cluster").scopes(PLACEMENTS) == [Scope("telemetry"), Scope("erp")]


def test_a_violation_cuts_only_the_pods_on_its_node() -> None:
    p = policy()
    limits = {A_TEL: 100, B_TEL: 100, B_ERP: 100}
    usage = {A_TEL: 90.0, B_TEL: 50.0, B_ERP: 40.0}
    d = step(p, 10 * S, stats(a=window("robot/a", jitter_ms=3.0)), limits, usage)
    assert d.action == "decrease"
    assert dict(d.limits) == {A_TEL: 72, B_TEL: 100, B_ERP: 100}
    assert d.cut_nodes == ("node-a",)
    assert any(r.startswith("robot/a on node-a jitter_iqr 3.00 ms") for r in d.reasons)
    assert "node-a: cut 20%" in d.reasons


def test_a_service_address_target_concerns_every_node() -> None:
    p = policy()
    limits = {A_TEL: 100, B_TEL: 100, B_ERP: 100}
    obs = Observation(
        stats={"robot": window("robot", jitter_ms=3.0)}, placements=PLACEMENTS, usage={}
    )
    d = p.decide(now_ns=0, observation=obs, limits=limits)
    assert dict(d.limits) == {A_TEL: 80, B_TEL: 80, B_ERP: 80}


def test_an_app_without_ready_endpoints_holds_everywhere() -> None:
    p = policy()
    limits = {A_TEL: 100, B_TEL: 100, B_ERP: 100}
    obs = Observation(stats={}, endpoints={}, placements=PLACEMENTS)
    d = p.decide(now_ns=0, observation=obs, limits=limits)
    assert d.action == "hold"
    assert "robot no data" in d.reasons


def test_increase_is_per_node() -> None:
    p = policy()
    limits = {A_TEL: 100, B_TEL: 100, B_ERP: 100}
    # node-a is above the stable fraction (held), node-b is stable: only node-b climbs.
    warm = stats(a=window("robot/a", jitter_ms=0.8))
    step(p, 0, warm, limits)
    d = step(p, 5 * S, warm, limits)
    assert d.action == "increase"
    assert dict(d.limits) == {A_TEL: 100, B_TEL: 110, B_ERP: 110}


def test_escalation_widens_the_cut_and_narrows_back() -> None:
    p = policy()
    # node-a has no best-effort pods: its violation cannot be relieved there.
    placements = {"telemetry": frozenset({"node-b"}), "erp": frozenset({"node-b"})}
    limits = {B_TEL: 100, B_ERP: 100}
    bad = stats(a=window("robot/a", jitter_ms=3.0))
    d = step(p, 0, bad, limits, placements=placements)
    assert d.action == "hold"
    assert "node-a: no best-effort pods" in d.reasons
    # ...for escalate_after (3) cooldowns of 1.5 s: then every node is cut.
    d = step(p, 4 * S, bad, limits, placements=placements)
    assert not d.escalated
    d = step(p, 9 * S // 2, bad, limits, placements=placements)
    assert d.escalated
    assert dict(d.limits) == {B_TEL: 80, B_ERP: 80}
    assert any(r.startswith("escalated: node-a") for r in d.reasons)
    # Healed: narrowed back, and node-b climbs again after its dwell.
    d = step(p, 5 * S, stats(), d.limits, placements=placements)
    assert not d.escalated
    d = step(p, 10 * S, stats(), d.limits, placements=placements)
    assert d.action == "increase"


def test_a_new_node_starts_at_the_initial_limit() -> None:
    p = policy()
    d = step(p, 0, stats(), {A_TEL: 50})
    assert dict(d.previous) == {A_TEL: 50, B_TEL: 1000, B_ERP: 1000}


def test_resume_from_a_recorded_cluster_limit() -> None:
    p = policy()
    limits = p.initial_limits({Scope("telemetry"): 300, B_ERP: 40}, PLACEMENTS)
    assert limits == {A_TEL: 300, B_TEL: 300, B_ERP: 40}


def test_evidence_starts_after_the_cut_took_effect_on_that_node_only() -> None:
    p = policy(effect_delay_s=0.5)
    limits = {A_TEL: 100, B_TEL: 100, B_ERP: 100}
    step(p, 10 * S, stats(a=window("robot/a", jitter_ms=3.0)), limits, {A_TEL: 90.0})
    assert p.evidence_since(ENDPOINTS) == {"robot/a": 10 * S + S // 2}


# ------------------------------------------------------------------- invariants

node_step = st.fixed_dictionaries(
    {
        "dt_ms": st.integers(min_value=0, max_value=3000),
        "jitter_a": st.one_of(st.none(), st.floats(min_value=0.0, max_value=10.0)),
        "jitter_b": st.one_of(st.none(), st.floats(min_value=0.0, max_value=10.0)),
        "queue_a": st.floats(min_value=0.0, max_value=10.0),
        "usage": st.one_of(st.none(), st.floats(min_value=0.0, max_value=2000.0)),
    }
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(node_step, min_size=1, max_size=40), start=st.integers(1, 2000))
def test_node_invariants(steps: list[dict[str, object]], start: int) -> None:
    """A violation only on node-a never changes node-b's limits (unless the cut was
    escalated); limits stay within [min, max]; a node never climbs while it warns."""
    p = policy()
    limits: dict[Scope, int] = {A_TEL: start, B_TEL: start, B_ERP: start}
    now = 0
    for s in steps:
        now += int(s["dt_ms"]) * MS  # type: ignore[call-overload]
        a = window("robot/a", jitter_ms=s["jitter_a"], queue_ms=s["queue_a"])  # type: ignore[arg-type]
        b = window("robot/b", jitter_ms=s["jitter_b"])  # type: ignore[arg-type]
        used = s["usage"]
        usage = {} if used is None else {A_TEL: float(used), B_TEL: float(used)}  # type: ignore[arg-type]
        d = step(p, now, stats(a, b), limits, usage)
        for scope, mbit in d.limits.items():
            if mbit != limits[scope]:
                assert p.params.min_bandwidth <= mbit <= p.params.max_bandwidth
        b_violated = any(x.violated for x in d.signals if x.node == "node-b")
        if not b_violated and not d.escalated:
            assert d.limits[B_TEL] >= limits[B_TEL]
            assert d.limits[B_ERP] >= limits[B_ERP]
        a_violated = any(x.violated for x in d.signals if x.node == "node-a")
        if a_violated:
            assert d.limits[A_TEL] <= limits[A_TEL]
        a_warns = float(s["queue_a"]) > 0.2  # type: ignore[arg-type]  # 10 % of the 2 ms SLO
        if a_warns:
            assert d.limits[A_TEL] <= limits[A_TEL], "no climb on a node whose queue builds"
        limits = dict(d.limits)
