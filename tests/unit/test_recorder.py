"""ProbeRecorder: the RTT arithmetic by hand, and the scalar path equal to the vectorised one.

No sockets: replies are built as the native core delivers them (its ``REPLY_DTYPE``, from
both implementations) and fed to the recorder with explicit times.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.engine.recorder import (
    CLOCK_STEP_NS,
    NATIVE_FIELDS,
    NATIVE_TWO_STEP_FIELDS,
    SOURCE_KERNEL,
    SOURCE_USER,
    ProbeRecorder,
    Replies,
    Reply,
    Sample,
    delays,
)
from detnet.engine.ring import (
    FLAG_DUP,
    FLAG_KERNEL,
    FLAG_LATE,
    FLAG_LOST,
    FLAG_RECEIVED,
    FLAG_REORDERED,
)
from detnet.native import _fallback

try:
    _core: ModuleType | None = importlib.import_module("detnet.native._core")
except ImportError:  # the extension is not built: the fallback alone is tested
    _core = None

BACKENDS = [
    pytest.param(_fallback, id="python"),
    pytest.param(
        _core,
        id="cython",
        marks=pytest.mark.skipif(_core is None, reason="Cython extension not built"),
    ),
]

S = 1_000_000_000
BASE = 1_764_000_000 * S  # a CLOCK_REALTIME of late 2025, where real stamps live
REFL = BASE + 2_000_000  # the reflector's clock runs 2 ms ahead of ours
TIMEOUT = 100


def _recorder(
    samples: list[Sample] | None = None, *, capacity: int = 64, timeout: int = TIMEOUT
) -> ProbeRecorder:
    return ProbeRecorder(
        name="t",
        timeout_ns=timeout,
        capacity=capacity,
        tracker_capacity=16,
        on_sample=None if samples is None else samples.append,
    )


def _send(rec: ProbeRecorder, *, now: int = 0, user_tx: int, kernel_tx: int, offset: int = 0):
    rec.on_sent(
        now_ns=now,
        offset_ns=offset,
        user_tx_ns=np.array([user_tx], np.int64),
        kernel_tx_ns=np.array([kernel_tx], np.int64),
    )


def _replies(replies: list[Reply]) -> Replies:
    def col(i: int) -> np.ndarray:
        return np.array([r[i] for r in replies], np.int64)

    ov = [r.rtt_override_ns for r in replies]
    return Replies(
        seq=col(0),
        rx_user_ns=col(1),
        rx_kernel_ns=col(2),
        refl_rx_ns=col(3),
        refl_tx_ns=col(4),
        rtt_override_ns=None if all(o is None for o in ov) else np.array(ov, np.int64),
    )


def _feed(rec: ProbeRecorder, path: str, replies: list[Reply], *, now: int = 1, offset=0):
    """Record ``replies`` arriving together: one batch (vector) or one at a time (scalar)."""
    if path == "vector":
        rec.record_replies(_replies(replies), now_ns=now, offset_now_ns=offset)
    else:
        for r in replies:
            rec.record_reply(r, now_ns=now, offset_now_ns=offset)


PATHS = ["vector", "scalar"]


# --- the arithmetic, by hand ------------------------------------------------------------
# (name, user_tx, kernel_tx, reply, rtt, user_rtt, fwd, back, source)
ARITHMETIC = [
    (
        "kernel stamps, reflector turnaround subtracted",
        BASE + 1_000,
        BASE + 1_010,
        Reply(7, BASE + 1_600, BASE + 1_500, REFL + 5_000, REFL + 5_100),
        390,  # 1_500 - 1_010 - 100
        500,  # 1_600 - 1_000 - 100
        2_003_990.0,  # REFL + 5_000 - (BASE + 1_010)
        -2_003_600.0,  # BASE + 1_500 - (REFL + 5_100)
        "kernel",
    ),
    (
        "no kernel RX stamp: user stamps both ways",
        BASE + 1_000,
        BASE + 1_010,
        Reply(7, BASE + 1_600, 0, REFL + 5_000, REFL + 5_100),
        500,
        500,
        2_004_000.0,
        -2_003_500.0,
        "user",
    ),
    (
        "no kernel TX stamp: user stamps both ways",
        BASE + 1_000,
        0,
        Reply(7, BASE + 1_600, BASE + 1_500, REFL + 5_000, REFL + 5_100),
        500,
        500,
        2_004_000.0,
        -2_003_500.0,
        "user",
    ),
    (
        "reflector sent no TX stamp: no turnaround, no directions",
        BASE + 1_000,
        BASE + 1_010,
        Reply(7, BASE + 1_600, BASE + 1_500, REFL + 5_000, 0),
        490,
        600,
        None,
        None,
        "kernel",
    ),
    (
        "reflector sent no RX stamp",
        BASE + 1_000,
        BASE + 1_010,
        Reply(7, BASE + 1_600, BASE + 1_500, 0, REFL + 5_100),
        490,
        600,
        None,
        None,
        "kernel",
    ),
    (
        "TCP_INFO RTT replaces the user-space one",
        BASE + 1_000,
        0,
        Reply(7, BASE + 1_600, rtt_override_ns=7_000),
        7_000,
        600,
        None,
        None,
        "kernel",
    ),
    (
        "TCP_INFO gave no RTT: the user-space one",
        BASE + 1_000,
        0,
        Reply(7, BASE + 1_600, rtt_override_ns=0),
        600,
        600,
        None,
        None,
        "user",
    ),
]
ARITH_IDS = [a[0] for a in ARITHMETIC]


@pytest.mark.parametrize(
    ("name", "user_tx", "kernel_tx", "reply", "rtt", "user_rtt", "fwd", "back", "source"),
    ARITHMETIC,
    ids=ARITH_IDS,
)
def test_delays_by_hand(name, user_tx, kernel_tx, reply, rtt, user_rtt, fwd, back, source):
    d = delays(
        user_tx_ns=np.array([user_tx], np.int64),
        kernel_tx_ns=np.array([kernel_tx], np.int64),
        replies=_replies([reply]),
    )
    assert d.rtt_ns.tolist() == [rtt]
    assert d.user_rtt_ns.tolist() == [user_rtt]
    assert [None if math.isnan(x) else x for x in d.fwd_ns.tolist()] == [fwd]
    assert [None if math.isnan(x) else x for x in d.back_ns.tolist()] == [back]
    assert d.source.tolist() == [SOURCE_KERNEL if source == "kernel" else SOURCE_USER]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("name", "user_tx", "kernel_tx", "reply", "rtt", "user_rtt", "fwd", "back", "source"),
    ARITHMETIC,
    ids=ARITH_IDS,
)
def test_recorded_by_hand(path, name, user_tx, kernel_tx, reply, rtt, user_rtt, fwd, back, source):
    samples: list[Sample] = []
    rec = _recorder(samples)
    for _ in range(7):  # seq 0..6 lost later; seq 7 is the probe under test
        _send(rec, user_tx=BASE, kernel_tx=0)
    _send(rec, now=5, user_tx=user_tx, kernel_tx=kernel_tx)
    _feed(rec, path, [reply], now=9)
    snap = rec.ring.snapshot()
    assert snap.seq.tolist() == [7]
    assert snap.t_ns.tolist() == [9]
    assert snap.sent_ns.tolist() == [user_tx]
    assert snap.rtt_ns.tolist() == [rtt]
    assert snap.user_rtt_ns.tolist() == [user_rtt]
    kernel = FLAG_KERNEL if source == "kernel" else 0
    assert snap.flags.tolist() == [FLAG_RECEIVED | kernel]
    assert rec.timestamp_source == source
    assert samples == [Sample("t", 7, user_tx, rtt, user_rtt, fwd, back, False, source)]
    assert rec.base_rtt(9) == rtt


# --- what replies and losses mean --------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("offset_now", "dropped"),
    [
        (CLOCK_STEP_NS, False),
        (-CLOCK_STEP_NS, False),
        (CLOCK_STEP_NS + 1, True),
        (-CLOCK_STEP_NS - 1, True),
    ],
)
def test_a_sample_across_a_clock_step_is_dropped(path, offset_now, dropped):
    rec = _recorder()
    _send(rec, user_tx=BASE, kernel_tx=0, offset=0)
    _feed(rec, path, [Reply(0, BASE + 500)], offset=offset_now)
    t = rec.totals()
    assert (t.received, t.dropped) == ((0, 1) if dropped else (1, 0))
    assert len(rec.ring) == (0 if dropped else 1)
    assert rec.in_flight == 0


@pytest.mark.parametrize("path", PATHS)
def test_duplicates_flag_their_record_in_one_batch_and_across_batches(path):
    rec = _recorder()
    for _ in range(2):
        _send(rec, user_tx=BASE, kernel_tx=0)
    _feed(rec, path, [Reply(0, BASE + 500), Reply(0, BASE + 600)])
    _feed(rec, path, [Reply(1, BASE + 700)])
    _feed(rec, path, [Reply(1, BASE + 800)], now=2)
    snap = rec.ring.snapshot()
    assert snap.seq.tolist() == [0, 1]
    assert snap.rtt_ns.tolist() == [500, 700]  # the first reply counts
    assert snap.flags.tolist() == [FLAG_RECEIVED | FLAG_DUP] * 2
    assert rec.totals().duplicates == 2


@pytest.mark.parametrize("path", PATHS)
def test_a_probe_past_its_timeout_is_lost_and_its_late_reply_flags_it(path):
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec, now=0, user_tx=BASE + 10, kernel_tx=0)
    _send(rec, now=50, user_tx=BASE + 20, kernel_tx=0)
    rec.sweep(TIMEOUT + 1)  # seq 0 is due at 100, seq 1 at 150
    assert samples == [Sample("t", 0, BASE + 10, None, None, None, None, True, "user")]
    _feed(rec, path, [Reply(0, BASE + 900), Reply(1, BASE + 920)], now=TIMEOUT + 2)
    snap = rec.ring.snapshot()
    assert snap.seq.tolist() == [0, 1]
    assert snap.t_ns.tolist() == [TIMEOUT + 1, TIMEOUT + 2]
    assert snap.flags.tolist() == [FLAG_LOST | FLAG_LATE, FLAG_RECEIVED]
    assert np.isnan(snap.rtt_ns[0])
    assert snap.rtt_ns[1] == 900
    t = rec.totals()
    assert (t.sent, t.received, t.lost, t.late) == (2, 1, 1, 1)


@pytest.mark.parametrize("path", PATHS)
def test_recording_expires_overdue_probes_first(path):
    rec = _recorder()
    _send(rec, now=0, user_tx=BASE, kernel_tx=0)
    _send(rec, now=TIMEOUT, user_tx=BASE, kernel_tx=0)
    _feed(rec, path, [Reply(1, BASE + 300)], now=TIMEOUT + 1)
    assert rec.ring.snapshot().flags.tolist() == [FLAG_LOST, FLAG_RECEIVED]


@pytest.mark.parametrize("path", PATHS)
def test_a_reply_after_a_later_probes_reply_is_reordered(path):
    rec = _recorder()
    for _ in range(3):
        _send(rec, user_tx=BASE, kernel_tx=0)
    _feed(rec, path, [Reply(1, BASE + 100), Reply(0, BASE + 200), Reply(2, BASE + 300)])
    snap = rec.ring.snapshot()
    assert snap.seq.tolist() == [1, 0, 2]
    assert snap.flags.tolist() == [FLAG_RECEIVED, FLAG_RECEIVED | FLAG_REORDERED, FLAG_RECEIVED]
    assert rec.totals().reordered == 1


@pytest.mark.parametrize("path", PATHS)
def test_histogram_and_base_rtt(path):
    rec = _recorder()
    for _ in range(3):
        _send(rec, user_tx=BASE, kernel_tx=0)
    _feed(rec, path, [Reply(0, BASE + 390), Reply(1, BASE + 15_000), Reply(2, BASE + 2_000_000)])
    h = rec.histogram.snapshot()
    # le 10 us: 390 ns; le 20 us: 15 us; le 2 ms (the 14th edge, inclusive): 2 ms.
    assert h.cumulative == (1, *[2] * 12, *[3] * 12)
    assert h.edges_s[13] == 2e-3
    assert h.sum_s == 2_015_390 / 1e9
    assert rec.base_rtt(1) == 390.0


def test_timestamp_source_is_what_the_latest_record_used():
    rec = _recorder()
    assert rec.timestamp_source == "user"
    rec.expect_source(SOURCE_KERNEL)
    assert rec.timestamp_source == "kernel"  # before any record: what the prober expects
    for _ in range(2):
        _send(rec, user_tx=BASE, kernel_tx=BASE + 5)
    rec.record_reply(Reply(0, BASE + 100), now_ns=1, offset_now_ns=0)
    assert rec.timestamp_source == "user"
    rec.record_reply(Reply(1, BASE + 100, BASE + 90), now_ns=1, offset_now_ns=0)
    assert rec.timestamp_source == "kernel"
    with pytest.raises(ValueError, match="unknown timestamp source"):
        rec.expect_source(7)


def test_skipped_slots_and_send_errors_are_in_the_totals():
    rec = _recorder()
    rec.skipped += 3
    rec.send_errors += 1
    _send(rec, user_tx=BASE, kernel_tx=0)
    t = rec.totals()
    assert (t.sent, t.skipped, t.send_errors) == (1, 3, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_reply_and_a_batch_use_the_native_fields_of_every_field(backend):
    batch_fields = tuple(f.name for f in dataclasses.fields(Replies))
    assert Reply._fields[: len(batch_fields)] == batch_fields
    # What only the scalar path reads, each from its native field, in Reply's order.
    assert Reply._fields[len(batch_fields) :] == (
        "kind",
        "followup_source",
        "followup_seq",
        "refl_tx_kernel_ns",
        "rx_hw_ns",
    )
    assert set(NATIVE_TWO_STEP_FIELDS) <= set(backend.REPLY_DTYPE.names)
    assert Reply._fields[: len(NATIVE_FIELDS)] == (
        "seq",
        "rx_user_ns",
        "rx_kernel_ns",
        "refl_rx_ns",
        "refl_tx_ns",
    )
    assert set(NATIVE_FIELDS) <= set(backend.REPLY_DTYPE.names)
    r = np.zeros(1, backend.REPLY_DTYPE)
    r[0]["seq"], r[0]["user_rx_ns"], r[0]["kernel_rx_ns"] = 0, BASE + 600, BASE + 500
    r[0]["refl_rx_ns"], r[0]["refl_tx_ns"], r[0]["tx_ns"] = REFL + 100, REFL + 150, 12
    one, batch = _recorder(), _recorder()
    for rec in (one, batch):
        _send(rec, user_tx=BASE + 0, kernel_tx=BASE + 10)
    one.record_native(r, now_ns=1, offset_now_ns=0)  # one reply: the scalar path
    batch.record_replies(Replies.from_native(r), now_ns=1, offset_now_ns=0)
    for rec in (one, batch):
        snap = rec.ring.snapshot()
        assert snap.rtt_ns.tolist() == [440.0]  # 500 - 10 - 50
        assert snap.user_rtt_ns.tolist() == [550.0]  # 600 - 0 - 50
        assert snap.fwd_ns.tolist() == [2_000_090.0]  # REFL + 100 - (BASE + 10)
        assert snap.back_ns.tolist() == [-1_999_650.0]  # BASE + 500 - (REFL + 150)


# --- the scalar path equals the vectorised one ------------------------------------------
_stamp = st.integers(1, 10**9).map(lambda x: BASE + x)
_maybe_stamp = st.one_of(st.just(0), _stamp)
_refl_stamp = st.one_of(st.just(0), st.integers(1, 10**9).map(lambda x: REFL + x))
_offset = st.sampled_from([0, 4_000_000, CLOCK_STEP_NS, CLOCK_STEP_NS + 1, 9_000_000])
# Seconds between events: short steps keep probes in flight (reordering), long ones time
# them out and cross base-RTT minutes.
_advance = st.one_of(st.integers(0, 3), st.integers(0, 40)).map(lambda x: x * S)

_send_event = st.tuples(
    st.just("send"),
    _advance,
    _offset,
    st.lists(st.tuples(_stamp, _maybe_stamp), min_size=1, max_size=4),
)
_reply = st.tuples(
    st.integers(-3, 20),  # how far back from the newest probe (negative: never sent)
    _stamp,
    _maybe_stamp,
    _refl_stamp,
    _refl_stamp,
    st.one_of(st.just(0), st.integers(1, 10**7)),
)
_replies_event = st.tuples(
    st.just("replies"),
    _advance,
    _offset,
    st.booleans(),  # TCP_INFO overrides (the TCP connect prober) or not
    st.lists(_reply, min_size=1, max_size=8),
)
_sweep_event = st.tuples(st.just("sweep"), _advance)
_events = st.lists(st.one_of(_send_event, _replies_event, _sweep_event), max_size=40)


def _nan_none(a: np.ndarray) -> list[float | None]:
    return [None if math.isnan(x) else x for x in a.tolist()]


def _state(rec: ProbeRecorder, now: int) -> tuple[object, ...]:
    snap = rec.ring.snapshot()
    tr = rec.tracker
    return (
        snap.t_ns.tolist(),
        snap.sent_ns.tolist(),
        snap.seq.tolist(),
        _nan_none(snap.rtt_ns),
        _nan_none(snap.user_rtt_ns),
        _nan_none(snap.fwd_ns),
        _nan_none(snap.back_ns),
        snap.flags.tolist(),
        rec.ring.total,
        rec.histogram.snapshot(),
        [rec.base_rtt(t) for t in (None, now, now + 5 * 60 * S, now + 10 * 60 * S)],
        rec.totals(),
        rec.timestamp_source,
        rec.in_flight,
        tr.state.tolist(),
        tr.ring_pos.tolist(),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None)
@given(events=_events, capacity=st.integers(2, 24))
def test_scalar_path_equals_vectorised_path(backend, events, capacity):
    """Every reply recorded one at a time gives the same records, flags, histogram, base
    RTT, samples and totals as the same replies recorded in batches (even batches of one)."""
    vec_samples: list[Sample] = []
    sca_samples: list[Sample] = []
    vec = _recorder(vec_samples, capacity=capacity, timeout=60 * S)
    sca = _recorder(sca_samples, capacity=capacity, timeout=60 * S)
    now = 0
    for event in events:
        now += event[1]
        if event[0] == "sweep":
            for rec in (vec, sca):
                rec.sweep(now)
        elif event[0] == "send":
            _, _, offset, stamps = event
            user_tx = np.array([u for u, _ in stamps], np.int64)
            kernel_tx = np.array([k for _, k in stamps], np.int64)
            for rec in (vec, sca):
                rec.on_sent(
                    now_ns=now, offset_ns=offset, user_tx_ns=user_tx, kernel_tx_ns=kernel_tx
                )
        else:
            _, _, offset, tcp_info, replies = event
            raw = np.zeros(len(replies), backend.REPLY_DTYPE)  # as the native core fills it
            newest = vec.next_seq - 1
            raw["seq"] = [
                max(newest - back, 0) if back >= 0 else newest - back for back, *_ in replies
            ]
            raw["user_rx_ns"] = [r[1] for r in replies]
            raw["kernel_rx_ns"] = [r[2] for r in replies]
            raw["refl_rx_ns"] = [r[3] for r in replies]
            raw["refl_tx_ns"] = [r[4] for r in replies]
            override = [r[5] for r in replies]
            batch = Replies.from_native(raw)
            if tcp_info:
                batch = dataclasses.replace(batch, rtt_override_ns=np.array(override, np.int64))
            vec.record_replies(batch, now_ns=now, offset_now_ns=offset)
            for i in range(len(replies)):
                if tcp_info:
                    row = raw[i]
                    one = Reply(
                        int(row["seq"]),
                        int(row["user_rx_ns"]),
                        int(row["kernel_rx_ns"]),
                        int(row["refl_rx_ns"]),
                        int(row["refl_tx_ns"]),
                        override[i],
                    )
                    sca.record_reply(one, now_ns=now, offset_now_ns=offset)
                else:
                    sca.record_native(raw[i : i + 1], now_ns=now, offset_now_ns=offset)
        assert _state(sca, now) == _state(vec, now)
        assert sca_samples == vec_samples
