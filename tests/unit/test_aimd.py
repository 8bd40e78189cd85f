"""The asymmetric AIMD policy: table-driven cases and hypothesis invariants."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.controller.aimd import (
    BURST_MEMORY_S,
    MAX_DWELL_DOUBLINGS,
    MAX_DWELL_HALVINGS,
    UNCERTAIN_BAND,
    AsymmetricAimd,
    Decision,
    Observation,
    PolicyParams,
    Scope,
    Slo,
)
from detnet.engine.stats import WindowStats

S = 1_000_000_000  # ns per second
MS = 1_000_000  # ns per ms


def window(
    target: str,
    *,
    jitter_ms: float | None = 0.1,
    p99_ms: float | None = 1.0,
    queue_ms: float | None = 0.1,
    loss: float | None = 0.0,
    sent: int = 100,
) -> WindowStats:
    """A WindowStats with the four SLO signals set (others plausible)."""
    ns = lambda ms: None if ms is None else ms * MS  # noqa: E731
    return WindowStats(
        target=target,
        protocol="udp",
        timestamp_source="kernel",
        sent=sent,
        received=sent,
        lost=0,
        duplicates=0,
        reordered=0,
        loss_ratio=loss,
        rtt_min_ns=0.1 * MS,
        rtt_p50_ns=0.2 * MS,
        rtt_p90_ns=0.3 * MS,
        rtt_p99_ns=ns(p99_ms),
        rtt_max_ns=ns(p99_ms),
        jitter_iqr_ns=ns(jitter_ms),
        jitter_rfc3550_ns=0.05 * MS,
        ipdv_fwd_p50_ns=None,
        ipdv_fwd_p99_ns=None,
        ipdv_back_p50_ns=None,
        ipdv_back_p99_ns=None,
        base_rtt_ns=0.1 * MS,
        queue_delay_ns=ns(queue_ms),
    )


PARAMS = PolicyParams(
    decrease_factor=0.2,
    decrease_cooldown_s=1.5,
    increase_step=10,
    increase_interval_s=5.0,
    stable_fraction=0.5,
    min_bandwidth=10,
    max_bandwidth=1000,
)
SLOS = [
    Slo(app="robot-control", max_jitter_ms=1.0, max_latency_ms=10.0, max_loss_ratio=0.01),
    Slo(app="safety-scanner", max_latency_ms=20.0, max_queue_delay_ms=2.0),
]
WORKLOADS: dict[str, int | None] = {"telemetry": 100, "erp": None}


def healthy() -> dict[str, WindowStats | None]:
    return {"robot-control": window("robot-control"), "safety-scanner": window("safety-scanner")}


Placements = Mapping[str, frozenset[str]] | None  # per workload, the nodes of its pods


def decide(
    p: AsymmetricAimd,
    *,
    now_ns: int,
    stats: Mapping[str, WindowStats | None],
    limits: Mapping[str, int],
    usage: Mapping[str, float],
    placements: Placements = None,
) -> Decision:
    """One cluster-scope step with limits and usage keyed by workload name (and where
    each workload's pods run, if told)."""
    obs = Observation(
        stats=stats,
        usage={Scope(k): v for k, v in usage.items()},
        placements=placements or {},
    )
    return p.decide(now_ns=now_ns, observation=obs, limits={Scope(k): v for k, v in limits.items()})


def named(limits: Mapping[Scope, int]) -> dict[str, int]:
    """Limits keyed by ``str(scope)``: the workload under cluster scope."""
    return {str(s): v for s, v in limits.items()}


def policy(**overrides: object) -> AsymmetricAimd:
    params = PolicyParams(**{**PARAMS.__dict__, **overrides})
    return AsymmetricAimd(params=params, slos=SLOS, workloads=WORKLOADS)


# --------------------------------------------------------------------- table cases


@pytest.mark.parametrize(
    ("name", "stats", "limits", "usage", "action", "expected", "reason"),
    [
        (
            "jitter violation cuts every workload by 20%",
            {**healthy(), "robot-control": window("robot-control", jitter_ms=2.31)},
            {"telemetry": 100, "erp": 500},
            {},
            "decrease",
            {"telemetry": 80, "erp": 400},
            "robot-control jitter_iqr 2.31 ms > 1.00 ms",
        ),
        (
            "p99 latency violation",
            {**healthy(), "safety-scanner": window("safety-scanner", p99_ms=25.0)},
            {"telemetry": 100, "erp": 100},
            {},
            "decrease",
            {"telemetry": 80, "erp": 80},
            "safety-scanner latency_p99 25.00 ms > 20.00 ms",
        ),
        (
            "queue delay violation",
            {**healthy(), "safety-scanner": window("safety-scanner", queue_ms=8.6)},
            {"telemetry": 100, "erp": 100},
            {},
            "decrease",
            {"telemetry": 80, "erp": 80},
            "safety-scanner queue_delay 8.60 ms > 2.00 ms",
        ),
        (
            "loss above the limit is a violation",
            {**healthy(), "robot-control": window("robot-control", loss=0.05)},
            {"telemetry": 100, "erp": 100},
            {},
            "decrease",
            {"telemetry": 80, "erp": 80},
            "robot-control loss_ratio 0.0500 > 0.0100",
        ),
        (
            "cut from measured usage below the cap, so the first cut bites",
            {**healthy(), "robot-control": window("robot-control", jitter_ms=3.0)},
            {"telemetry": 1000, "erp": 1000},
            {"telemetry": 200.0, "erp": 1000.0},
            "decrease",
            {"telemetry": 160, "erp": 800},
            "robot-control jitter_iqr 3.00 ms > 1.00 ms",
        ),
        (
            "a cut never goes below min_bandwidth",
            {**healthy(), "robot-control": window("robot-control", jitter_ms=3.0)},
            {"telemetry": 11, "erp": 100},
            {},
            "decrease",
            {"telemetry": 10, "erp": 80},
            "robot-control jitter_iqr",
        ),
        (
            "violation with everything at the minimum holds",
            {**healthy(), "robot-control": window("robot-control", jitter_ms=3.0)},
            {"telemetry": 10, "erp": 10},
            {},
            "hold",
            {"telemetry": 10, "erp": 10},
            "every workload at min_bandwidth",
        ),
        (
            "no data holds and says which app",
            {"robot-control": None, "safety-scanner": window("safety-scanner")},
            {"telemetry": 100, "erp": 100},
            {},
            "hold",
            {"telemetry": 100, "erp": 100},
            "robot-control no data",
        ),
        (
            "an app missing from the stats is no data",
            {"safety-scanner": window("safety-scanner")},
            {"telemetry": 100, "erp": 100},
            {},
            "hold",
            {"telemetry": 100, "erp": 100},
            "robot-control no data",
        ),
        (
            "below the SLO but above the stable fraction holds",
            {**healthy(), "robot-control": window("robot-control", jitter_ms=0.8)},
            {"telemetry": 100, "erp": 100},
            {},
            "hold",
            {"telemetry": 100, "erp": 100},
            "robot-control jitter_iqr 0.80 ms <= 1.00 ms (above 50% of the SLO)",
        ),
        (
            "stable: first step only starts the dwell",
            healthy(),
            {"telemetry": 100, "erp": 100},
            {},
            "hold",
            {"telemetry": 100, "erp": 100},
            "dwell",
        ),
    ],
)
def test_table(
    name: str,
    stats: Mapping[str, WindowStats | None],
    limits: dict[str, int],
    usage: dict[str, float],
    action: str,
    expected: dict[str, int],
    reason: str,
) -> None:
    d = decide(policy(), now_ns=10 * S, stats=stats, limits=limits, usage=usage)
    assert d.action == action, name
    assert named(d.limits) == expected, name
    assert any(reason in r for r in d.reasons), (name, d.reasons)
    assert named(d.previous) == limits


def test_unset_threshold_is_not_evaluated() -> None:
    # robot-control has no queue-delay SLO: a huge queue delay there changes nothing.
    p = policy()
    stats = {**healthy(), "robot-control": window("robot-control", queue_ms=500.0)}
    d = decide(p, now_ns=0, stats=stats, limits={"telemetry": 100, "erp": 100}, usage={})
    assert d.action == "hold"
    assert not d.violated
    assert {(s.target, s.signal) for s in d.signals} == {
        ("robot-control", "jitter"),
        ("robot-control", "latency"),
        ("robot-control", "loss"),
        ("safety-scanner", "latency"),
        ("safety-scanner", "queue_delay"),
    }


def test_cooldown_allows_one_cut_then_the_next() -> None:
    p = policy()
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    limits = {"telemetry": 100, "erp": 100}
    usage = {"telemetry": 100.0, "erp": 100.0}
    d1 = decide(p, now_ns=10 * S, stats=bad, limits=limits, usage=usage)
    assert d1.action == "decrease"
    usage = {"telemetry": 80.0, "erp": 80.0}
    d2 = decide(p, now_ns=10 * S + 1 * S, stats=bad, limits=named(d1.limits), usage=usage)
    assert d2.action == "hold"
    assert any("cooldown" in r for r in d2.reasons)
    assert named(d2.limits) == named(d1.limits)
    d3 = decide(p, now_ns=10 * S + 3 * S // 2, stats=bad, limits=named(d2.limits), usage=usage)
    assert d3.action == "decrease"
    assert named(d3.limits) == {"telemetry": 64, "erp": 64}


def test_a_blind_cut_without_effect_is_followed_by_a_deeper_one_at_once() -> None:
    # Usage unknown: the cut starts from a cap far above the traffic and changes nothing.
    p = policy(effect_delay_s=0.5)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    limits = {"telemetry": 1000, "erp": 1000}
    t = 10 * S
    d = decide(p, now_ns=t, stats=bad, limits=limits, usage={})
    assert named(d.limits) == {"telemetry": 800, "erp": 800}
    assert any("from the cap" in r for r in d.reasons)
    # Before the cut can have shown any effect: the cooldown holds.
    d = decide(p, now_ns=t + S // 4, stats=bad, limits=named(d.limits), usage={})
    assert d.action == "hold"
    cuts = []
    for k in range(1, 6):
        d = decide(p, now_ns=t + k * 6 * S // 10, stats=bad, limits=named(d.limits), usage={})
        cuts.append(named(d.limits)["telemetry"])
    # 36 %, then 50 % (max_blind_factor) per step: 1000 -> 800 -> 512 -> 256 -> 128 -> 64 -> 32
    assert cuts == [512, 256, 128, 64, 32]


def test_a_blind_cut_that_helped_waits_for_the_cooldown() -> None:
    p = policy(effect_delay_s=0.5)
    limits = {"telemetry": 1000, "erp": 1000}
    t = 10 * S
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    d = decide(p, now_ns=t, stats=bad, limits=limits, usage={})
    better = {**healthy(), "robot-control": window("robot-control", jitter_ms=2.0)}
    d = decide(p, now_ns=t + 6 * S // 10, stats=better, limits=named(d.limits), usage={})
    assert d.action == "hold"
    assert any("cooldown" in r for r in d.reasons)


def test_increase_after_dwell_then_dwell_again() -> None:
    p = policy()
    limits = {"telemetry": 100, "erp": 100}
    assert decide(p, now_ns=0, stats=healthy(), limits=limits, usage={}).action == "hold"
    d = decide(p, now_ns=4 * S, stats=healthy(), limits=limits, usage={})
    assert d.action == "hold"
    d = decide(p, now_ns=5 * S, stats=healthy(), limits=limits, usage={})
    assert d.action == "increase"
    assert named(d.limits) == {"telemetry": 110, "erp": 110}
    # The dwell restarts after an increase.
    d2 = decide(p, now_ns=6 * S, stats=healthy(), limits=named(d.limits), usage={})
    assert d2.action == "hold"
    d3 = decide(p, now_ns=10 * S, stats=healthy(), limits=named(d.limits), usage={})
    assert d3.action == "increase"


def test_no_data_restarts_the_dwell() -> None:
    p = policy()
    limits = {"telemetry": 100, "erp": 100}
    decide(p, now_ns=0, stats=healthy(), limits=limits, usage={})
    decide(p, now_ns=3 * S, stats={"safety-scanner": None}, limits=limits, usage={})
    assert decide(p, now_ns=5 * S, stats=healthy(), limits=limits, usage={}).action == "hold"
    assert decide(p, now_ns=10 * S, stats=healthy(), limits=limits, usage={}).action == "increase"


def test_unused_cap_is_not_raised() -> None:
    p = policy()
    limits = {"telemetry": 100, "erp": 100}
    usage = {"telemetry": 95.0, "erp": 20.0}
    decide(p, now_ns=0, stats=healthy(), limits=limits, usage=usage)
    d = decide(p, now_ns=5 * S, stats=healthy(), limits=limits, usage=usage)
    assert d.action == "increase"
    assert named(d.limits) == {"telemetry": 110, "erp": 100}
    assert any("erp" in r and "unused" in r for r in d.reasons)


def test_cut_starts_from_mean_usage_over_the_usage_window() -> None:
    # A bursty workload's single readings swing; the cut starts from its mean rate.
    p = policy(usage_window_s=1.0)
    limits = {"telemetry": 100, "erp": 100}
    decide(p, now_ns=10 * S, stats=healthy(), limits=limits, usage={"telemetry": 70.0, "erp": 50.0})
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    lull = {"telemetry": 50.0, "erp": 40.0}
    d = decide(p, now_ns=10 * S + S // 2, stats=bad, limits=limits, usage=lull)
    assert d.action == "decrease"
    assert named(d.limits) == {"telemetry": 48, "erp": 36}


def test_cut_waits_for_a_mean_rate_after_a_ramp() -> None:
    p = policy(usage_window_s=1.0)
    limits = {"telemetry": 100, "erp": 100}
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    decide(p, now_ns=10 * S, stats=healthy(), limits=limits, usage={"telemetry": 2.0, "erp": 1.0})
    # The burst starts: the first reading covers partly idle time, the next ones swing.
    readings = [(30.0, 20.0), (80.0, 25.0), (40.0, 28.0)]
    t = 10 * S
    decisions = []
    for tel, erp in readings:
        t += S // 10
        decisions.append(
            decide(p, now_ns=t, stats=bad, limits=limits, usage={"telemetry": tel, "erp": erp})
        )
    # It waits 0.2 s (a fifth of the usage window) for a mean.
    assert [d.action for d in decisions] == ["hold", "hold", "decrease"]
    assert any("usage ramping up (telemetry for 0.0 s" in r for r in decisions[0].reasons)
    # From the mean of the readings since the ramp began: telemetry 50, erp 24.3.
    assert named(decisions[-1].limits) == {"telemetry": 40, "erp": 19}


def test_a_burst_shorter_than_a_reading_still_counts() -> None:
    # An upload that fits in one reading (6 MB in under 250 ms at 400 Mbit/s) is a ramp
    # and the whole burst at once: it is the workload's usage until the mean forgets it,
    # never "quiet", so a violation cuts it.
    p = policy(usage_window_s=1.0)
    limits = {"telemetry": 1000, "erp": 400}
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    t = 10 * S
    for tel in (0.0, 0.0, 180.0, 0.0, 0.0):
        decide(p, now_ns=t, stats=healthy(), limits=limits, usage={"telemetry": tel, "erp": 300.0})
        t += STEP_NS
    d = decide(p, now_ns=t, stats=bad, limits=limits, usage={"telemetry": 0.0, "erp": 300.0})
    assert d.action == "decrease"
    assert named(d.limits)["telemetry"] == 36  # 20 % under its mean of 45 since the burst
    assert d.usage[Scope("telemetry")] == 45.0


def test_flat_usage_is_cut_at_once() -> None:
    p = policy(usage_window_s=1.0)
    limits = {"telemetry": 100, "erp": 100}
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    decide(p, now_ns=10 * S, stats=healthy(), limits=limits, usage={"telemetry": 60.0, "erp": 45.0})
    d = decide(
        p, now_ns=10 * S + S // 10, stats=bad, limits=limits, usage={"telemetry": 61.0, "erp": 44.0}
    )
    assert d.action == "decrease"


def test_usage_older_than_the_window_is_forgotten() -> None:
    p = policy(usage_window_s=1.0)
    limits = {"telemetry": 100, "erp": 100}
    decide(p, now_ns=10 * S, stats=healthy(), limits=limits, usage={"telemetry": 60.0, "erp": 50.0})
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    d = decide(p, now_ns=12 * S, stats=bad, limits=limits, usage={"telemetry": 30.0, "erp": 25.0})
    assert named(d.limits) == {"telemetry": 24, "erp": 20}


def test_all_idle_holds_with_reason() -> None:
    p = policy()
    limits = {"telemetry": 100, "erp": 100}
    usage = {"telemetry": 1.0, "erp": 2.0}
    decide(p, now_ns=0, stats=healthy(), limits=limits, usage=usage)
    d = decide(p, now_ns=6 * S, stats=healthy(), limits=limits, usage=usage)
    assert d.action == "hold"
    assert "not raising unused caps: telemetry, erp" in d.reasons[0]


def test_increase_clamps_to_max() -> None:
    p = policy()
    limits = {"telemetry": 995, "erp": 1000}
    decide(p, now_ns=0, stats=healthy(), limits=limits, usage={})
    d = decide(p, now_ns=5 * S, stats=healthy(), limits=limits, usage={})
    assert named(d.limits) == {"telemetry": 1000, "erp": 1000}
    d = decide(p, now_ns=10 * S, stats=healthy(), limits=named(d.limits), usage={})
    assert d.action == "hold"
    assert d.reasons == ("every workload at max_bandwidth",)


def test_initial_limits_prefer_recorded_then_initial_then_max() -> None:
    p = policy()
    assert named(p.initial_limits()) == {"telemetry": 100, "erp": 1000}
    recorded = {Scope("erp"): 42, Scope("other"): 5}
    assert named(p.initial_limits(recorded)) == {"telemetry": 100, "erp": 42}
    assert named(p.initial_limits({Scope("telemetry"): 5000})) == {"telemetry": 1000, "erp": 1000}


def test_severity_multiplier_compounds_the_cut() -> None:
    p = policy(severity_max_multiplier=5.0)
    stats = {**healthy(), "robot-control": window("robot-control", jitter_ms=2.0)}
    d = decide(p, now_ns=0, stats=stats, limits={"telemetry": 100, "erp": 1000}, usage={})
    # 2x over the threshold: two 20 % cuts at once, 1 - 0.8**2 = 36 %.
    assert named(d.limits) == {"telemetry": 64, "erp": 640}


def test_missing_limits_start_from_initial() -> None:
    p = policy()
    stats = {**healthy(), "robot-control": window("robot-control", jitter_ms=2.0)}
    d = decide(p, now_ns=0, stats=stats, limits={}, usage={})
    assert named(d.previous) == {"telemetry": 100, "erp": 1000}
    assert named(d.limits) == {"telemetry": 80, "erp": 800}


@pytest.mark.parametrize(
    "bad",
    [
        {"decrease_factor": 0.0},
        {"decrease_factor": 1.0},
        {"min_bandwidth": 0},
        {"min_bandwidth": 100, "max_bandwidth": 50},
        {"increase_step": 0},
        {"stable_fraction": 0.0},
        {"decrease_cooldown_s": -1.0},
        {"severity_max_multiplier": 0.5},
    ],
)
def test_bad_params_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        PolicyParams(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------- invariants

signal_values = st.one_of(st.none(), st.floats(min_value=0.0, max_value=50.0))
step = st.fixed_dictionaries(
    {
        "dt_ms": st.integers(min_value=0, max_value=3000),
        "jitter": signal_values,
        "p99": signal_values,
        "queue": signal_values,
        "loss": st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)),
        "missing": st.booleans(),
        "usage": st.one_of(st.none(), st.floats(min_value=0.0, max_value=2000.0)),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(step, min_size=1, max_size=40),
    start=st.integers(min_value=1, max_value=5000),
    severity=st.sampled_from([1.0, 5.0]),
)
def test_invariants(steps: list[dict[str, object]], start: int, severity: float) -> None:
    params = PolicyParams(min_bandwidth=10, max_bandwidth=1000, severity_max_multiplier=severity)
    p = AsymmetricAimd(params=params, slos=SLOS, workloads={"telemetry": None, "erp": 50})
    limits = {"telemetry": start, "erp": start}
    now = 0
    last_cut: int | None = None
    last_trim: int | None = None
    last_blind = False
    stable_since: int | None = None
    for s in steps:
        now += int(s["dt_ms"]) * MS  # type: ignore[call-overload]
        rc = window(
            "robot-control",
            jitter_ms=s["jitter"],  # type: ignore[arg-type]
            p99_ms=s["p99"],  # type: ignore[arg-type]
            queue_ms=s["queue"],  # type: ignore[arg-type]
            loss=s["loss"],  # type: ignore[arg-type]
        )
        stats = {"robot-control": None if s["missing"] else rc}
        stats["safety-scanner"] = window("safety-scanner")
        usage = {} if s["usage"] is None else {"telemetry": float(s["usage"])}  # type: ignore[arg-type]
        d = decide(p, now_ns=now, stats=stats, limits=limits, usage=usage)
        # Always whole Mbit/s within [min, max] (the start may be outside: it gets clamped
        # only when it changes, so check the decided limits of changed workloads).
        for name, mbit in named(d.limits).items():
            if mbit != limits[name]:
                assert params.min_bandwidth <= mbit <= params.max_bandwidth
                assert isinstance(mbit, int)
        assert d.reasons, "every decision says why"
        if d.violated:
            assert d.action != "increase"
            assert all(named(d.limits)[n] <= limits[n] for n in limits)
            stable_since = None
        trim = any("trimming under the knee" in r for r in d.reasons)
        if d.action == "decrease" and trim:
            # An early-warning trim: at most one per cooldown after any step back.
            for last in (last_cut, last_trim):
                assert last is None or now - last >= round(params.decrease_cooldown_s * S)
            last_trim = now
        elif d.action == "decrease":
            if last_cut is not None and now - last_cut < round(params.decrease_cooldown_s * S):
                # Only a blind cut (usage unknown) may be followed within the cooldown,
                # and only after its effect had time to show.
                assert last_blind
                assert now - last_cut >= round(params.effect_delay_s * S)
            if last_trim is not None:  # a trim needs no cooldown, but its effect is due
                assert now - last_trim >= round(params.effect_delay_s * S)
            assert all(named(d.limits)[n] <= limits[n] for n in limits)
            last_cut, last_blind = now, not usage or "erp" not in usage
        all_stable = (not d.no_data) and all(x.stable for x in d.signals)
        if not all_stable:
            stable_since = None
        elif stable_since is None:
            stable_since = now
        if d.action == "increase":
            assert all_stable
            assert not d.violated
            assert not d.no_data
            assert stable_since is not None
            assert now - stable_since >= round(params.increase_interval_s * S)
            assert all(named(d.limits)[n] >= limits[n] for n in limits)
            stable_since = now
        if d.action == "hold":
            assert named(d.limits) == limits
        limits = named(d.limits)


def test_a_knee_passed_without_a_warning_moves_up_and_fades() -> None:
    # Congestion at 100 Mbit/s of usage: the knee. Later the caps stand well past it
    # (twice the margin) without any warning: the knee moved up (a faster link, less
    # critical traffic) but the caps are still near it, so the climb goes on in small
    # steps (a +10 jump here broke the SLO in the lab); once the memory fades, normal steps.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    full = {"telemetry": 100.0, "erp": 100.0}
    d = decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 100, "erp": 100}, usage=full)
    assert d.action == "decrease"
    t, limits = 20 * S, {"telemetry": 105, "erp": 105}
    using = {"telemetry": 105.0, "erp": 105.0}
    decide(p, now_ns=t, stats=healthy(), limits=limits, usage=using)
    d = decide(p, now_ns=t + 5 * S, stats=healthy(), limits=limits, usage=using)
    assert d.action == "increase"
    assert named(d.limits) == {"telemetry": 106, "erp": 106}
    faded = 10 * S + round(p.params.knee_memory_s * 1e9) + S
    decide(p, now_ns=faded, stats=healthy(), limits=limits, usage=using)
    d = decide(p, now_ns=faded + 5 * S, stats=healthy(), limits=limits, usage=using)
    assert named(d.limits) == {"telemetry": 115, "erp": 115}
    # Just past the knee, it is still remembered: a small step.
    p = policy(usage_window_s=0.0)
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 100, "erp": 100}, usage=full)
    limits, using = {"telemetry": 101, "erp": 101}, {"telemetry": 101.0, "erp": 101.0}
    decide(p, now_ns=t, stats=healthy(), limits=limits, usage=using)
    d = decide(p, now_ns=t + 5 * S, stats=healthy(), limits=limits, usage=using)
    assert named(d.limits) == {"telemetry": 102, "erp": 102}


# ----------------------------------------------------- the knee: properties of the climb

STEP_NS = 250 * MS  # the default control interval


def run_flat(p: AsymmetricAimd, queue_ms: float, limits: dict[str, int], until_ns: int) -> int:
    """Healthy steps (usage at the caps, robot-control's queue flat at ``queue_ms``) from
    0 to ``until_ns``; ``limits`` follow the decisions. The time of the first increase."""
    first = -1
    for now in range(0, until_ns, STEP_NS):
        stats = {**healthy(), "robot-control": window("robot-control", queue_ms=queue_ms)}
        d = decide(p, now_ns=now, stats=stats, limits=limits, usage=dict(limits))
        limits.update(named(d.limits))
        if d.action == "increase" and first < 0:
            first = now
    return first


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(min_value=20, max_value=900),
    q0=st.floats(min_value=0.0, max_value=0.3),
    rise=st.floats(min_value=1.0, max_value=3.0),
    lead=st.integers(min_value=0, max_value=3),
)
def test_never_an_increase_while_the_queue_is_rising(
    start: int, q0: float, rise: float, lead: int
) -> None:
    # The queue rises by `rise` times the warning level: the larger of the early-warning
    # fraction of robot-control's tightest threshold (1 ms) and three times its noise floor
    # (q0): a rise the issue calls real. It starts `lead` steps before an increase is due
    # and stays up for a second.
    delta = rise * max(PARAMS.early_warning_fraction * 1.0, 3 * q0)
    runs = {}
    for name, step_ms in (("rising", delta), ("flat", 0.0)):
        p = policy(usage_window_s=0.0)
        limits = {"telemetry": start, "erp": start}
        first = run_flat(p, q0, limits, 6 * S)
        assert first >= 0, "a healthy, used cap climbs"
        due = first + round(PARAMS.increase_interval_s * S)
        jump = due - lead * STEP_NS
        for now in range(6 * S, jump, STEP_NS):  # flat up to the jump
            stats = {**healthy(), "robot-control": window("robot-control", queue_ms=q0)}
            limits.update(
                named(decide(p, now_ns=now, stats=stats, limits=limits, usage=dict(limits)).limits)
            )
        actions = []
        for now in range(jump, jump + S, STEP_NS):
            q = q0 + step_ms
            stats = {**healthy(), "robot-control": window("robot-control", queue_ms=q)}
            d = decide(p, now_ns=now, stats=stats, limits=limits, usage=dict(limits))
            limits.update(named(d.limits))
            actions.append(d.action)
        runs[name] = actions
    assert "increase" in runs["flat"]  # the twin without the rise climbs in that second
    assert "increase" not in runs["rising"], runs


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.booleans(),  # violated
            # Usage unknown, or sending more than min_bandwidth (a workload sending less is
            # not cut: test_a_quiet_workload_is_not_cut).
            st.one_of(st.none(), st.floats(min_value=PARAMS.min_bandwidth + 1, max_value=1500.0)),
        ),
        min_size=2,
        max_size=60,
    ),
    start=st.integers(min_value=11, max_value=1000),
)
def test_a_violation_cuts_within_one_step_after_the_cooldown(
    steps: list[tuple[bool, float | None]], start: int
) -> None:
    p = policy()
    limits = {"telemetry": start, "erp": start}
    cooldown = round(PARAMS.decrease_cooldown_s * S)
    last_cut: int | None = None
    overdue = 0  # consecutive violated steps, past the cooldown, with something to cut
    for i, (violated, usage) in enumerate(steps):
        now = i * STEP_NS
        stats = healthy()
        if violated:
            stats["robot-control"] = window("robot-control", jitter_ms=3.0)
        used = {} if usage is None else {"telemetry": usage, "erp": usage}
        cuttable = any(v > PARAMS.min_bandwidth for v in limits.values())
        ready = last_cut is None or now - last_cut >= cooldown
        d = decide(p, now_ns=now, stats=stats, limits=limits, usage=used)
        if d.action == "decrease":
            last_cut, overdue = now, 0
        elif violated and ready and cuttable:
            overdue += 1
            assert overdue < 2, f"step {i}: a violation past the cooldown not cut: {d.reasons}"
        else:
            overdue = 0
        limits = named(d.limits)


