"""Interface counters and per-pod rates (controller/agent/netdev.py, rates.py): parsing
/proc/PID/net/dev, steps across wraps and resets, unknown after any break, the 1 s mean;
and the meter checked against a small reference model by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.controller.agent.netdev import (
    COUNTER_MODULUS,
    MAX_NET_DEV_BYTES,
    NetDevError,
    counter_delta,
    parse_net_dev,
    pod_interfaces,
)
from detnet.controller.agent.rates import UNKNOWN, PodMeter, Rates

MS = 1_000_000
# A pod's /proc/PID/net/dev as kernel 6.x writes it (lo and the veth eth0).
NET_DEV = (
    b"Inter-|   Receive                                                |  Transmit\n"
    b" face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
    b"errs drop fifo colls carrier compressed\n"
    b"    lo:    1000      10    0    0    0     0          0         0     1000      10    "
    b"0    0    0     0       0          0\n"
    b"  eth0: 2716243   33219    0    0    0     0          0         0 118930744   78212    "
    b"0    0    0     0       0          0\n"
)


def test_parse_net_dev() -> None:
    assert parse_net_dev(NET_DEV) == {"lo": (1000, 1000), "eth0": (2716243, 118930744)}
    assert pod_interfaces(parse_net_dev(NET_DEV)) == {"eth0": (2716243, 118930744)}


def test_old_kernels_write_no_space_after_the_name() -> None:
    head = b"Inter-|  Receive |  Transmit\n face |bytes |bytes\n"
    text = head + b"  eth0:123456789 1 0 0 0 0 0 0 987654321 2 0 0 0 0 0 0\n"
    assert parse_net_dev(text) == {"eth0": (123456789, 987654321)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "header"),
        (b"eth0: 1 2 3\n", "header"),
        (NET_DEV + b"  eth1: 1 2 3\n", "16 counters"),
        (NET_DEV + b"  eth1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", "16 counters"),
        (NET_DEV + b"  eth1: x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", "not integers"),
        (NET_DEV + b"  eth1: -1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", "out of range"),
        (NET_DEV + b"  eth1: %d 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" % 2**64, "out of range"),
        (NET_DEV + b"  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", "repeated"),
        (NET_DEV + b"    : 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", "missing"),
        (NET_DEV + b" " * MAX_NET_DEV_BYTES, "cut short"),
    ],
)
def test_bad_net_dev(data: bytes, message: str) -> None:
    with pytest.raises(NetDevError, match=message):
        parse_net_dev(data)


def test_counter_delta() -> None:
    assert counter_delta(100, 250, limit=1e9) == 150
    assert counter_delta(100, 100, limit=1e9) == 0
    # a 64-bit wrap: from just below 2**64 to just above 0
    assert counter_delta(COUNTER_MODULUS - 10, 5, limit=1e9) == 15
    # a reset: the counter restarted from 0 (also a 32-bit kernel's wrap: unknown, not wrong)
    assert counter_delta(5_000_000, 1_000, limit=1e9) is None
    assert counter_delta(2**32 - 10, 5, limit=1e9) is None
    # more than any link could carry
    assert counter_delta(0, 10**12, limit=1e9) is None
    assert counter_delta(COUNTER_MODULUS - 10, 10**12, limit=1e9) is None


def _reading(eth0: tuple[int, int], **more: tuple[int, int]) -> dict[str, tuple[int, int]]:
    return {"lo": (7, 7), "eth0": eth0, **more}


def test_rates_over_the_last_interval_and_the_mean_over_1s() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    assert meter.observe(0, _reading((0, 0)), source=1) == "start"
    assert meter.rates() == UNKNOWN
    # 1 MB/s out and 10 kB/s in for 1 s, then 3 MB/s out for 0.1 s
    for k in range(1, 11):
        assert meter.observe(k * 100 * MS, _reading((k * 1000, k * 100_000)), source=1) == "ok"
        r = meter.rates()
        assert r.egress_bps == pytest.approx(1e6)
        assert r.ingress_bps == pytest.approx(1e4)
        if k < 10:  # less than 1 s of history: the mean is unknown
            assert r.egress_bps_1s is None
    r = meter.rates()
    assert r.egress_bps == pytest.approx(1e6)
    assert r.ingress_bps == pytest.approx(1e4)
    assert r.egress_bps_1s == pytest.approx(1e6)
    assert r.ingress_bps_1s == pytest.approx(1e4)
    meter.observe(1100 * MS, _reading((11_000, 1_300_000)), source=1)
    r = meter.rates()
    assert r.egress_bps == pytest.approx(3e6)
    assert r.egress_bps_1s == pytest.approx((1_300_000 - 100_000) / 1.0)
    assert r.ingress_bps_1s == pytest.approx(1e4)


def test_loopback_is_not_pod_traffic() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    meter.observe(0, {"lo": (0, 0), "eth0": (0, 0)}, source=1)
    meter.observe(100 * MS, {"lo": (10**8, 10**8), "eth0": (0, 1000)}, source=1)
    assert meter.rates().egress_bps == pytest.approx(10_000)
    assert meter.rates().ingress_bps == 0.0  # measured zero: a number, not unknown


def test_every_interface_but_lo_is_summed() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    meter.observe(0, _reading((0, 0), net1=(0, 0)), source=1)
    meter.observe(100 * MS, _reading((0, 1000), net1=(500, 2000)), source=1)
    assert meter.rates().egress_bps == pytest.approx(30_000)
    assert meter.rates().ingress_bps == pytest.approx(5_000)


@pytest.mark.parametrize(
    ("second", "source", "why"),
    [
        (_reading((0, 500)), 1, "reset"),  # the counter went down: container restarted
        (_reading((0, 2000), net1=(0, 0)), 1, "interfaces"),
        ({"lo": (7, 7)}, 1, "interfaces"),
        (_reading((0, 2000)), 2, "source"),  # another process of the pod
        (_reading((0, 10**15)), 1, "reset"),  # faster than any link
    ],
)
def test_a_break_makes_the_rates_unknown_until_the_next_reading(
    second: dict[str, tuple[int, int]], source: int, why: str
) -> None:
    meter = PodMeter(interval_ns=100 * MS)
    meter.observe(0, _reading((0, 1000)), source=1)
    meter.observe(100 * MS, _reading((0, 1500)), source=1)
    assert meter.rates().known
    assert meter.observe(200 * MS, second, source=source) == why
    assert meter.rates() == UNKNOWN
    bumped = {k: (rx + 100, tx + 100) for k, (rx, tx) in second.items()}
    assert meter.observe(300 * MS, bumped, source=source) == "ok"
    # 100 bytes in 0.1 s on each interface but lo
    assert meter.rates().egress_bps == pytest.approx(1000 * (len(bumped) - 1))


def test_an_unreadable_reading_is_unknown_and_restarts_the_segment() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    for k in range(12):
        meter.observe(k * 100 * MS, _reading((0, k * 100)), source=1)
    assert meter.rates().egress_bps_1s is not None
    assert meter.observe(1200 * MS, None, source=1) == "unreadable"
    assert meter.rates() == UNKNOWN
    assert meter.observe(1300 * MS, _reading((0, 5000)), source=1) == "start"
    assert meter.rates() == UNKNOWN
    meter.observe(1400 * MS, _reading((0, 5100)), source=1)
    assert meter.rates().egress_bps == pytest.approx(1000)
    assert meter.rates().egress_bps_1s is None  # the new segment is 0.1 s old


def test_a_wrap_is_a_step_not_a_break() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    meter.observe(0, _reading((0, COUNTER_MODULUS - 50)), source=1)
    assert meter.observe(100 * MS, _reading((0, 50)), source=1) == "ok"
    assert meter.rates().egress_bps == pytest.approx(1000)


def test_a_reading_without_time_passing_is_ignored() -> None:
    meter = PodMeter(interval_ns=100 * MS)
    meter.observe(0, _reading((0, 0)), source=1)
    meter.observe(100 * MS, _reading((0, 100)), source=1)
    assert meter.observe(100 * MS, _reading((0, 900)), source=1) == "stale"
    assert meter.rates().egress_bps == pytest.approx(1000)


# --------------------------------------------------------------- reference model

_WINDOW = 1000 * MS
_INTERVAL = 100 * MS


def _model(readings: list[tuple[int, int | None, int]]) -> Rates:
    """Rates after ``readings`` of (t, tx or None, source), computed the plain way."""
    segment: list[tuple[int, int]] = []  # (t, tx) of the current segment
    prev_source = None
    for t, tx, source in readings:
        if tx is None:
            segment, prev_source = [], None
            continue
        ok = bool(segment) and source == prev_source
        if ok:
            t0, tx0 = segment[-1]
            step = (tx - tx0) % COUNTER_MODULUS
            if t <= t0:
                continue  # stale
            wrapped = tx < tx0
            if (wrapped and tx0 < 2**63) or step > 50e9 * (t - t0) / 1e9:
                ok = False
        segment = [*segment, (t, tx)] if ok else [(t, tx)]
        prev_source = source
    if len(segment) < 2:
        return UNKNOWN
    (t1, c1), (t0, c0) = segment[-1], segment[-2]
    egress = ((c1 - c0) % COUNTER_MODULUS) * 1e9 / (t1 - t0)
    base = [(t, c) for t, c in segment if t <= t1 - _WINDOW + _INTERVAL // 2]
    if not base:
        return Rates(egress_bps=egress, ingress_bps=0.0)
    tb, _ = base[-1]
    total = sum(
        (segment[i + 1][1] - segment[i][1]) % COUNTER_MODULUS
        for i in range(len(segment) - 1)
        if segment[i][0] >= tb
    )
    return Rates(
        egress_bps=egress,
        ingress_bps=0.0,
        egress_bps_1s=total * 1e9 / (t1 - tb),
        ingress_bps_1s=0.0,
    )


_step = st.one_of(
    st.integers(0, 10**9),  # bytes in one interval
    st.just(-1),  # unreadable
    st.just(-2),  # reset to a small value
    st.just(-3),  # another source
)


@given(
    start=st.one_of(
        st.integers(0, 10**12), st.integers(COUNTER_MODULUS - 10**10, COUNTER_MODULUS - 1)
    ),
    steps=st.lists(st.tuples(_step, st.integers(60, 140)), max_size=40),
)
def test_the_meter_agrees_with_the_reference_model(
    start: int, steps: list[tuple[int, int]]
) -> None:
    meter = PodMeter(interval_ns=_INTERVAL, window_ns=_WINDOW)
    t, tx, source = 0, start, 0
    readings: list[tuple[int, int | None, int]] = [(t, tx, source)]
    meter.observe(t, _reading((0, tx)), source=source)
    for step, gap_ms in steps:
        t += gap_ms * MS
        if step == -1:
            readings.append((t, None, source))
            meter.observe(t, None, source=source)
            continue
        if step == -2:
            tx = 1000
        elif step == -3:
            source += 1
        else:
            tx = (tx + step) % COUNTER_MODULUS
        readings.append((t, tx, source))
        meter.observe(t, _reading((0, tx)), source=source)
    got, want = meter.rates(), _model(readings)
    for field in ("egress_bps", "ingress_bps", "egress_bps_1s", "ingress_bps_1s"):
        g, w = getattr(got, field), getattr(want, field)
        assert (g is None) == (w is None), field
        if w is not None:
            assert g == pytest.approx(w, rel=1e-12), field
