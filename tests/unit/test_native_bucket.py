"""The token bucket and the per-source table, in both native backends (their agreement on
arbitrary arrivals is in test_native_parity.py)."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_recorder import BACKENDS  # the two native backends, one param each

S = 1_000_000_000


@pytest.mark.parametrize("impl", BACKENDS)
def test_a_burst_then_the_rate(impl: ModuleType) -> None:
    b = impl.TokenBucket(rate=2.0, burst=2, now_ns=0)
    assert [b.take(0) for _ in range(3)] == [True, True, False]
    assert b.wait_ns(0) == S // 2
    assert not b.take(S // 2 - 1)
    assert b.take(S // 2)  # half a second refills one token
    assert not b.take(S // 2)
    assert b.take(100 * S)  # a long idle refills only up to the burst
    assert b.take(100 * S)
    assert not b.take(100 * S)


@pytest.mark.parametrize("impl", BACKENDS)
def test_time_never_runs_backwards(impl: ModuleType) -> None:
    b = impl.TokenBucket(rate=1.0, burst=1, now_ns=10 * S)
    assert b.take(10 * S)
    assert not b.take(5 * S)  # an earlier time is no time passed, and no refund
    assert not b.take(10 * S + S // 2)
    assert b.take(11 * S)


@pytest.mark.parametrize("impl", BACKENDS)
def test_borrowing_leaves_a_debt_that_later_takers_pay(impl: ModuleType) -> None:
    b = impl.TokenBucket(rate=10.0, burst=1, now_ns=0)
    assert b.take(0)
    b.borrow(0)
    assert b.tokens == -1.0
    assert b.wait_ns(0) == S // 5  # the debt and its own token
    assert not b.take(S // 10)
    assert b.take(S // 5)


@pytest.mark.parametrize("impl", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1e-3, 1e9),
    burst=st.integers(1, 1000),
    steps=st.lists(st.tuples(st.integers(0, 10**10), st.booleans()), max_size=20),
)
def test_a_wait_is_always_enough(
    impl: ModuleType, rate: float, burst: int, steps: list[tuple[int, bool]]
) -> None:
    b = impl.TokenBucket(rate=rate, burst=burst, now_ns=0)
    now = 0
    for dt, borrow in steps:
        now += dt
        if borrow:
            b.borrow(now)
        else:
            b.take(now)
        wait = b.wait_ns(now)
        assert wait >= 0
        assert b.take(now + wait)  # no caller of wait_ns() ever spins on rounding
        now += wait


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("nan"), 1), (float("inf"), 1), (1, 1e400)]
)
def test_bad_settings_are_refused(impl: ModuleType, rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate must be > 0 and burst >= 1"):
        impl.TokenBucket(rate=rate, burst=burst, now_ns=0)


@pytest.mark.parametrize("impl", BACKENDS)
def test_sources_have_their_own_buckets(impl: ModuleType) -> None:
    t = impl.SourceBuckets(rate_pps=2.0, burst=2)
    assert [t.allow("198.18.0.1", 0) for _ in range(3)] == [True, True, False]
    assert t.allow("198.18.0.2", 0)
    assert t.allow("2001:db8::1", 0)
    assert t.allow("198.18.0.1", S // 2)
    assert len(t) == 3


@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_rate_is_unlimited(impl: ModuleType) -> None:
    t = impl.SourceBuckets(rate_pps=0, burst=0)
    assert all(t.allow("198.18.0.1", 0) for _ in range(1000))
    assert len(t) == 0  # nothing to remember


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(("rate", "burst"), [(-1, 1), (float("nan"), 1), (1, 0)])
def test_bad_table_settings_are_refused(impl: ModuleType, rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        impl.SourceBuckets(rate_pps=rate, burst=burst)


@pytest.mark.parametrize("impl", BACKENDS)
def test_the_table_is_bounded_and_forgets_the_stalest(impl: ModuleType) -> None:
    t = impl.SourceBuckets(rate_pps=1.0, burst=1)
    assert t.allow("198.18.0.1", 0)
    assert not t.allow("198.18.0.1", 0)  # empty now
    sources = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(3 * 4096)]
    for i, source in enumerate(sources, start=1):
        t.allow(source, i)  # every other source is seen later than the first
    assert len(t) <= impl.SOURCE_TABLE_SIZE
    assert t.allow("198.18.0.1", 3 * 4096 + 1)  # forgotten: a full bucket again
