"""The tbf burst formula that the tc enforcer and the lab's shapers share."""

from __future__ import annotations

import pytest

from detnet.engine.tbf import MIN_BURST_BYTES, tbf_burst_bytes


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