def test_a_quiet_workload_is_not_cut() -> None:
    # A violation while telemetry sends 4 Mbit/s (under min_bandwidth, 10): a cut to 10
    # would not slow it, only starve it later; erp, which sends, is cut.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    limits = {"telemetry": 1000, "erp": 100}
    d = decide(p, now_ns=10 * S, stats=bad, limits=limits, usage={"telemetry": 4.0, "erp": 90.0})
    assert (d.action, named(d.limits)) == ("decrease", {"telemetry": 1000, "erp": 72})
    # Both quiet: nothing to cut, and the policy says why.
    p = policy(usage_window_s=0.0)
    d = decide(p, now_ns=10 * S, stats=bad, limits=limits, usage={"telemetry": 4.0, "erp": 9.5})
    assert (d.action, named(d.limits)) == ("hold", limits)
    assert any("nothing to cut: telemetry, erp send at most min_bandwidth" in r for r in d.reasons)


def test_a_warning_while_unstable_trims_before_the_violation() -> None:
    # The caps climbed to 101 Mbit/s each, past a knee noted at 100; the next step robot-
    # control's p99 is above the stable fraction (not yet over its SLO) and its recent
    # queue has risen far past the early-warning level: step back now, one small step,
    # instead of holding until the violation forces a 20 % cut.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    full = {"telemetry": 100.0, "erp": 100.0}
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 100, "erp": 100}, usage=full)
    limits, using = {"telemetry": 101, "erp": 101}, {"telemetry": 101.0, "erp": 101.0}
    for t in range(20, 30):
        decide(p, now_ns=t * S, stats=healthy(), limits=limits, usage=using)
    building = {**healthy(), "robot-control": window("robot-control", p99_ms=7.0, queue_ms=3.0)}
    d = decide(p, now_ns=30 * S, stats=building, limits=limits, usage=using)
    assert not d.violated
    assert d.action == "decrease"
    assert all(99 <= v < 101 for v in named(d.limits).values()), d.limits
    assert any("trimming under the knee" in r for r in d.reasons), d.reasons
    # The same unstable step with a flat queue only holds.
    p = policy(usage_window_s=0.0)
    for t in range(20, 30):
        decide(p, now_ns=t * S, stats=healthy(), limits=limits, usage=using)
    unstable = {**healthy(), "robot-control": window("robot-control", p99_ms=7.0)}
    d = decide(p, now_ns=30 * S, stats=unstable, limits=limits, usage=using)
    assert (d.action, named(d.limits)) == ("hold", limits)


