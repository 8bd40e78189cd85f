"""The tbf burst formula that the tc enforcer and the lab's shapers share."""

from __future__ import annotations

import pytest

from detnet.engine.tbf import (
    MIN_BURST_BYTES,
    TbfPlan,
    tbf_bucket_bytes,
    tbf_burst_bytes,
    tbf_plan,
)


@pytest.mark.parametrize(
    ("mbps", "burst"),
    [
        (1000, 125_000),  # 1 ms at 1 Gbit/s: 1e9 / 8 / 1000 bytes
        (400, 50_000),
        (200.5, 25_062),  # the lab's fractional rates: whole bytes, rounded down
        (121, 15_140),  # 1 ms would be 15_125 bytes: ten full frames instead
        (10, 15_140),
        (2.5, 15_140),
    ],
)
def test_one_millisecond_of_tokens_at_least_ten_frames(mbps: float, burst: int) -> None:
    assert tbf_burst_bytes(mbps) == burst
    assert MIN_BURST_BYTES == 10 * 1514


def test_bucket_bytes_from_netlink_ticks() -> None:
    # 15_625 ticks of 64 ns are 1 ms: 12_500 bytes at 100 Mbit/s
    assert tbf_bucket_bytes(12_500_000, 15_625) == 12_500
    assert tbf_bucket_bytes(12_500_000, 0) == 0


def test_plan_without_a_tbf_makes_one() -> None:
    assert tbf_plan(50, 15_140, None) == TbfPlan(15_140, in_place=False)


def test_plan_grows_a_bucket_in_place() -> None:
    assert tbf_plan(400, 50_000, 33_591) == TbfPlan(50_000, in_place=True)


def test_plan_shrinking_a_bucket_makes_a_fresh_tbf() -> None:
    # the lab's stuck cut: 346 -> 269 Mbit/s, 43_206 -> 33_625 bytes
    assert tbf_plan(269, 33_625, 43_206) == TbfPlan(33_625, in_place=False)


def test_plan_raises_a_burst_that_rounding_alone_would_shrink() -> None:
    # tc showed 15_137 bytes for 15_140 at 100 Mbit/s: the same burst at 99 held 15_134
    plan = tbf_plan(99, 15_140, 15_137)
    assert plan.in_place
    assert plan.burst > 15_137


def _kernel_bucket(mbps: float, burst: int) -> int:
    """The bucket the kernel ends up with for ``burst`` at ``mbps``, sent the tc
    enforcer's way: through pyroute2's own rounding to ticks."""
    from pyroute2.netlink.rtnl.tcmsg.common import calc_xmittime

    rate = int(mbps * 125_000)
    return tbf_bucket_bytes(rate, calc_xmittime(rate, burst))


RATES = [10, 73, 99, 100, 121, 122, 346, 400, 1000]


@pytest.mark.parametrize("fixed", [None, MIN_BURST_BYTES, 30_000, 125_000])
@pytest.mark.parametrize("old_mbps", RATES)
@pytest.mark.parametrize("mbps", RATES)
def test_in_place_never_leaves_the_kernel_a_smaller_bucket(
    fixed: int | None, old_mbps: int, mbps: int
) -> None:
    # fixed: the tc enforcer's configured burst; None: tbf_burst_bytes at each rate
    old = fixed or tbf_burst_bytes(old_mbps)
    burst = fixed or tbf_burst_bytes(mbps)
    held = _kernel_bucket(old_mbps, old)
    plan = tbf_plan(mbps, burst, held)
    if plan.in_place:
        assert _kernel_bucket(mbps, plan.burst) >= held
        assert plan.burst - burst <= 1514 + mbps // 4 + 1  # raised by rounding, no more
    else:
        assert plan.burst == burst
        assert _kernel_bucket(mbps, burst) < held


def test_raised_bursts_stay_bounded_over_many_changes() -> None:
    # a constant burst at alternating rates: each change may raise it by a few bytes;
    # once that adds up to a frame, one fresh tbf brings it back
    held = _kernel_bucket(100, MIN_BURST_BYTES)
    fresh = 0
    for i in range(1_000):
        mbps = 99 if i % 2 else 100
        plan = tbf_plan(mbps, MIN_BURST_BYTES, held)
        fresh += not plan.in_place
        assert MIN_BURST_BYTES <= plan.burst <= MIN_BURST_BYTES + 1514 + 26
        held = _kernel_bucket(mbps, plan.burst)
    assert 0 < fresh < 20
