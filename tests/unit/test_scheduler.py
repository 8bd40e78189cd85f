"""The scheduler with an injected clock: absolute deadlines, phase, skipping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.scheduler import Schedule, phase_offset

MS = 1_000_000


def test_on_time_wakeups_fire_every_deadline_without_drift():
    s = Schedule(interval_ns=MS, start_ns=0)
    sent = []
    now = 0
    for _ in range(1000):
        f = s.fire(now)
        assert f is not None
        sent.append(f.deadline_ns)
        now = s.next_deadline_ns + 37_000  # always 37 us late: lateness must not accumulate
    assert sent == [k * MS for k in range(1000)]
    assert s.skipped == 0


def test_missed_slots_are_skipped_not_burst():
    s = Schedule(interval_ns=MS, start_ns=0)
    assert s.fire(0) is not None
    f = s.fire(5 * MS + 10)  # woke 5 deadlines later
    assert f is not None
    assert (f.deadline_ns, f.skipped, f.lateness_ns) == (5 * MS, 4, 10)
    assert s.fire(5 * MS + 20) is None  # no burst for the skipped ones
    assert s.next_deadline_ns == 6 * MS


def test_early_wakeup_does_not_fire_unless_within_slack():
    s = Schedule(interval_ns=MS, start_ns=0, phase_ns=300)
    assert s.fire(299) is None
    assert s.fire(0, slack_ns=400) is not None
    f = s.fire(MS + 300 - 200, slack_ns=500)
    assert f is not None
    assert f.lateness_ns == -200
    assert f.skipped == 0


def test_phase_offsets_differ_between_targets_and_are_stable():
    a = phase_offset("robot-control", 10 * MS)
    b = phase_offset("safety-scanner", 10 * MS)
    assert a != b
    assert 0 <= a < 10 * MS
    assert a == phase_offset("robot-control", 10 * MS)


@given(st.integers(1, 10**9), st.lists(st.integers(0, 5 * 10**9), max_size=50))
def test_fires_plus_skips_account_for_every_passed_deadline(interval, wakeups):
    s = Schedule(interval_ns=interval, start_ns=0)
    now = 0
    for step in [0, *sorted(wakeups)]:
        now = max(now, step)
        s.fire(now)
    passed = now // interval + 1  # deadlines 0..floor(now/interval)
    assert s.fired + s.skipped == passed


def test_poisson_spacing_has_the_mean_interval():
    s = Schedule(interval_ns=MS, start_ns=0, poisson=True, seed=7)
    now, n = 0, 0
    while n < 5000:
        now = s.next_deadline_ns
        assert s.fire(now) is not None
        n += 1
    assert 0.9 * MS < now / n < 1.1 * MS
    assert s.skipped == 0
