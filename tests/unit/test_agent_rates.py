"""Interface counters and per-pod rates (controller/agent/netdev.py, rates.py): parsing
/proc/PID/net/dev one pod at a time and all pods at once, steps across wraps and resets,
unknown after any break, the 1 s mean; and the vectorised meter checked against a plain
per-pod reference model by hypothesis."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.controller.agent.netdev import (
    COUNTER_MODULUS,
    MAX_NET_DEV_BYTES,
    NetDevError,
    counter_steps,
    parse_net_dev,
    parse_node,
    pod_counters,
)
from detnet.controller.agent.rates import UNKNOWN, NodeMeter, Rates

MS = 1_000_000
HEADER = (
    b"Inter-|   Receive                                                |  Transmit\n"
    b" face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
    b"errs drop fifo colls carrier compressed\n"
)
# A pod's /proc/PID/net/dev as kernel 6.x writes it (lo and the veth eth0).
NET_DEV = (
    HEADER
    + b"    lo:    1000      10    0    0    0     0          0         0     1000      10    "
    b"0    0    0     0       0          0\n"
    b"  eth0: 2716243   33219    0    0    0     0          0         0 118930744   78212    "
    b"0    0    0     0       0          0\n"
)


def net_dev(counters: Mapping[bytes, tuple[int, int]], *, lo: bool = True) -> bytes:
    """The file the kernel writes for these interfaces ({name: (rx, tx)}), lo first."""
    lines = [b"    lo:       0       0    0    0    0     0          0         0        0"
             b"       0    0    0    0     0       0          0\n"] if lo else []  # fmt: skip
    for name, (rx, tx) in counters.items():
        lines.append(b"%6s: %7d       1    0    0    0     0          0         0 %8d       "
                     b"1    0    0    0     0       0          0\n" % (name, rx, tx))  # fmt: skip
    return HEADER + b"".join(lines)


# ---------------------------------------------------------------------- parsing


def test_parse_net_dev() -> None:
    assert parse_net_dev(NET_DEV) == {b"lo": (1000, 1000), b"eth0": (2716243, 118930744)}
    assert pod_counters(NET_DEV) == {b"eth0": (2716243, 118930744)}  # lo never leaves the pod


def test_old_kernels_write_no_space_after_the_name() -> None:
    head = b"Inter-|  Receive |  Transmit\n face |bytes |bytes\n"
    text = head + b"  eth0:123456789 1 0 0 0 0 0 0 987654321 2 0 0 0 0 0 0\n"
    assert parse_net_dev(text) == {b"eth0": (123456789, 987654321)}
    node = parse_node([text])  # not the fast path's shape: read pod by pod
    assert (node.names, node.rx.tolist(), node.tx.tolist()) == (
        [b"eth0:"],
        [123456789],
        [987654321],
    )


BAD = [
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
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_bad_net_dev(data: bytes, message: str) -> None:
    with pytest.raises(NetDevError, match=message):
        parse_net_dev(data)


@pytest.mark.parametrize(("data", "message"), BAD)
def test_a_bad_file_among_many_spoils_only_its_pod(data: bytes, message: str) -> None:
    good = net_dev({b"eth0": (5, 7)})
    node = parse_node([good, data, good])
    assert node.bad == {1}
    assert node.counts == [1, 0, 1]
    assert node.rx.tolist() == [5, 5]
    assert node.tx.tolist() == [7, 7]


def test_many_pods_at_once_read_as_one_at_a_time() -> None:
    pods = [
        {b"eth0": (1, 2)},
        {b"eth0": (3, 4), b"net1": (2**63 + 5, 2**64 - 1)},  # a second interface; huge counters
        {},  # only lo: a pod whose network never came up
        {b"eth0": (10**18, 9)},
    ]
    datas = [net_dev(p) for p in pods]
    node = parse_node(datas)
    assert node.bad == frozenset()
    assert node.counts == [1, 2, 0, 1]
    assert node.starts.tolist() == [0, 1, 3, 3]
    assert node.names == [b"eth0:", b"eth0:", b"net1:", b"eth0:"]
    want = [c for p in pods for c in p.values()]
    assert list(zip(node.rx.tolist(), node.tx.tolist(), strict=True)) == want
    for p, data in zip(pods, datas, strict=True):
        assert pod_counters(data) == p


def test_only_lo_everywhere() -> None:
    node = parse_node([net_dev({}), net_dev({})])
    assert (node.counts, node.names, node.rx.size) == ([0, 0], [], 0)


def test_counter_steps() -> None:
    u = np.uint64
    prev = np.array([100, 100, COUNTER_MODULUS - 10, 5_000_000, 2**32 - 10, 0], dtype=u)
    cur = np.array([250, 100, 5, 1_000, 5, 10**12], dtype=u)
    step, known = counter_steps(prev, cur, np.full(6, 1e9))
    assert known.tolist() == [True, True, True, False, False, False]
    assert step[:3].tolist() == [150, 0, 15]  # a 64-bit wrap is a step...
    # ...a reset is not (also a 32-bit kernel's wrap: unknown, not wrong), nor a jump
    # faster than any link


# ------------------------------------------------------------------- the meter


class OnePod:
    """The meter with one pod, fed counters the way the resolver would read them."""

    def __init__(self, interval_ns: int = 100 * MS) -> None:
        self.meter = NodeMeter(interval_ns=interval_ns)

    def observe(
        self, now_ns: int, counters: Mapping[bytes, tuple[int, int]] | None, *, source: int = 1
    ) -> str:
        data = None if counters is None else net_dev(counters)
        broken, _ = self.meter.observe(["p"], {"p": (now_ns, data, source)})
        (why,) = [k for k, v in broken.items() if v] or ["ok"]
        return why

    def rates(self) -> Rates:
        return self.meter.rates()["p"]


def eth0(tx: int, rx: int = 0, **more: tuple[int, int]) -> dict[bytes, tuple[int, int]]:
    return {b"eth0": (rx, tx), **{k.encode(): v for k, v in more.items()}}


def test_rates_over_the_last_interval_and_the_mean_over_1s() -> None:
    pod = OnePod()
    assert pod.meter.rates() == {}  # no pod yet
    assert pod.observe(0, eth0(0)) == "ok"
    assert pod.rates() == UNKNOWN  # one reading: no step yet
    # 1 MB/s out and 10 kB/s in for 1 s, then 3 MB/s out for 0.1 s
    for k in range(1, 11):
        assert pod.observe(k * 100 * MS, eth0(k * 100_000, rx=k * 1000)) == "ok"
        r = pod.rates()
        assert r.egress_bps == pytest.approx(1e6)
        assert r.ingress_bps == pytest.approx(1e4)
        if k < 10:  # less than 1 s of history: the mean is unknown
            assert r.egress_bps_1s is None
    r = pod.rates()
    assert r.egress_bps_1s == pytest.approx(1e6)
    assert r.ingress_bps_1s == pytest.approx(1e4)
    pod.observe(1100 * MS, eth0(1_300_000, rx=11_000))
    r = pod.rates()
    assert r.egress_bps == pytest.approx(3e6)
    assert r.egress_bps_1s == pytest.approx((1_300_000 - 100_000) / 1.0)
    assert r.ingress_bps_1s == pytest.approx(1e4)


def test_a_measured_zero_is_a_number_not_unknown() -> None:
    pod = OnePod()
    pod.observe(0, eth0(0))
    pod.observe(100 * MS, eth0(1000))
    assert pod.rates().egress_bps == pytest.approx(10_000)
    assert pod.rates().ingress_bps == 0.0


def test_lo_is_not_pod_traffic() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    lo_busy = HEADER + b"    lo: 99999999 1 0 0 0 0 0 0 99999999 1 0 0 0 0 0 0\n"
    idle = HEADER + b"    lo: 0 1 0 0 0 0 0 0 0 1 0 0 0 0 0 0\n"
    meter.observe(["p"], {"p": (0, idle, 1)})
    meter.observe(["p"], {"p": (100 * MS, lo_busy, 1)})
    assert meter.rates()["p"] == Rates(0.0, 0.0)


def test_every_interface_but_lo_is_summed() -> None:
    pod = OnePod()
    pod.observe(0, eth0(0, net1=(0, 0)))
    pod.observe(100 * MS, eth0(1000, net1=(500, 2000)))
    assert pod.rates().egress_bps == pytest.approx(30_000)
    assert pod.rates().ingress_bps == pytest.approx(5_000)


@pytest.mark.parametrize(
    ("second", "source", "why"),
    [
        (eth0(500), 1, "reset"),  # the counter went down: the sandbox was recreated
        (eth0(2000, net1=(0, 0)), 1, "interfaces"),
        ({b"net1": (7, 7)}, 1, "interfaces"),
        (eth0(2000), 2, "source"),  # another process of the pod
        (eth0(10**15), 1, "reset"),  # faster than any link
    ],
)
def test_a_break_makes_the_rates_unknown_until_the_next_reading(
    second: dict[bytes, tuple[int, int]], source: int, why: str
) -> None:
    pod = OnePod()
    pod.observe(0, eth0(1000))
    pod.observe(100 * MS, eth0(1500))
    assert pod.rates().egress_bps is not None
    assert pod.observe(200 * MS, second, source=source) == why
    assert pod.rates() == UNKNOWN
    bumped = {k: (rx + 100, tx + 100) for k, (rx, tx) in second.items()}
    assert pod.observe(300 * MS, bumped, source=source) == "ok"
    # 100 bytes in 0.1 s on each interface
    assert pod.rates().egress_bps == pytest.approx(1000 * len(bumped))


def test_an_unreadable_reading_is_unknown_and_restarts_the_segment() -> None:
    pod = OnePod()
    for k in range(12):
        pod.observe(k * 100 * MS, eth0(k * 100))
    assert pod.rates().egress_bps_1s is not None
    assert pod.observe(1200 * MS, None) == "unreadable"
    assert pod.rates() == UNKNOWN
    assert pod.observe(1300 * MS, eth0(5000)) == "ok"
    assert pod.rates() == UNKNOWN  # a new segment: one reading
    pod.observe(1400 * MS, eth0(5100))
    assert pod.rates().egress_bps == pytest.approx(1000)
    assert pod.rates().egress_bps_1s is None  # the new segment is 0.1 s old


def test_a_file_that_stops_parsing_is_unknown_and_reported() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    meter.observe(["p"], {"p": (0, net_dev(eth0(0)), 1)})
    meter.observe(["p"], {"p": (100 * MS, net_dev(eth0(10)), 1)})
    broken, malformed = meter.observe(["p"], {"p": (200 * MS, b"garbage", 1)})
    assert (broken["malformed"], malformed) == (1, ["p"])
    assert meter.rates()["p"] == UNKNOWN


def test_a_bad_file_read_again_unchanged_stays_unknown() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    for k in range(4):
        meter.observe(["p"], {"p": (k * 100 * MS, b"garbage", 1)})
        assert meter.rates()["p"] == UNKNOWN


def test_unchanged_files_are_steps_of_zero() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    same = net_dev(eth0(1000, rx=10))
    meter.observe(["a", "b"], {"a": (0, net_dev(eth0(0)), 1), "b": (0, same, 1)})
    for k in (1, 2):
        meter.observe(["a", "b"], {"a": (k * 100 * MS, same, 1), "b": (k * 100 * MS, same, 1)})
    rates = meter.rates()
    assert rates["a"] == Rates(0.0, 0.0)  # moved once, then still
    assert rates["b"] == Rates(0.0, 0.0)


def test_a_wrap_is_a_step_not_a_break() -> None:
    pod = OnePod()
    pod.observe(0, eth0(COUNTER_MODULUS - 50))
    assert pod.observe(100 * MS, eth0(50)) == "ok"
    assert pod.rates().egress_bps == pytest.approx(1000)


def test_a_reading_no_newer_than_the_last_is_a_break() -> None:
    pod = OnePod()
    pod.observe(100 * MS, eth0(0))
    pod.observe(200 * MS, eth0(100))
    assert pod.observe(200 * MS, eth0(900)) == "stale"  # never, with a monotonic clock
    assert pod.rates() == UNKNOWN


def test_pods_come_and_go_and_keep_their_history() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    for k in range(3):
        t = k * 100 * MS
        meter.observe(
            ["a", "b"], {"a": (t, net_dev(eth0(k * 100)), 1), "b": (t, net_dev(eth0(k)), 1)}
        )
    t = 300 * MS
    meter.observe(["c", "a"], {"a": (t, net_dev(eth0(300)), 1), "c": (t, net_dev(eth0(0)), 1)})
    rates = meter.rates()
    assert set(rates) == {"a", "c"}  # b is gone, and so is its column
    assert rates["a"].egress_bps == pytest.approx(1000)  # a continues across the change
    assert rates["c"] == UNKNOWN
    assert meter.keys == ["c", "a"]


def test_a_pod_without_a_reading_has_no_rates() -> None:
    meter = NodeMeter(interval_ns=100 * MS)
    meter.observe(["a", "b"], {"a": (0, net_dev(eth0(0)), 1)})
    meter.observe(["a", "b"], {"a": (100 * MS, net_dev(eth0(10)), 1)})
    assert meter.rates()["b"] == UNKNOWN
    assert meter.rates()["a"].egress_bps == pytest.approx(100)


# --------------------------------------------------------------- reference model

_WINDOW = 1000 * MS
_INTERVAL = 100 * MS


def _model(readings: list[tuple[int, int | None, int]]) -> Rates:
    """One pod's rates after ``readings`` of (t, tx or None, source), the plain way."""
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
            wrapped = tx < tx0
            if (wrapped and tx0 < 2**63) or step > 50e9 * (t - t0) / 1e9:
                ok = False
        segment = [*segment, (t, tx)] if ok else [(t, tx)]
        prev_source = source
    if len(segment) < 2:
        return UNKNOWN
    (t1, c1), (t0, c0) = segment[-1], segment[-2]
    egress = ((c1 - c0) % COUNTER_MODULUS) * 1e9 / (t1 - t0)
    base = [(t, c) for t, c in segment[:-1] if t <= t1 - _WINDOW + _INTERVAL // 2]
    if not base:
        return Rates(egress_bps=egress, ingress_bps=0.0)
    tb, _ = base[-1]
    total = sum(
        (segment[i + 1][1] - segment[i][1]) % COUNTER_MODULUS
        for i in range(len(segment) - 1)
        if segment[i][0] >= tb
    )
    return Rates(egress, 0.0, total * 1e9 / (t1 - tb), 0.0)


# What happens to one pod at one tick: bytes sent, absent (not resolved), unreadable,
# a reset to a small value, another source.
_event = st.one_of(
    st.integers(0, 10**9),
    st.just("absent"),
    st.just("unreadable"),
    st.just("reset"),
    st.just("source"),
)


@settings(max_examples=300)
@given(
    starts=st.lists(
        st.one_of(
            st.integers(0, 10**12), st.integers(COUNTER_MODULUS - 10**10, COUNTER_MODULUS - 1)
        ),
        min_size=1,
        max_size=4,
    ),
    ticks=st.lists(
        st.tuples(st.integers(60, 140), st.lists(_event, min_size=4, max_size=4)), max_size=40
    ),
)
def test_the_meter_agrees_with_the_reference_model(
    starts: list[int], ticks: list[tuple[int, list[object]]]
) -> None:
    keys = [f"pod-{i}" for i in range(len(starts))]
    meter = NodeMeter(interval_ns=_INTERVAL, window_ns=_WINDOW)
    tx = dict(zip(keys, starts, strict=True))
    source = dict.fromkeys(keys, 0)
    history: dict[str, list[tuple[int, int | None, int]]] = {k: [] for k in keys}
    t = 0
    schedule: list[tuple[int, list[object]]] = [(0, [0] * 4), *ticks]
    for i, (gap_ms, events) in enumerate(schedule):
        t += gap_ms * MS
        readings: dict[str, tuple[int, bytes | None, int]] = {}
        for j, key in enumerate(keys):
            event = events[j]
            when = t + j * 1000  # read one after the other
            if event == "absent":
                history[key].append((when, None, source[key]))
                continue
            if event == "unreadable":
                readings[key] = (when, None, source[key])
                history[key].append((when, None, source[key]))
                continue
            if event == "reset":
                tx[key] = 1000
            elif event == "source":
                source[key] += 1
            elif i > 0:
                assert isinstance(event, int)
                tx[key] = (tx[key] + event) % COUNTER_MODULUS
            readings[key] = (when, net_dev({b"eth0": (0, tx[key])}), source[key])
            history[key].append((when, tx[key], source[key]))
        meter.observe(keys, readings)
    got = meter.rates()
    for key in keys:
        want = _model(history[key])
        for field in ("egress_bps", "ingress_bps", "egress_bps_1s", "ingress_bps_1s"):
            g, w = getattr(got[key], field), getattr(want, field)
            assert (g is None) == (w is None), (key, field)
            if w is not None:
                assert g == pytest.approx(w, rel=1e-9), (key, field)