def test_a_knee_that_moved_down_is_approached_by_halves() -> None:
    # Congestion at 100 each: the knee. Later a violation at caps of 90, under it: the
    # link slowed. The full cut (to 72), and 90 + 90 is only an upper bound on the new
    # knee of the two together: they climb by a twentieth of their load (7 Mbit/s of 144,
    # together), not all the way to 2 % under it.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 100, "erp": 100},
           usage={"telemetry": 100.0, "erp": 100.0})  # fmt: skip
    caps = {"telemetry": 90, "erp": 90}
    d = decide(p, now_ns=20 * S, stats=bad, limits=caps, usage={"telemetry": 90.0, "erp": 90.0})
    assert named(d.limits) == {"telemetry": 72, "erp": 72}
    caps = named(d.limits)
    using = {"telemetry": 72.0, "erp": 72.0}
    decide(p, now_ns=22 * S, stats=healthy(), limits=caps, usage=using)
    d = decide(p, now_ns=24 * S, stats=healthy(), limits=caps, usage=using)
    assert d.action == "increase"
    assert named(d.limits) == {"telemetry": 75, "erp": 76}  # the odd one to the first name


def test_only_a_mild_first_overshoot_is_cut_gently() -> None:
    # The knee is remembered at 100; the caps climbed to 101. A mild violation (1.5x its
    # threshold) steps back under the knee (98); if that does not end it, the next cut
    # after the cooldown is the full 20 %. A violation 5x over gets the 20 % at once.
    def knee_at_100() -> AsymmetricAimd:
        p = policy(usage_window_s=0.0)
        decide(p, now_ns=10 * S, stats=bad(5.0), limits={"telemetry": 100, "erp": 100},
               usage={"telemetry": 100.0, "erp": 100.0})  # fmt: skip
        return p

    def bad(ms: float) -> dict[str, WindowStats | None]:
        return {**healthy(), "robot-control": window("robot-control", jitter_ms=ms)}

    caps, using = {"telemetry": 101, "erp": 101}, {"telemetry": 101.0, "erp": 101.0}
    p = knee_at_100()
    d = decide(p, now_ns=20 * S, stats=bad(1.5), limits=caps, usage=using)
    assert named(d.limits) == {"telemetry": 98, "erp": 98}
    d = decide(p, now_ns=22 * S, stats=bad(1.5), limits=named(d.limits),
               usage={"telemetry": 98.0, "erp": 98.0})  # fmt: skip
    assert (d.action, named(d.limits)) == ("decrease", {"telemetry": 78, "erp": 78})
    p = knee_at_100()
    d = decide(p, now_ns=20 * S, stats=bad(5.0), limits=caps, usage=using)
    assert named(d.limits) == {"telemetry": 80, "erp": 80}


