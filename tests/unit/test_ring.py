"""RttRing and the cumulative histogram."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.ring import (
    FLAG_DUP,
    FLAG_RECEIVED,
    RTT_EDGES_S,
    CumulativeHistogram,
    RttRing,
)


def _append(ring: RttRing, seqs: np.ndarray) -> int:
    f = seqs.astype(np.float64)
    return ring.append(
        t_ns=seqs * 10,
        sent_ns=seqs,
        seq=seqs,
        rtt_ns=f,
        user_rtt_ns=f,
        fwd_ns=f,
        back_ns=f,
        flags=FLAG_RECEIVED,
    )


@given(st.lists(st.integers(0, 40), max_size=30), st.integers(2, 50))
def test_ring_keeps_the_newest_records_in_order(batches, capacity):
    ring = RttRing(capacity)
    total = 0
    for size in batches:
        pos = _append(ring, np.arange(total, total + size, dtype=np.int64))
        assert pos == total
        total += size
    snap = ring.snapshot()
    assert snap.seq.tolist() == list(range(max(total - capacity, 0), total))
    assert len(ring) == min(total, capacity)


def test_snapshot_window_by_count_and_time():
    ring = RttRing(100)
    _append(ring, np.arange(50, dtype=np.int64))
    assert ring.snapshot(last_n=5).seq.tolist() == [45, 46, 47, 48, 49]
    assert ring.snapshot(since_ns=470).seq.tolist() == [47, 48, 49]
    assert ring.snapshot(last_n=2, since_ns=0).seq.tolist() == [48, 49]


def test_snapshot_is_a_copy():
    ring = RttRing(10)
    _append(ring, np.arange(3, dtype=np.int64))
    snap = ring.snapshot()
    _append(ring, np.arange(3, 13, dtype=np.int64))
    assert snap.seq.tolist() == [0, 1, 2]


def test_set_flags_ignores_overwritten_positions():
    ring = RttRing(4)
    _append(ring, np.arange(6, dtype=np.int64))  # positions 0, 1 are gone
    ring.set_flags(np.array([0, 5], np.int64), FLAG_DUP)
    snap = ring.snapshot()
    assert [bool(f & FLAG_DUP) for f in snap.flags] == [False, False, False, True]


def test_append_one_matches_append():
    a, b = RttRing(8), RttRing(8)
    _append(a, np.array([7], np.int64))
    b.append_one(
        t_ns=70,
        sent_ns=7,
        seq=7,
        rtt_ns=7.0,
        user_rtt_ns=7.0,
        fwd_ns=7.0,
        back_ns=7.0,
        flags=FLAG_RECEIVED,
    )
    sa, sb = a.snapshot(), b.snapshot()
    for field in ("t_ns", "sent_ns", "seq", "rtt_ns", "flags"):
        assert np.array_equal(getattr(sa, field), getattr(sb, field))


def test_ring_rejects_tiny_capacity():
    with pytest.raises(ValueError, match="capacity"):
        RttRing(1)


@given(st.lists(st.lists(st.integers(0, 3 * 10**9), max_size=20), max_size=20))
def test_histogram_buckets_are_cumulative_and_never_decrease(batches):
    h = CumulativeHistogram(RTT_EDGES_S)
    prev = h.snapshot().cumulative
    seen: list[int] = []
    for batch in batches:
        if len(batch) == 1:
            h.add_one(batch[0])
        else:
            h.add(np.array(batch, np.int64))
        seen += batch
        snap = h.snapshot()
        assert all(b >= a for a, b in zip(snap.cumulative, snap.cumulative[1:], strict=False))
        assert all(now >= before for before, now in zip(prev, snap.cumulative, strict=True))
        prev = snap.cumulative
    snap = h.snapshot()
    assert snap.count == len(seen)
    for edge, cum in zip(RTT_EDGES_S, snap.cumulative, strict=False):
        assert cum == sum(1 for v in seen if v <= round(edge * 1e9))
    assert snap.sum_s == pytest.approx(sum(seen) / 1e9)


@given(
    st.lists(st.integers(0, 40), max_size=30),
    st.integers(2, 50),
    st.integers(-5, 1500),
    st.one_of(st.none(), st.integers(0, 60)),
)
def test_a_time_window_is_the_records_completed_since(batches, capacity, since, last_n):
    ring = RttRing(capacity)
    total = 0
    for size in batches:
        _append(ring, np.arange(total, total + size, dtype=np.int64))
        total += size
    newest = list(range(max(total - capacity, 0), total))
    if last_n is not None:
        newest = newest[len(newest) - min(last_n, len(newest)) :]
    expected = [s for s in newest if s * 10 >= since]  # t_ns = 10 * seq
    assert ring.snapshot(since_ns=since, last_n=last_n).seq.tolist() == expected
