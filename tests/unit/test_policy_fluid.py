"""The policy with product defaults, closed-loop over a fluid model of a congested uplink
(tests/fluid.py): it protects, parks under the knee, finds a knee that moved, and does the
same at 100 and 400 Mbit/s. The lab measures the real figures; this holds the behaviour."""

from __future__ import annotations

import itertools

import pytest

from detnet.controller.aimd import PolicyParams, Slo
from detnet.lab.report import Timeline
from tests.fluid import Demand, bursty, run, steady

SLO = Slo(
    app="robot", max_jitter_ms=1.0, max_latency_ms=5.0, max_queue_delay_ms=2.0, max_loss_ratio=0.02
)
TIMELINE = Timeline(quiet_s=5, congestion_s=60, recovery_s=5)


def demands(link: float) -> dict[str, Demand]:
    return {"erp": steady(), "telemetry": bursty(mbit_per_period=0.48 * link)}


@pytest.mark.parametrize("link", [100.0, 400.0])
def test_protects_and_parks_under_the_knee(link: float) -> None:
    r = run(
        params=PolicyParams(), slo=SLO, demands=demands(link), timeline=TIMELINE, link_mbps=link
    )
    s = r.summary
    assert s["time_to_protect_s"] is not None
    assert s["slo_attainment"] == 1.0
    # The model's goodput is 95 % of the link at most; parked within a few % of that.
    assert s["best_effort_utilisation"] >= 0.9  # type: ignore[operator]
    steady_caps = [c for t, c in r.caps if 15 < t < 65]
    assert max(steady_caps) <= 1.02 * link, "never parks past the knee"


def test_finds_a_knee_that_moved_down() -> None:
    link = lambda t: 100.0 if t < 35 else 60.0  # noqa: E731 - the bottleneck drops halfway
    r = run(
        params=PolicyParams(), slo=SLO, demands=demands(100.0), timeline=TIMELINE, link_mbps=link
    )
    late = [c for t, c in r.caps if 45 < t < 65]
    assert late
    assert max(late) <= 62, "the caps follow the knee down"
    total = {d["t_s"]: sum(d["limits"].values()) for d in r.data.decisions}
    times = sorted(total)
    for before, after in itertools.pairwise(times):
        if after > 40 and total[after] < total[before]:
            # Once found, the knee costs trims of a few percent, never another deep cut.
            assert total[after] >= 0.95 * total[before], (after, total[before], total[after])