def test_a_bursty_workload_between_bursts_keeps_its_room() -> None:
    # The link's knee is at 100 Mbit/s of the two workloads' summed rate. telemetry
    # uploads at its cap (40), then falls silent between uploads; erp runs at its cap (58).
    # Counting telemetry with what it sends now would let erp climb into the room its
    # next upload needs (the lab's "+10 Mbit/s, then a violation"): its last peak counts.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    limits = {"telemetry": 40, "erp": 60}
    d = decide(p, now_ns=10 * S, stats=bad, limits=limits, usage={"telemetry": 40.0, "erp": 60.0})
    assert d.action == "decrease"
    limits = {"telemetry": 40, "erp": 58}  # back under the knee: 98
    t = 12 * S
    decide(p, now_ns=t, stats=healthy(), limits=limits, usage={"telemetry": 40.0, "erp": 58.0})
    silent = {"telemetry": 0.5, "erp": 58.0}
    for k in range(1, 7):  # 6 s: past the dwell, within the burst memory
        d = decide(p, now_ns=t + k * S, stats=healthy(), limits=limits, usage=silent)
        before, limits = sum(limits.values()), named(d.limits)
        assert sum(limits.values()) - before <= 1  # fine steps at the knee, never +10
    # Silent for longer than the memory: the room is the others' again.
    for k in range(7, 30):
        d = decide(p, now_ns=t + k * S, stats=healthy(), limits=limits, usage=silent)
        limits = named(d.limits)
    assert limits["erp"] >= 68


