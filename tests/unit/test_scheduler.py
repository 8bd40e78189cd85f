"""The scheduler with an injected clock: absolute deadlines, phase, skipping."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.scheduler import (
    STRETCH_STEP,
    Cadence,
    Fire,
    Schedule,
    Timetable,
    phase_offset,
)

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


# --- retiming and late joiners ----------------------------------------------------------


def test_a_late_joiner_lands_on_the_grid_and_counts_no_slots_before_it():
    s = Schedule(interval_ns=MS, start_ns=0, phase_ns=300, not_before_ns=5 * MS + 301)
    assert s.next_deadline_ns == 6 * MS + 300  # the grid 300 + k ms, from the join on
    f = s.fire(6 * MS + 300)
    assert f is not None
    assert (f.deadline_ns, f.skipped) == (6 * MS + 300, 0)


def test_retime_never_bursts_and_moves_to_the_new_grid():
    s = Schedule(interval_ns=MS, start_ns=0, phase_ns=100)
    for k in range(3):
        assert s.fire(k * MS + 100) is not None
    # Slower: the next send is at least the new interval after the latest one.
    s.retime(interval_ns=3 * MS, phase_ns=700, now_ns=2 * MS + 150)
    assert s.next_deadline_ns == 6 * MS + 700  # grid 700 + 3 ms * k, >= 2.1 ms + 3 ms
    assert s.fire(s.next_deadline_ns) is not None
    # Faster: at once on the new grid, never before now.
    s.retime(interval_ns=MS // 2, phase_ns=10, now_ns=7 * MS)
    assert s.next_deadline_ns == 7 * MS + 10
    assert s.skipped == 0


def test_poisson_retime_waits_a_new_gap():
    s = Schedule(interval_ns=MS, start_ns=0, poisson=True, seed=3)
    assert s.fire(s.next_deadline_ns) is not None
    last = s.last_deadline_ns
    assert last is not None
    s.retime(interval_ns=10 * MS, phase_ns=0, now_ns=last)
    assert s.next_deadline_ns > last


# --- the timetable ------------------------------------------------------------------------


def _drive(tt: Timetable, until_ns: int, events=()):
    """Wake up at every deadline (and at each event's time, to run it) like the engine's
    timers do; return every target's fires."""
    fires: dict[str, list[Fire]] = {}
    pending = sorted(events, key=lambda e: e[0])
    now = 0
    while True:
        names = list(tt)
        nxt = min((tt.next_deadline_ns(n) for n in names), default=until_ns)
        if pending and pending[0][0] <= nxt:
            now, action = pending.pop(0)
            action(tt, now)
            continue
        if nxt >= until_ns:
            return fires
        now = nxt
        for n in names:
            if tt.next_deadline_ns(n) <= now:
                f = tt.fire(n, now)
                assert f is not None
                fires.setdefault(n, []).append(f)


def _table(cap: float | None = None, **cadences: Cadence) -> Timetable:
    tt = Timetable(start_ns=0, max_total_rate_pps=cap)
    for name, c in cadences.items():
        tt.add(name, c, now_ns=0)
    return tt


def _add(name: str, c: Cadence):
    return lambda tt, now: tt.add(name, c, now_ns=now)


def _remove(name: str):
    return lambda tt, now: tt.remove(name, now_ns=now)


@pytest.mark.parametrize("cap", [None, 10_000.0])
def test_a_target_is_undisturbed_by_others_coming_and_going(cap):
    ten_hz = Cadence(interval_ns=100 * MS)
    alone = _drive(_table(cap, a=ten_hz), 5_000 * MS)
    churn = [
        (1_234 * MS, _add("b", Cadence(interval_ns=7 * MS))),
        (1_500 * MS, _add("c", Cadence(interval_ns=3 * MS, poisson=True))),
        (2_222 * MS, _remove("b")),
        (4_000 * MS, _remove("c")),
    ]
    busy = _drive(_table(cap, a=ten_hz), 5_000 * MS, churn)
    assert busy["a"] == alone["a"]
    assert len(alone["a"]) == 50
    assert len(busy["b"]) > 100


def test_the_cap_stretches_every_interval_by_one_factor_under_the_cap():
    cadences = {f"ep{i}": Cadence(interval_ns=100 * MS) for i in range(100)}  # 1000 pps
    tt = _table(400.0, **cadences)
    assert tt.demand_pps == pytest.approx(1000)
    assert tt.planned_pps <= 400
    assert tt.planned_pps > 400 / STRETCH_STEP  # within one step of the cap
    intervals = {tt.interval_ns(n) for n in cadences}
    assert len(intervals) == 1
    assert intervals.pop() >= 250 * MS
    sent = sum(len(f) for f in _drive(tt, 10_000 * MS).values())
    assert sent <= 400 * 10 + len(cadences)  # at most one slot per target beyond the cap


def test_adding_past_the_cap_retimes_the_others_without_a_burst():
    tt = _table(100.0, a=Cadence(interval_ns=20 * MS), b=Cadence(interval_ns=20 * MS))
    assert tt.stretch == 1.0  # 100 pps: exactly the cap
    fires = _drive(tt, 3_000 * MS, [(1_010 * MS, _add("c", Cadence(interval_ns=20 * MS, batch=2)))])
    assert tt.planned_pps <= 100
    for name in ("a", "b"):
        deadlines = [f.deadline_ns for f in fires[name]]
        gaps = [y - x for x, y in itertools.pairwise(deadlines)]
        assert min(gaps) >= 20 * MS  # never sooner than an interval, across the retime
        assert gaps[-1] == tt.interval_ns(name) > 40 * MS
        assert sum(f.skipped for f in fires[name]) == 0


def test_removal_gives_back_the_original_grid():
    a = Cadence(interval_ns=10 * MS)
    undisturbed = _drive(_table(150.0, a=a), 4_000 * MS)["a"]
    fires = _drive(
        _table(150.0, a=a),
        4_000 * MS,
        [(500 * MS, _add("big", Cadence(interval_ns=5 * MS))), (1_500 * MS, _remove("big"))],
    )["a"]
    after = [f for f in fires if f.deadline_ns > 1_600 * MS]
    assert after == [f for f in undisturbed if f.deadline_ns > 1_600 * MS]
    during = [f.deadline_ns for f in fires if 600 * MS < f.deadline_ns < 1_500 * MS]
    assert len(during) < 90 * 0.75  # it was stretched meanwhile


def test_one_target_at_the_edge_does_not_retime_the_others_back_and_forth():
    base = {f"ep{i}": Cadence(interval_ns=100 * MS) for i in range(100)}
    tt = _table(1000.0, **base)
    tt.add("surge", Cadence(interval_ns=100 * MS), now_ns=0)  # 1010 pps: one step up
    level = tt.stretch
    assert level == STRETCH_STEP
    for k in range(10):  # a rolling update: one goes, one comes
        assert tt.remove("surge", now_ns=k * MS) == set()
        assert tt.add("surge", Cadence(interval_ns=100 * MS), now_ns=k * MS) == set()
    assert tt.stretch == level
    for i in range(10):  # well below the cap: back to the asked-for intervals
        tt.remove(f"ep{i}", now_ns=20 * MS)
    assert tt.stretch == 1.0
    assert tt.interval_ns("ep50") == 100 * MS


@given(
    st.lists(st.tuples(st.integers(100_000, 10**9), st.integers(1, 8)), min_size=0, max_size=40),
    st.floats(1.0, 1e6),
)
def test_a_fresh_timetable_is_under_the_cap_and_within_a_step_of_it(cadences, cap):
    tt = Timetable(start_ns=0, max_total_rate_pps=cap)
    tt.update(
        now_ns=0,
        add={f"t{i}": Cadence(interval_ns=iv, batch=b) for i, (iv, b) in enumerate(cadences)},
    )
    assert tt.planned_pps <= cap * (1 + 1e-9)
    if tt.stretch > 1.0:
        assert tt.demand_pps / (tt.stretch / STRETCH_STEP) > cap
    else:
        assert tt.demand_pps <= cap


def test_bad_changes_change_nothing():
    tt = _table(None, a=Cadence(interval_ns=MS))
    with pytest.raises(ValueError, match="already scheduled"):
        tt.update(now_ns=0, add={"b": Cadence(interval_ns=MS), "a": Cadence(interval_ns=MS)})
    with pytest.raises(ValueError, match="no schedule"):
        tt.update(now_ns=0, remove=["a", "zz"])
    assert list(tt) == ["a"]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            Timetable(start_ns=0, max_total_rate_pps=bad)
