"""The lab report's math on synthetic runs (no namespaces, no processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detnet.engine.slo import Slo
from detnet.lab.report import (
    RunData,
    Timeline,
    app_stats,
    build_report,
    format_table,
    series,
    summarise_run,
    within_slo,
)

TL = Timeline(quiet_s=5.0, congestion_s=10.0, recovery_s=5.0)
SLO = Slo(app="robot", max_jitter_ms=1.0, max_latency_ms=5.0, max_queue_delay_ms=2.0)


def _probes(rtt_at, *, step=0.01, end=20.0):
    """(t, rtt) every ``step`` s with rtt from ``rtt_at(t, i)``."""
    return [(i * step, rtt_at(i * step, i)) for i in range(round(end / step))]


def _congested_until(protect_at: float):
    """0.2 ms base; during congestion, before ``protect_at`` s into it, RTT swings 2..10 ms."""

    def rtt(t: float, i: int) -> float:
        if 5.0 <= t < 5.0 + protect_at:
            return 2.0 + 8.0 * ((i * 7) % 10) / 10
        return 0.2 + 0.01 * (i % 3)

    return rtt


def test_app_stats_percentiles_iqr_queue_delay_and_loss() -> None:
    rtts = np.array([1.0, 2.0, 3.0, 4.0, 5.0, math.nan, math.nan, 6.0, 7.0, 8.0])
    st = app_stats(rtts, base_ms=0.5)
    got = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    assert st.rtt_p50_ms == pytest.approx(np.percentile(got, 50))
    assert st.rtt_p99_ms == pytest.approx(np.percentile(got, 99))
    assert st.jitter_iqr_ms == pytest.approx(np.percentile(got, 75) - np.percentile(got, 25))
    assert st.queue_delay_ms == pytest.approx(np.percentile(got, 90) - 0.5)
    assert st.loss_ratio == pytest.approx(0.2)
    empty = app_stats(np.array([]), base_ms=None)
    assert empty.loss_ratio is None
    assert empty.rtt_p50_ms is None
    all_lost = app_stats(np.array([math.nan, math.nan]), base_ms=0.1)
    assert all_lost.loss_ratio == 1.0
    assert all_lost.rtt_p50_ms is None


def test_within_slo_checks_every_configured_signal() -> None:
    ok = app_stats(np.full(100, 0.3), base_ms=0.3)
    assert within_slo(ok, SLO)
    high_p99 = app_stats(np.r_[np.full(95, 0.3), np.full(5, 9.0)], base_ms=0.3)
    assert high_p99.jitter_iqr_ms == pytest.approx(0.0)
    assert not within_slo(high_p99, SLO)  # IQR is fine; p99 is not
    standing_queue = app_stats(np.full(100, 3.0), base_ms=0.3)
    assert not within_slo(standing_queue, SLO)  # no jitter, no p99 breach: queueing delay
    lossy = app_stats(np.r_[np.full(90, 0.3), np.full(10, math.nan)], base_ms=0.3)
    assert within_slo(lossy, SLO)
    assert not within_slo(lossy, Slo(app="robot", max_loss_ratio=0.05))
    assert not within_slo(app_stats(np.array([]), base_ms=None), SLO)  # no data: no credit


def test_protected_run_time_to_protect_attainment_and_utilisation() -> None:
    run = RunData(
        probes={"robot": _probes(_congested_until(1.5))},
        goodput=[(t, 85.0 if 5 < t <= 15 else 0.0) for t in range(1, 21)],
        decisions=[{"t_s": 5.3, "action": "decrease", "limits": {"a": 80}}],
    )
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0, critical_mbps=0.0)
    assert out["time_to_protect_s"] == pytest.approx(1.5)
    assert out["slo_attainment"] == pytest.approx(1.0)  # 8 whole windows after 6.5 s, all good
    assert out["best_effort_utilisation"] == pytest.approx(0.85)
    assert out["settled_utilisation"] == pytest.approx(0.85)
    cong = out["phases"]["congestion"]
    assert cong["apps"]["robot"]["rtt_p99_ms"] > 5.0
    assert cong["best_effort_mbps"] == pytest.approx(85.0)
    quiet = out["phases"]["quiet"]["apps"]["robot"]
    assert quiet["queue_delay_ms"] == pytest.approx(0.02)  # p90 0.22 - base 0.20
    assert out["phases"]["recovery"]["best_effort_mbps"] == pytest.approx(0.0)
    assert out["decisions"] == [{"t_s": 5.3, "action": "decrease", "limits": {"a": 80}}]


def test_unprotected_run_has_no_time_to_protect_and_low_attainment() -> None:
    run = RunData(
        probes={"robot": _probes(_congested_until(100.0))},
        goodput=[(t, 95.0) for t in range(6, 16)],
    )
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0, critical_mbps=5.0)
    assert out["time_to_protect_s"] is None
    assert out["slo_attainment"] == 0.0  # over the whole congestion phase
    assert out["best_effort_utilisation"] == pytest.approx(95.0 / 95.0)
    assert out["phases"]["congestion"]["apps"]["robot"]["jitter_iqr_ms"] > 1.0


def test_attainment_counts_bad_windows_after_protection() -> None:
    def rtt(t: float, i: int) -> float:
        if 5.0 <= t < 6.0 or 10.0 <= t < 11.0 or 12.0 <= t < 13.0:  # two relapses
            return 2.0 + 8.0 * ((i * 7) % 10) / 10
        return 0.2

    run = RunData(probes={"robot": _probes(rtt)})
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
    assert out["time_to_protect_s"] == pytest.approx(1.0)
    assert out["slo_attainment"] == pytest.approx(7 / 9)
    assert out["best_effort_utilisation"] is None  # no goodput recorded
    missed = out["missed_windows"]
    assert [w["t_s"] for w in missed] == [10.0, 12.0]
    for w in missed:
        # RTTs of 2..9.2 ms over a 0.2 ms base: every threshold of SLO breaks
        broke = {why.split()[0] for why in w["breaches"]["robot"]}
        assert broke == {"jitter", "latency", "queue_delay"}
    table = format_table(build_report({}, {"with_controller": out}))
    assert "windows outside the SLO: 10.0 s (robot " in table
    assert "12.0 s (robot " in table


def test_missed_windows_name_the_app_and_the_threshold_that_broke() -> None:
    scanner = Slo(app="scanner", max_latency_ms=1.0)
    run = RunData(
        probes={
            "robot": _probes(lambda t, i: 0.2),
            "scanner": _probes(lambda t, i: 3.0 if 9.0 <= t < 10.0 else 0.3),
        }
    )
    out = summarise_run(run, slos=[SLO, scanner], timeline=TL, bottleneck_mbps=100.0)
    assert out["missed_windows"] == [{"t_s": 9.0, "breaches": {"scanner": ["latency 3.00 > 1.00"]}}]
    silent = RunData(probes={"robot": _probes(lambda t, i: math.nan if 7 <= t < 8 else 0.2)})
    out = summarise_run(silent, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
    assert out["missed_windows"] == [{"t_s": 7.0, "breaches": {"robot": ["no replies"]}}]


def test_every_app_must_be_within_slo() -> None:
    scanner = Slo(app="scanner", max_latency_ms=1.0)
    run = RunData(
        probes={
            "robot": _probes(lambda t, i: 0.2),
            "scanner": _probes(lambda t, i: 3.0 if t < 8.0 else 0.3),
        }
    )
    out = summarise_run(run, slos=[SLO, scanner], timeline=TL, bottleneck_mbps=100.0)
    assert out["time_to_protect_s"] == pytest.approx(3.0)


def test_report_shape_is_json_and_table_renders() -> None:
    run = RunData(probes={"robot": _probes(_congested_until(1.0))}, goodput=[(7.0, 80.0)])
    summary = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
    report = build_report(
        {"rate": 100}, {"without_controller": summary, "with_controller": summary}
    )
    doc = json.loads(json.dumps(report))
    assert set(doc) == {"config", "runs"}
    assert set(doc["runs"]) == {"without_controller", "with_controller"}
    run_doc = doc["runs"]["with_controller"]
    assert set(run_doc) == {
        "time_to_protect_s",
        "slo_attainment",
        "missed_windows",
        "best_effort_utilisation",
        "settled_utilisation",
        "increases",
        "violations_after_increase",
        "phases",
        "decisions",
    }
    assert set(run_doc["phases"]) == {"quiet", "congestion", "recovery"}
    assert set(run_doc["phases"]["quiet"]) == {"apps", "best_effort_mbps"}
    assert set(run_doc["phases"]["quiet"]["apps"]["robot"]) == {
        "rtt_p50_ms",
        "rtt_p99_ms",
        "jitter_iqr_ms",
        "queue_delay_ms",
        "loss_ratio",
    }
    table = format_table(report)
    assert "without_controller" in table
    assert "time to protect 1.0 s" in table


def test_series_per_second() -> None:
    run = RunData(probes={"robot": _probes(lambda t, i: 1.0 + (t >= 10.0), end=20.0)})
    s = series(run, "robot")
    assert len(s["t"]) == 20
    assert s["p50"][0] == pytest.approx(1.0)
    assert s["p50"][-1] == pytest.approx(2.0)
    assert np.all(s["iqr"] < 1e-9)
    assert series(RunData(probes={}), "robot")["t"].size == 0


def test_an_increase_followed_by_a_violation_is_counted() -> None:
    # Healthy throughout congestion except a burst of queueing 1.5 s after the increase at
    # 9.0 s; the increase at 12.0 s is followed by nothing bad.
    def rtt(t: float, i: int) -> float:
        return 6.0 if 10.5 <= t < 11.0 else 0.2 + 0.01 * (i % 3)

    decisions = [
        {"t_s": 2.0, "action": "increase"},  # quiet phase: not counted
        {"t_s": 9.0, "action": "increase"},
        {"t_s": 12.0, "action": "increase"},
        {"t_s": 12.5, "action": "hold"},
    ]
    run = RunData(probes={"robot": _probes(rtt)}, decisions=decisions)
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
    assert out["increases"] == 2
    assert out["violations_after_increase"] == 1


def test_settled_utilisation_is_the_second_half_of_the_congestion() -> None:
    # The climb back: 40 Mbit/s in the first half of the 5..15 s congestion, 90 after.
    goodput = [(float(t), 40.0 if t <= 10 else 90.0) for t in range(1, 21)]
    run = RunData(probes={"robot": _probes(lambda t, i: 0.2)}, goodput=goodput)
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
    assert out["best_effort_utilisation"] == pytest.approx(0.65)
    assert out["settled_utilisation"] == pytest.approx(0.90)
    assert "(settled: 90.0%)" in format_table(build_report({}, {"with_controller": out}))


def test_a_knee_step_counts_the_spare_capacity_second_by_second() -> None:
    # 50 Mbit/s of goodput all through congestion; the link drops from 100 to 60 at 10 s
    # (half-way through the 5..15 s congestion): the spare capacity averages 80.
    goodput = [(float(t), 50.0) for t in range(1, 21)]
    run = RunData(probes={"robot": _probes(lambda t, i: 0.2)}, goodput=goodput)
    out = summarise_run(
        run,
        slos=[SLO],
        timeline=TL,
        bottleneck_mbps=100.0,
        bottleneck_from_s=10.0,
        bottleneck_after_mbps=60.0,
    )
    assert out["best_effort_utilisation"] == pytest.approx(50.0 / 80.0)
    assert out["settled_utilisation"] == pytest.approx(50.0 / 60.0)  # 10..15 s: after it


@pytest.mark.parametrize(
    ("bad_from", "bad_to", "broke", "recovery", "attainment"),
    [
        (None, None, False, 0.0, 1.0),  # the step passes unnoticed
        (10.0, 11.5, True, 1.5, 3 / 5),  # 1.5 s of trouble after the step at 10 s
        (10.5, 20.0, True, None, 0.0),  # it never comes back before congestion ends
    ],
)
def test_step_summary(
    bad_from: float | None,
    bad_to: float | None,
    broke: bool,
    recovery: float | None,
    attainment: float,
) -> None:
    def rtt(t: float, i: int) -> float:
        if bad_from is not None and bad_to is not None and bad_from <= t < bad_to:
            return 2.0 + 8.0 * ((i * 7) % 10) / 10
        return 0.2

    goodput = [(float(t), 70.0 if t <= 10 else 40.0) for t in range(1, 21)]
    run = RunData(probes={"robot": _probes(rtt)}, goodput=goodput)
    out = summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0, step_at_s=10.0)
    step = out["step"]
    assert (step["at_s"], step["broke"], step["recovery_s"]) == (10.0, broke, recovery)
    assert step["slo_attainment"] == pytest.approx(attainment)
    assert step["best_effort_mbps_before"] == pytest.approx(70.0)  # the reports of 6..10 s
    assert step["best_effort_mbps_after"] == pytest.approx(40.0)
    assert "step" not in summarise_run(run, slos=[SLO], timeline=TL, bottleneck_mbps=100.0)