def _at_the_knee(
    p: AsymmetricAimd,
    limits: dict[str, int],
    used: dict[str, float],
    placements: Placements = None,
) -> int:
    """Note the group's knee at the summed usage (a violation with every cap bitten) at
    10 s; the time from which that reading is out of the burst memory."""
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    d = decide(p, now_ns=10 * S, stats=bad, limits=limits, usage=used, placements=placements)
    assert d.action == "decrease"
    return 10 * S + round(BURST_MEMORY_S * 1e9) + S


def _after_a_dwell(
    p: AsymmetricAimd,
    t: int,
    limits: dict[str, int],
    used: dict[str, float],
    placements: Placements = None,
) -> Decision:
    """Healthy at ``limits`` (the caps climbed back) from ``t`` until past the dwell."""
    decide(p, now_ns=t, stats=healthy(), limits=limits, usage=used, placements=placements)
    later = t + 6 * S
    return decide(
        p, now_ns=later, stats=healthy(), limits=limits, usage=used, placements=placements
    )


def test_at_the_knee_an_unused_cap_goes_to_the_workloads_using_theirs() -> None:
    # telemetry's cap is 60 but it sends no more than 40; erp uses its 40 whole.
    p = policy(usage_window_s=0.0)
    limits = {"telemetry": 60, "erp": 40}
    t = _at_the_knee(p, limits, {"telemetry": 60.0, "erp": 40.0})
    d = _after_a_dwell(p, t, limits, {"telemetry": 40.0, "erp": 40.0})
    got = named(d.limits)
    # Down to its fair share of the 100 Mbit/s knee (50), above anything it sent; the
    # room goes to erp, and the sum stays under the knee.
    assert got["telemetry"] == 50
    assert got["erp"] > 40
    assert got["telemetry"] + got["erp"] <= 100
    assert any("unused cap goes to the others" in r for r in d.reasons)


