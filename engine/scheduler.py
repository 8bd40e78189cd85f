"""Probe scheduling on absolute deadlines, sans-I/O.

Deadline k of a target is ``start + phase + k * interval`` (or the running sum of
exponential gaps with Poisson spacing): each deadline is computed from the start, never
from when the last probe actually left, so timer lateness never accumulates into drift.
Targets get different phase offsets so they never fire in lockstep. When the caller wakes
up after several deadlines have passed, it sends once, for the newest one; the older ones
are skipped and counted, never sent in a burst. Time (CLOCK_MONOTONIC ns) is passed in.

``Timetable`` keeps the schedules of a changing set of targets under one cap on their
total probe rate: when the targets ask for more, every interval is stretched by the same
factor. A target's deadlines lie on a grid anchored at the timetable's start (its phase
derived from its name and interval), so a target added late, or retimed, keeps the same
phases as if it had been there from the start, and the targets stay spread out.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

# With Poisson spacing a gap is at least this fraction of the mean interval, so a single
# draw never asks the loop for an immediate re-send.
_MIN_POISSON_GAP = 0.01


@dataclass(frozen=True)
class Fire:
    """A due send: the deadline it serves, how late we are, and how many were skipped."""

    deadline_ns: int
    lateness_ns: int
    skipped: int


def phase_offset(name: str, interval_ns: int) -> int:
    """A stable per-target phase in [0, interval) derived from the target's name."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(interval_ns, 1)


