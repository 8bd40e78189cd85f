"""Early warning, knee memory and the climb and cut arithmetic around the knee."""

from __future__ import annotations

import pytest

from detnet.controller.knee import (
    KneeMemory,
    QueueWatch,
    WarningParams,
    climb_to,
    cut_to,
    drain_knee,
    trim_to,
)

S = 1_000_000_000


def test_warning_level_is_a_fraction_of_the_slo_or_a_multiple_of_the_noise() -> None:
    watch = QueueWatch(WarningParams(fraction=0.1, noise_multiple=3.0, floor_ms=0.02))
    assert watch.level_ms("t", 2.0) == pytest.approx(0.2)  # no noise seen yet
    watch.update(0, {"t": 0.1}, {"t": 2.0})  # a noisy target: floor 0.1 ms
    assert watch.noise_ms("t") == pytest.approx(0.1)
    assert watch.level_ms("t", 2.0) == pytest.approx(0.3)
    assert watch.level_ms("t", 0.01) == pytest.approx(0.3)
    quiet = QueueWatch(WarningParams(fraction=0.1, noise_multiple=3.0, floor_ms=0.02))
    quiet.update(0, {"t": 0.001}, {"t": 0.1})
    assert quiet.level_ms("t", 0.1) == pytest.approx(0.02)  # never below the floor


def test_a_delay_over_the_level_warns() -> None:
    watch = QueueWatch()
    assert watch.update(0, {"t": 0.01}, {"t": 2.0}) == {}
    warned = watch.update(S, {"t": 0.25}, {"t": 2.0})
    assert warned == {"t": "queue_delay 0.25 ms > early warning 0.20 ms"}


def test_a_rising_delay_warns_before_it_reaches_the_level() -> None:
    watch = QueueWatch()
    for i, delay in enumerate([0.01, 0.02, 0.05, 0.11, 0.15]):
        warned = watch.update(i * S // 4, {"t": delay}, {"t": 2.0})
    # 0.15 ms is under the 0.2 ms level, but 0.14 ms up on a second ago: rising.
    assert warned == {"t": "queue_delay rising 10.0 µs -> 0.15 ms"}


def test_a_steady_delay_under_the_level_does_not_warn() -> None:
    watch = QueueWatch()
    for i in range(12):
        warned = watch.update(i * S // 4, {"t": 0.12}, {"t": 2.0})
    assert warned == {}


def test_targets_that_are_gone_leave_no_state() -> None:
    watch = QueueWatch()
    watch.update(0, {"a": 0.1, "b": 0.1}, {})
    watch.update(S, {"a": 0.1}, {})
    assert watch.noise_ms("b") is None


def test_knee_memory_fades() -> None:
    mem: KneeMemory[str] = KneeMemory(memory_ns=60 * S)
    mem.note("w", 95.0, 0)
    assert mem.get("w", 59 * S) == 95.0
    assert mem.get("w", 61 * S) is None
    mem.note("w", float("nan"), 0)
    mem.note("w", 0.0, 0)
    assert mem.get("w", 0) is None


@pytest.mark.parametrize(
    ("cap", "knee", "expected"),
    [
        (80, None, 90.0),  # no knee: the configured step
        (80, 100.0, 98.0),  # far below: straight to 2 % under the knee
        (98, 100.0, 99.0),  # near: 1 % of the knee
        (380, 400.0, 392.0),  # the same at 400 Mbit/s: the climb is relative to the knee
        (392, 400.0, 396.0),  # 1 % of 400 is 4
        (392, 4000.0, 3920.0),  # below 2 % under the knee: jump
        (3920, 4000.0, 3930.0),  # 1 % would be 40: never more than the step
        (20, 20.0, 21.0),  # at least 1 Mbit/s
    ],
)
def test_climb(cap: int, knee: float | None, expected: float) -> None:
    assert climb_to(cap, knee, step=10, margin=0.02, fine=0.01) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cap", "knee", "expected"),
    [
        (80, 100.0, 89.0),  # far below an upper bound: halfway to 2 % under it (98)
        (96, 100.0, 97.0),  # close below: halfway, at least 1 Mbit/s
        (97, 100.0, 98.0),  # ...never past 2 % under it
        (98, 100.0, 99.0),  # near it: as a certain knee, 1 % of it
        (380, 400.0, 386.0),  # relative at 400 Mbit/s too
    ],
)
def test_climb_towards_an_uncertain_knee_halves_the_gap(
    cap: int, knee: float, expected: float
) -> None:
    got = climb_to(cap, knee, step=10, margin=0.02, fine=0.01, uncertain=True)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cap", "base", "knee", "expected"),
    [
        (100, 100.0, None, 80.0),  # no knee: the full factor
        (101, 101.0, 100.0, 98.0),  # the cap climbed 1 % past the knee: back to 2 % under it
        (150, 150.0, 100.0, 120.0),  # far past it: never more than the factor
        (101, 60.0, 100.0, 98.0),  # usage below the cap (bursty): still only back under
        (98, 98.0, 100.0, 78.4),  # at the knee's margin and congested: the knee moved
        (90, 90.0, 100.0, 72.0),  # under the knee: the full factor
    ],
)
def test_cut(cap: int, base: float, knee: float | None, expected: float) -> None:
    assert cut_to(cap, base, knee, factor=0.2, margin=0.02) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cap", "used", "knee", "expected"),
    [
        (100, 100.0, None, 98.0),
        (100, 60.0, None, 58.8),  # the queue began to build at the usage, not the cap
        (100, None, None, 98.0),
        (103, 100.0, 100.0, 98.0),
        (90, 90.0, 100.0, 90.0),  # already under the knee's margin: unchanged
    ],
)
def test_trim(cap: int, used: float | None, knee: float | None, expected: float) -> None:
    assert trim_to(cap, used, knee, margin=0.02) == pytest.approx(expected)