def test_an_unused_cap_keeps_the_peak_and_the_fair_share() -> None:
    limits = {"telemetry": 60, "erp": 40}
    knee = {"telemetry": 60.0, "erp": 40.0}
    # It sent 55 within the burst memory: its cap keeps room for that, plus the margin
    # (erp at 43 puts the two at the knee, counting that room).
    p = policy(usage_window_s=0.0)
    t = _at_the_knee(p, limits, knee)
    at = {"telemetry": 60, "erp": 43}
    decide(p, now_ns=t, stats=healthy(), limits=at, usage={"telemetry": 55.0, "erp": 43.0})
    d = decide(
        p, now_ns=t + 6 * S, stats=healthy(), limits=at, usage={"telemetry": 20.0, "erp": 43.0}
    )
    assert named(d.limits)["telemetry"] == 57  # ceil(55 * 1.02)
    # A workload silent for longer than the burst memory (erp took the link meanwhile)
    # is never pushed under its fair share of the knee.
    p = policy(usage_window_s=0.0)
    t = _at_the_knee(p, limits, knee)
    d = _after_a_dwell(p, t, {"telemetry": 60, "erp": 98}, {"telemetry": 0.0, "erp": 98.0})
    assert named(d.limits)["telemetry"] == 50
    # With nobody using their cap, nothing is moved.
    p = policy(usage_window_s=0.0)
    t = _at_the_knee(p, limits, knee)
    d = _after_a_dwell(p, t, limits, {"telemetry": 20.0, "erp": 10.0})
    assert named(d.limits) == limits


def test_at_the_knee_the_caps_in_use_even_out_and_an_undo_keeps_them_even() -> None:
    # The first cut left the bursty upload 56 and the dashboard 38; both fill their caps.
    p = policy(usage_window_s=0.0)
    t = _at_the_knee(p, {"telemetry": 60, "erp": 36}, {"telemetry": 60.0, "erp": 36.0})
    at = {"telemetry": 56, "erp": 38}  # 94: the margin under the 96 Mbit/s knee
    d = _after_a_dwell(p, t, at, {"telemetry": 54.0, "erp": 38.0})
    got = named(d.limits)
    assert d.action == "increase"
    # 47 each, the sum kept, then one fine step (1 % of the knee) on top.
    assert sorted(got.values()) == [47, 48]
    assert any("the caps in use even out" in r for r in d.reasons)
    # The step passes the knee: undone, back to the even caps, not to 56 and 38.
    queue = {**healthy(), "robot-control": window("robot-control", queue_ms=0.8)}
    after = decide(p, now_ns=t + 6 * S + STEP_NS, stats=queue, limits=got, usage=dict(got))
    assert named(after.limits) == {"telemetry": 47, "erp": 47}


@pytest.mark.parametrize(
    ("placements", "evens"),
    [
        ({"telemetry": frozenset({"node-a"}), "erp": frozenset({"node-a"})}, True),
        # Cluster-wide caps bind each pod on its own node: telemetry's 56 is what its
        # node-a pod may send, not a share of one link with erp's pods on node-b.
        ({"telemetry": frozenset({"node-a", "node-b"}), "erp": frozenset({"node-b"})}, False),
        ({"telemetry": frozenset({"node-a"}), "erp": frozenset({"node-b"})}, False),
    ],
)
def test_cluster_wide_caps_even_out_only_on_one_node(
    placements: dict[str, frozenset[str]], evens: bool
) -> None:
    p = policy(usage_window_s=0.0)
    knee = {"telemetry": 60.0, "erp": 36.0}
    t = _at_the_knee(p, {"telemetry": 60, "erp": 36}, knee, placements)
    at, used = {"telemetry": 56, "erp": 38}, {"telemetry": 54.0, "erp": 38.0}
    d = _after_a_dwell(p, t, at, used, placements)
    assert d.action == "increase"
    assert any("even out" in r for r in d.reasons) is evens
    assert (named(d.limits)["telemetry"] < 56) is evens


def test_under_the_knee_the_caps_climb_as_they_are() -> None:
    # Room left under the knee: each climbs, nothing moves from one to the other.
    p = policy(usage_window_s=0.0)
    t = _at_the_knee(p, {"telemetry": 60, "erp": 36}, {"telemetry": 60.0, "erp": 36.0})
    d = _after_a_dwell(p, t, {"telemetry": 40, "erp": 20}, {"telemetry": 40.0, "erp": 20.0})
    got = named(d.limits)
    assert d.action == "increase"
    assert got["telemetry"] >= 40
    assert got["erp"] >= 20
    assert not any("even out" in r for r in d.reasons)