class Schedule:
    """The send deadlines of one target."""

    def __init__(
        self,
        *,
        interval_ns: int,
        start_ns: int,
        phase_ns: int = 0,
        poisson: bool = False,
        seed: int | None = None,
        not_before_ns: int | None = None,
    ) -> None:
        """Deadlines ``start + phase + k * interval``; with ``not_before_ns`` the first is
        the first of them at or after it (a target that joins a running grid)."""
        if interval_ns <= 0:
            raise ValueError("interval must be positive")
        self.interval_ns = interval_ns
        self.poisson = poisson
        self._rng = random.Random(seed)
        self._start = start_ns
        self._base = start_ns + phase_ns  # deadline 0
        self._k = 0  # index of the next deadline (periodic spacing)
        self.next_deadline_ns = self._base
        self.last_deadline_ns: int | None = None  # the deadline of the latest send
        self.fired = 0
        self.skipped = 0
        if not_before_ns is not None:
            self._next_at_or_after(not_before_ns)

    def _next_at_or_after(self, t_ns: int) -> None:
        if self.poisson:
            self.next_deadline_ns = max(self.next_deadline_ns, t_ns)
            return
        self._k = max(-((self._base - t_ns) // self.interval_ns), 0)  # ceil, not before 0
        self.next_deadline_ns = self._base + self._k * self.interval_ns

    def retime(self, *, interval_ns: int, phase_ns: int, now_ns: int) -> None:
        """Space the deadlines by ``interval_ns`` from now on, on the grid ``start + phase
        + k * interval``. The next deadline is the first grid point at or after ``now_ns``
        and at least ``interval_ns`` after the latest send: the change never bursts."""
        if interval_ns <= 0:
            raise ValueError("interval must be positive")
        self.interval_ns = interval_ns
        last = self.last_deadline_ns
        if self.poisson:
            self.next_deadline_ns = max(now_ns, (now_ns if last is None else last) + self._gap())
            return
        self._base = self._start + phase_ns
        self._next_at_or_after(now_ns if last is None else max(now_ns, last + interval_ns))

    def _gap(self) -> int:
        gap = self._rng.expovariate(1.0) * self.interval_ns
        return max(int(gap), int(self.interval_ns * _MIN_POISSON_GAP), 1)

    def fire(self, now_ns: int, *, slack_ns: int = 0) -> Fire | None:
        """If a deadline has passed, consume every passed deadline and return the newest
        (the older ones are skipped); advance ``next_deadline_ns`` past ``now_ns``.

        ``slack_ns`` lets a deadline up to that far in the future count as due (for loops
        whose timers only wake to the nearest millisecond); skipping still uses ``now_ns``.
        """
        if now_ns + slack_ns < self.next_deadline_ns:
            return None
        if self.poisson and now_ns - self.next_deadline_ns > 1000 * self.interval_ns:
            # Far behind (a suspended process): restart the process now instead of drawing
            # every missed gap; the missed slots are estimated at the mean rate.
            skipped = (now_ns - self.next_deadline_ns) // self.interval_ns
            deadline = now_ns
            self.next_deadline_ns = now_ns + self._gap()
        elif self.poisson:
            deadline = self.next_deadline_ns
            nxt = deadline + self._gap()
            skipped = 0
            while nxt <= now_ns:
                deadline, nxt = nxt, nxt + self._gap()
                skipped += 1
            self.next_deadline_ns = nxt
        else:
            # Absolute arithmetic: deadline k = base + k * interval, O(1) however late.
            k = max((now_ns - self._base) // self.interval_ns, self._k)
            skipped = k - self._k
            deadline = self._base + k * self.interval_ns
            self._k = k + 1
            self.next_deadline_ns = self._base + self._k * self.interval_ns
        self.fired += 1
        self.skipped += skipped
        self.last_deadline_ns = deadline
        return Fire(deadline_ns=deadline, lateness_ns=now_ns - deadline, skipped=skipped)


# The stretch factor moves in steps of 2^(1/16) (~4.4 %): a rollout that adds and removes
# one endpoint of hundreds at a time does not retime every target at every step.
STRETCH_STEP = 2.0 ** (1 / 16)


def _level(needed: float) -> int:
    """The smallest j with STRETCH_STEP ** j >= needed (0 for needed <= 1)."""
    if needed <= 1.0:
        return 0
    j = max(math.ceil(16 * math.log2(needed) - 1e-9), 0)
    while STRETCH_STEP**j < needed:
        j += 1
    return j


@dataclass(frozen=True)
class Cadence:
    """What one target asks for: ``batch`` probes every ``interval_ns`` (mean, when
    ``poisson``)."""

    interval_ns: int
    batch: int = 1
    poisson: bool = False

    @property
    def rate_pps(self) -> float:
        """Probes per second at this cadence."""
        return self.batch * 1e9 / self.interval_ns


class Timetable:
    """The schedules of a changing set of targets, their total rate under a cap.

    With ``max_total_rate_pps`` every target's interval is multiplied by one stretch
    factor (a power of ``STRETCH_STEP``, the smallest that brings the total under the
    cap); it is lowered again only when the total would fit one step below, so a target
    that comes and goes at the edge does not retime the others back and forth.
    """

    def __init__(
        self,
        *,
        start_ns: int,
        max_total_rate_pps: float | None = None,
        seed: int | None = None,
    ) -> None:
        if max_total_rate_pps is not None and not (
            math.isfinite(max_total_rate_pps) and max_total_rate_pps > 0
        ):
            raise ValueError("the total probe rate cap must be a positive number")
        self.start_ns = start_ns
        self.max_total_rate_pps = max_total_rate_pps
        self._seed = seed
        self._cadences: dict[str, Cadence] = {}
        self._schedules: dict[str, Schedule] = {}
        self._level = 0

    # --- reading ------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._schedules

    def __len__(self) -> int:
        return len(self._schedules)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._schedules))

    @property
    def stretch(self) -> float:
        """The factor every interval is multiplied by (1.0: the cap does not bind)."""
        return STRETCH_STEP**self._level if self._level else 1.0

    @property
    def demand_pps(self) -> float:
        """The total probe rate the targets ask for."""
        return sum(c.rate_pps for c in self._cadences.values())

    @property
    def planned_pps(self) -> float:
        """The total probe rate after stretching (at most the cap)."""
        return sum(
            c.batch * 1e9 / self._schedules[n].interval_ns for n, c in self._cadences.items()
        )

    def schedule(self, name: str) -> Schedule:
        """The schedule of ``name`` (KeyError when it has none)."""
        return self._schedules[name]

    def interval_ns(self, name: str) -> int:
        """The effective (stretched) interval of ``name``."""
        return self._schedules[name].interval_ns

    # --- changing the set ---------------------------------------------------------------
    def add(self, name: str, cadence: Cadence, *, now_ns: int) -> set[str]:
        """Add one target; return the other targets whose deadlines changed."""
        return self.update(now_ns=now_ns, add={name: cadence})

    def remove(self, name: str, *, now_ns: int) -> set[str]:
        """Remove one target; return the other targets whose deadlines changed."""
        return self.update(now_ns=now_ns, remove=(name,))

    def update(
        self,
        *,
        now_ns: int,
        add: Mapping[str, Cadence] | None = None,
        remove: Iterable[str] = (),
    ) -> set[str]:
        """Remove then add targets, restretching once; return the names of the targets
        already there whose deadlines changed (the caller re-arms their timers).

        ValueError (and nothing changes) when a name to add is already there or a name to
        remove is not."""
        add = dict(add or {})
        gone = set(remove)
        missing = gone - set(self._schedules)
        if missing:
            raise ValueError(f"no schedule for {', '.join(sorted(missing))}")
        clash = set(add) & (set(self._schedules) - gone)
        if clash:
            raise ValueError(f"already scheduled: {', '.join(sorted(clash))}")
        for name in gone:
            del self._schedules[name], self._cadences[name]
        kept = set(self._schedules)
        self._cadences.update(add)
        old = self._level
        self._level = self._new_level()
        retimed: set[str] = set()
        if self._level != old:
            for name in kept:
                interval = self._effective(self._cadences[name])
                sched = self._schedules[name]
                if interval != sched.interval_ns:
                    sched.retime(
                        interval_ns=interval,
                        phase_ns=phase_offset(name, interval),
                        now_ns=now_ns,
                    )
                    retimed.add(name)
        for name, cadence in add.items():
            interval = self._effective(cadence)
            self._schedules[name] = Schedule(
                interval_ns=interval,
                start_ns=self.start_ns,
                phase_ns=phase_offset(name, interval),
                poisson=cadence.poisson,
                seed=None if self._seed is None else _name_seed(self._seed, name),
                not_before_ns=now_ns,
            )
        return retimed

    def _new_level(self) -> int:
        cap = self.max_total_rate_pps
        if cap is None:
            return 0
        needed = self.demand_pps / cap
        if needed > STRETCH_STEP**self._level:
            return _level(needed)
        # Lower only with a step of headroom left (hysteresis).
        return min(self._level, _level(needed * STRETCH_STEP))

    def _effective(self, cadence: Cadence) -> int:
        if not self._level:
            return cadence.interval_ns
        # Rounded up, so the stretched rates never add up to more than the cap.
        return math.ceil(cadence.interval_ns * STRETCH_STEP**self._level)

    # --- sending ------------------------------------------------------------------------
    def fire(self, name: str, now_ns: int, *, slack_ns: int = 0) -> Fire | None:
        """``Schedule.fire`` of target ``name``."""
        return self._schedules[name].fire(now_ns, slack_ns=slack_ns)

    def next_deadline_ns(self, name: str) -> int:
        """The next deadline of target ``name``."""
        return self._schedules[name].next_deadline_ns


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