def test_a_knee_moves_up_but_keeps_fading_from_when_it_was_seen() -> None:
    memory: KneeMemory[str] = KneeMemory(memory_ns=100)
    memory.note("a", 50.0, now_ns=0)
    memory.move_up("a", 40.0)  # never down
    assert memory.get("a", now_ns=10) == 50.0
    memory.move_up("a", 55.0)
    assert memory.get("a", now_ns=99) == 55.0
    assert memory.get("a", now_ns=101) is None  # faded from t=0, not from the move
    memory.move_up("b", 10.0)  # nothing to move
    assert memory.get("b", now_ns=0) is None


def _draining(start_ms: float, slope: float, *, n: int = 20, every_ns: int = 10**7):
    """A probe every ``every_ns`` from t = 1 s, the queue falling from ``start_ms`` by
    ``slope`` ms per ms (negative), floored at 0."""
    t0 = S
    return [(t0 + i * every_ns, max(0.0, start_ms + slope * i * every_ns / 1e6)) for i in range(n)]


@pytest.mark.parametrize(
    ("load", "start", "slope", "expected"),
    [
        (95.0, 20.0, -0.05, 100.0),  # the link serves 5 % more than arrives
        (380.0, 20.0, -0.05, 400.0),  # the same drain at 400 Mbit/s is the same share
        (80.0, 30.0, -0.2, 100.0),  # a fifth less arriving: 30 ms drain in 150 ms
    ],
)
def test_a_draining_queue_shows_the_rate_the_link_serves(
    load: float, start: float, slope: float, expected: float
) -> None:
    # A queue of q ms drains at (C - A) / C ms per ms: C = A / (1 + slope), read from
    # the probes until the queue has emptied (the zeros after are not part of the fit).
    trace = _draining(start, slope)
    assert drain_knee(load, trace, since_ns=S) == pytest.approx(expected)
    # Probes from before the cut took effect (the queue still full) are left out.
    full = [(S - (i + 1) * 10**7, 30.0) for i in range(10)]
    assert drain_knee(load, full + trace, since_ns=S) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("trace", "why"),
    [
        (_draining(1.5, -0.01), "no queue to speak of"),
        (_draining(30.0, -1.0), "emptied within three probes"),
        (_draining(20.0, 0.0), "not draining: a full buffer stands still"),
        (_draining(20.0, 0.01), "growing: the cut has not taken effect"),
        (_draining(20.0, -0.05, n=3), "too few probes"),
        (_draining(20.0, -0.05, every_ns=10**6), "too short a span"),
        ([], "no probes"),
    ],
)
def test_no_knee_from_a_queue_that_does_not_drain_measurably(trace, why: str) -> None:
    assert drain_knee(90.0, trace, since_ns=S) is None, why