@pytest.mark.parametrize("link", [100, 400])
def test_the_climb_back_to_a_known_knee_takes_the_same_steps_on_any_link(link: int) -> None:
    # The knee (a violation with both caps bitten) at the link's rate; the caps then stand
    # 20 % under it. The climb back under the knee's margin must not be paced by the
    # absolute increase_step (+10 Mbit/s is 2 % of a 400 Mbit/s link).
    p = policy(usage_window_s=0.0)
    half = link // 2
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    full = {"telemetry": float(half), "erp": float(half)}
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": half, "erp": half}, usage=full)
    limits = {"telemetry": int(0.8 * half), "erp": int(0.8 * half)}
    steps, now = 0, 12 * S
    while sum(limits.values()) < 0.97 * link and steps < 50:
        d = decide(p, now_ns=now, stats=healthy(), limits=limits, usage=dict(limits))
        if d.action == "increase":
            steps += 1
        limits, now = named(d.limits), now + STEP_NS
    assert sum(limits.values()) <= link  # never past the knee on the way
    assert steps == 1  # straight to the margin under it, at 100 as at 400 Mbit/s


def _probing(
    p: AsymmetricAimd,
    limits: dict[str, int],
    *,
    until_s: int,
    passes: Callable[[int], bool] = lambda _: True,
) -> list[float]:
    """Healthy steps at ``limits`` (usage at the caps) from 12 s; the step after each
    increase that ``passes`` the knee (by its index) sees robot-control's queue standing
    over the warning level. The times of the increases, in seconds."""
    raised: list[float] = []
    for now in range(12 * S, until_s * S, STEP_NS):
        stats = healthy()
        if raised and now - round(raised[-1] * S) == STEP_NS and passes(len(raised) - 1):
            stats["robot-control"] = window("robot-control", queue_ms=0.8)
        d = decide(p, now_ns=now, stats=stats, limits=limits, usage=dict(limits))
        limits.update(named(d.limits))
        if d.action == "increase":
            raised.append(now / S)
    return raised


def _at_a_knee_of_200(p: AsymmetricAimd) -> dict[str, int]:
    """The knee noted at 100 + 100 (a violation at 10 s with both caps bitten); the caps
    then at its margin."""
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    full = {"telemetry": 100.0, "erp": 100.0}
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 100, "erp": 100}, usage=full)
    return {"telemetry": 98, "erp": 98}


def test_each_step_past_a_confirmed_knee_waits_twice_as_long_as_the_last() -> None:
    # The knee at 100 + 100, noted at a violation with both caps bitten; the caps stand
    # at its margin. Every fine step past it is trimmed at the next control step: the
    # dwell before the next one doubles, up to MAX_DWELL_DOUBLINGS times.
    p = policy(usage_window_s=0.0)
    limits = _at_a_knee_of_200(p)
    raised = _probing(p, limits, until_s=250)
    gaps = [b - a for a, b in itertools.pairwise(raised)]
    dwell = PARAMS.increase_interval_s
    expected = [dwell * 2 ** min(i + 1, MAX_DWELL_DOUBLINGS) for i in range(len(gaps))]
    assert len(gaps) >= MAX_DWELL_DOUBLINGS + 2, raised
    assert gaps[0] >= 2 * dwell  # doubling, whatever the constant says
    assert gaps[1] >= 4 * dwell
    for gap, want in zip(gaps, expected, strict=True):
        # the trim's step and the step that restarts the dwell come on top
        assert want <= gap <= want + 1.0, (gaps, expected)
    assert sum(limits.values()) <= 200  # every step past the knee was taken back


def test_fine_steps_that_stand_come_faster_until_one_is_undone() -> None:
    # The knee noted at 100 + 100 (a violation with both caps bitten), but the link takes
    # more: each fine step stands, and each halves the dwell before the next, up to
    # MAX_DWELL_HALVINGS times and never under a cooldown. The fifth passes the knee and
    # is undone: the dwell is back to increase_interval, doubled.
    p = policy(usage_window_s=0.0)
    limits = _at_a_knee_of_200(p)
    raised = _probing(p, limits, until_s=60, passes=lambda i: i == 4)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(raised)]
    dwell, cooldown = PARAMS.increase_interval_s, PARAMS.decrease_cooldown_s
    halved = [max(cooldown, dwell / 2**i) for i in range(MAX_DWELL_HALVINGS + 2)]
    assert halved[-1] == halved[-2] == cooldown  # the floor is reached within the steps
    for gap, want in zip(gaps[:4], halved, strict=True):
        assert want <= gap <= want + 0.5, (gaps, halved)
    assert 2 * dwell <= gaps[4] <= 2 * dwell + 1.0, gaps  # after the undone fifth step


def _one_step_past_the_margin(p: AsymmetricAimd) -> tuple[int, dict[str, int]]:
    """The knee at 50 + 50 (a violation with both caps bitten at 10 s), the caps at its
    margin (49 each) and healthy until the first increase: its time and the caps after."""
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    full = {"telemetry": 50.0, "erp": 50.0}
    decide(p, now_ns=10 * S, stats=bad, limits={"telemetry": 50, "erp": 50}, usage=full)
    limits = {"telemetry": 49, "erp": 49}
    for now in range(12 * S, 30 * S, STEP_NS):
        d = decide(p, now_ns=now, stats=healthy(), limits=limits, usage=dict(limits))
        limits.update(named(d.limits))
        if d.action == "increase":
            return now, limits
    raise AssertionError("no increase at the knee's margin")


def test_a_queue_rising_right_after_a_step_up_undoes_it() -> None:
    # A rise (not yet standing over the warning level) the step after an increase is
    # that increase passing the knee: undone at once, back to the caps before it and no
    # lower (a trim by each workload's own knee would take the one not raised to 48).
    # The same rise seconds after the last increase is as likely a burst: it only holds.
    # The queue rises from 0.1 ms to 0.28 ms: the warning level is 0.3 ms (three times
    # that 0.1 ms noise floor, above a quarter of the 1 ms jitter threshold), a rise by
    # more than half of it is "rising", and 0.28 ms stays under the level itself.
    rising = {**healthy(), "robot-control": window("robot-control", queue_ms=0.28)}
    for later, action in ((STEP_NS, "decrease"), (3 * S, "hold")):
        p = policy(usage_window_s=0.0)
        raised_at, at = _one_step_past_the_margin(p)
        assert sum(at.values()) == 99
        for now in range(raised_at + STEP_NS, raised_at + later, STEP_NS):
            decide(p, now_ns=now, stats=healthy(), limits=at, usage=dict(at))
        d = decide(p, now_ns=raised_at + later, stats=rising, limits=at, usage=dict(at))
        assert d.action == action, d.reasons
        if action == "decrease":
            assert named(d.limits) == {"telemetry": 49, "erp": 49}
        else:
            assert named(d.limits) == at
            assert any("rising" in r for r in d.reasons), d.reasons


