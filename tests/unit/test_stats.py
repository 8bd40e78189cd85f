"""Statistics against straightforward reference computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.engine.ring import FLAG_DUP, FLAG_LOST, FLAG_RECEIVED, FLAG_REORDERED, RttRing
from detnet.engine.stats import BaseRttTracker, ipdv, iqr, percentiles, rfc3550_jitter, window_stats

rtts = st.lists(st.integers(min_value=1, max_value=10**9), min_size=1, max_size=300)


@given(rtts, st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=8))
def test_percentiles_equal_numpy(values, qs):
    assert np.array_equal(percentiles(values, qs), np.percentile(values, qs))


@given(
    st.integers(1020, 5000),
    st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=8),
    st.integers(0, 2**32 - 1),
)
def test_percentiles_of_large_samples_equal_numpy(n, qs, seed):
    values = np.random.default_rng(seed).integers(1, 10**9, n).astype(np.float64)
    assert np.array_equal(percentiles(values, qs), np.percentile(values, qs))


@given(rtts)
def test_iqr_is_q3_minus_q1(values):
    q1, q3 = np.percentile(values, [25, 75])
    assert iqr(values) == q3 - q1


def test_percentiles_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        percentiles([], (50,))


def _rfc3550_reference(x: list[int]) -> float:
    j = 0.0
    for a, b in itertools.pairwise(x):
        j += (abs(b - a) - j) / 16
    return j


@given(st.lists(st.integers(min_value=0, max_value=10**7), min_size=2, max_size=400))
def test_rfc3550_matches_the_recurrence(values):
    got = rfc3550_jitter(values)
    assert got == pytest.approx(_rfc3550_reference(values), rel=1e-9, abs=1e-6)


def test_rfc3550_needs_two_samples():
    assert rfc3550_jitter([5]) is None


def _ipdv_reference(delays: list[float], seqs: list[int]) -> list[float]:
    by_seq = dict(zip(seqs, delays, strict=True))
    return [by_seq[s + 1] - by_seq[s] for s in sorted(by_seq) if s + 1 in by_seq]


@given(
    st.lists(
        st.tuples(st.integers(0, 200), st.integers(-(10**6), 10**6)),
        unique_by=lambda t: t[0],
        max_size=200,
    )
)
def test_ipdv_pairs_consecutive_sequence_numbers_only(pairs):
    # Arbitrary subsets of sequence numbers (losses) in arbitrary order (reordering).
    seqs = [s for s, _ in pairs]
    delays = [float(d) for _, d in pairs]
    got = ipdv(delays, seqs)
    assert sorted(got.tolist()) == sorted(_ipdv_reference(delays, seqs))


def test_ipdv_never_bridges_a_loss():
    # seq 2 lost: the pair (1, 3) must not count.
    assert ipdv([10.0, 20.0, 100.0], [0, 1, 3]).tolist() == [10.0]


def test_base_rtt_keeps_minimum_of_bucket_minima_and_forgets_old_buckets():
    b = BaseRttTracker(bucket_ns=10, buckets=3)
    assert b.base() is None
    b.update(0, 50.0)
    b.update(5, 40.0)
    b.update(15, 70.0)
    assert b.base(15) == 40.0
    b.update(45, 60.0)  # buckets 0 and 1 are now out of the last three
    assert b.base(45) == 60.0


@st.composite
def probe_logs(draw):
    """A run of probes: each lost or received (with an RTT), some duplicated/reordered."""
    n = draw(st.integers(1, 300))
    lost = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rtt = draw(st.lists(st.integers(1_000, 10**7), min_size=n, max_size=n))
    dup = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    reo = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return lost, rtt, dup, reo


@settings(max_examples=60)
@given(probe_logs(), st.integers(1, 400))
def test_window_stats_against_reference(log, last_n):
    lost, rtt, dup, reo = log
    n = len(lost)
    ring = RttRing(512)
    flags = np.array(
        [
            (FLAG_LOST if lo else FLAG_RECEIVED)
            | (FLAG_DUP if d else 0)
            | (FLAG_REORDERED if r and not lo else 0)
            for lo, d, r in zip(lost, dup, reo, strict=True)
        ],
        np.uint8,
    )
    r = np.array([np.nan if lo else float(v) for lo, v in zip(lost, rtt, strict=True)])
    ring.append(
        t_ns=np.arange(n, dtype=np.int64),
        sent_ns=np.arange(n, dtype=np.int64),
        seq=np.arange(n, dtype=np.int64),
        rtt_ns=r,
        user_rtt_ns=r,
        fwd_ns=r / 2,
        back_ns=r / 2,
        flags=flags,
    )
    s = window_stats(ring.snapshot(last_n=last_n), target="t", protocol="udp", base_rtt_ns=None)
    w = slice(max(n - last_n, 0), n)
    wl, wr = np.array(lost[w]), np.array(rtt[w])[~np.array(lost[w])]
    assert s.lost == int(wl.sum())
    assert s.received == len(wr)
    assert s.sent == len(wl)
    assert s.loss_ratio == pytest.approx(wl.mean())
    assert s.duplicates == sum(dup[w])
    assert s.reordered == sum(r and not lo for r, lo in zip(reo[w], lost[w], strict=True))
    if len(wr):
        assert s.rtt_p99_ns == np.percentile(wr, 99)
        assert s.rtt_min_ns == wr.min()
        assert s.rtt_max_ns == wr.max()
        assert s.jitter_iqr_ns == np.percentile(wr, 75) - np.percentile(wr, 25)
    else:
        assert s.rtt_p50_ns is None
        assert s.jitter_iqr_ns is None


def test_queue_delay_is_p90_minus_base():
    ring = RttRing(64)
    r = np.array([100.0, 200.0, 300.0, 400.0, 500.0])
    ring.append(
        t_ns=np.arange(5, dtype=np.int64),
        sent_ns=np.arange(5, dtype=np.int64),
        seq=np.arange(5, dtype=np.int64),
        rtt_ns=r,
        user_rtt_ns=r,
        fwd_ns=r,
        back_ns=r,
        flags=FLAG_RECEIVED,
    )
    s = window_stats(ring.snapshot(), target="t", protocol="udp", base_rtt_ns=50.0)
    assert s.queue_delay_ns == pytest.approx(np.percentile(r, 90) - 50.0)
    assert s.base_rtt_ns == 50.0