def test_the_undo_of_a_coarse_step_goes_all_the_way_back() -> None:
    # A climb under a knee that is only an upper bound (usage 250 + 250 at a violation
    # while no cap had bitten) takes coarse steps. One that builds a queue the next step
    # goes back to the caps before it, though each workload's own knee (250, far above
    # its cap) would trim it by a single Mbit/s (the lab at 400 Mbit/s: 353 -> 352, and
    # the violation and full cut a step later).
    rising = {**healthy(), "robot-control": window("robot-control", queue_ms=0.28)}
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    d = decide(
        p,
        now_ns=10 * S,
        stats=bad,
        limits={"telemetry": 1000, "erp": 1000},
        usage={"telemetry": 250.0, "erp": 250.0},
    )
    limits = named(d.limits)
    for now in range(11 * S, 30 * S, STEP_NS):
        before = dict(limits)
        d = decide(p, now_ns=now, stats=healthy(), limits=limits, usage=dict(limits))
        limits = named(d.limits)
        if d.action == "increase":
            break
    else:
        raise AssertionError("no climb")
    assert sum(limits.values()) - sum(before.values()) > 2  # a coarse step
    d = decide(p, now_ns=now + STEP_NS, stats=rising, limits=limits, usage=dict(limits))
    assert d.action == "decrease", d.reasons
    assert named(d.limits) == before


def test_near_a_knee_that_is_only_an_upper_bound_the_climb_takes_fine_steps() -> None:
    # A violation while no cap had bitten (caps of 1000, 100 Mbit/s each used): 200 is
    # an upper bound on the knee, within some percent of it. The climb back goes in
    # twentieths of the load up to UNCERTAIN_BAND under the bound, then in fine steps
    # (knee_step_fraction of it): a coarse step past the real knee breaks the SLO before
    # the next control step can undo it.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    d = decide(
        p,
        now_ns=10 * S,
        stats=bad,
        limits={"telemetry": 1000, "erp": 1000},
        usage={"telemetry": 100.0, "erp": 100.0},
    )
    limits = named(d.limits)
    assert limits == {"telemetry": 80, "erp": 80}
    band = (1 - UNCERTAIN_BAND) * 200
    fine = PARAMS.knee_step_fraction * 200
    coarse: list[int] = []
    near: list[int] = []
    for now in range(11 * S, 60 * S, STEP_NS):
        before = sum(limits.values())
        d = decide(p, now_ns=now, stats=healthy(), limits=limits, usage=dict(limits))
        limits = named(d.limits)
        if d.action == "increase":
            (near if before >= band else coarse).append(sum(limits.values()) - before)
    assert coarse, "no climb far under the bound"
    assert min(coarse) > fine  # fast while far under the bound...
    assert sum(coarse) + 160 <= band + 1
    assert near, "no climb near the bound"
    assert max(near) <= fine  # ...and fine steps near it


def _cut_and_climb(used_each: float, slope: float | None, actuation_ms: int | None) -> list[int]:
    """A violation at 10 s while no cap had bitten (caps of 1000, ``used_each`` Mbit/s
    used by each workload: only an upper bound on the knee), then 10 s healthy at the
    caps. The step after the cut sees robot-control's probes, every 10 ms from when the
    cut took effect, drain a 30 ms queue by ``slope`` ms per ms (None: no probes). The
    caps' sum after each step."""
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=1.5)}
    limits = {"telemetry": 1000, "erp": 1000}
    sums = []
    for now in range(10 * S, 20 * S, STEP_NS):
        violated = now == 10 * S
        trace = None
        if now == 10 * S + STEP_NS and slope is not None:
            took = 10 * S + (actuation_ms or 0) * MS
            queue = [(took + i * 10 * MS, max(0.0, 30.0 + slope * i * 10)) for i in range(24)]
            trace = {"robot-control": [(took - 5 * MS, 30.0), *queue]}
        usage = {"telemetry": used_each, "erp": used_each} if violated else dict(limits)
        d = p.decide(
            now_ns=now,
            observation=Observation(
                stats=bad if violated else healthy(),
                trace=trace,
                actuation_ns=None if actuation_ms is None or violated else actuation_ms * MS,
                usage={Scope(k): v for k, v in usage.items()},
            ),
            limits={Scope(k): v for k, v in limits.items()},
        )
        if violated:
            assert d.action == "decrease"
        limits = named(d.limits)
        sums.append(sum(limits.values()))
    return sums


@pytest.mark.parametrize(
    ("used_each", "slope", "knee"),
    [
        # 116 used, the cut to 92 drains 30 ms at 0.05 ms/ms: the link serves 5 % more
        # than 92, a knee at 96.8, far under the bound
        (58.0, -0.05, 96.8),
        # 100 used, the cut to 80 drains it in 190 ms (15.8 % more served): a knee at 95
        (50.0, -0.158, 95.0),
    ],
)
def test_the_queue_a_cut_drains_shows_where_the_knee_is(
    used_each: float, slope: float, knee: float
) -> None:
    # The reading narrows the bound: the climb's coarse steps (twentieths of the load)
    # stop UNCERTAIN_BAND under it, and from there every step is a fine one (a
    # warning then marks the knee). Without the probes, or not knowing when the cut
    # took effect, the policy knows only the usage's bound and steps coarsely closer
    # to the knee than that.
    cut = 2 * math.floor(used_each * 0.8)
    band = (1 - UNCERTAIN_BAND) * knee
    fine = max(1, math.floor(PARAMS.knee_step_fraction * knee))

    def near(sums: list[int]) -> list[int]:
        """The increases that start within the band under the reading."""
        return [b - a for a, b in itertools.pairwise(sums) if b > a and a >= math.floor(band)]

    read = _cut_and_climb(used_each, slope, actuation_ms=5)
    assert read[0] == cut
    assert near(read), "no climb near the knee"
    assert max(near(read)) <= fine
    for blind in (_cut_and_climb(used_each, None, 5), _cut_and_climb(used_each, slope, None)):
        assert blind[0] == cut
        assert max(near(blind)) > fine  # coarse steps where the knee is


def test_a_cluster_wide_limit_is_cut_from_its_busiest_node() -> None:
    # One limit per workload, written to each of its pods: telemetry sends 97 Mbit/s from
    # node-a's pod and 31 from node-b's. 20 % under the sum (128 -> 102) would not bite on
    # node-a; 20 % under node-a's 97 does. erp, on one node, is cut from its own usage.
    p = policy(usage_window_s=0.0)
    bad = {**healthy(), "robot-control": window("robot-control", jitter_ms=5.0)}
    usage = {
        Scope("telemetry"): 128.0,
        Scope("telemetry", "node-a"): 97.0,
        Scope("telemetry", "node-b"): 31.0,
        Scope("erp"): 30.0,
        Scope("erp", "node-b"): 30.0,
    }
    d = p.decide(
        now_ns=10 * S,
        observation=Observation(stats=bad, usage=usage),
        limits={Scope("telemetry"): 1000, Scope("erp"): 1000},
    )
    assert d.action == "decrease"
    assert named(d.limits) == {"telemetry": 77, "erp": 24}
