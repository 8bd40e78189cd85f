"""Probe scheduling on absolute deadlines, sans-I/O.

Deadline k of a target is ``start + phase + k * interval`` (or the running sum of
exponential gaps with Poisson spacing): each deadline is computed from the start, never
from when the last probe actually left, so timer lateness never accumulates into drift.
Targets get different phase offsets so they never fire in lockstep. When the caller wakes
up after several deadlines have passed, it sends once, for the newest one; the older ones
are skipped and counted, never sent in a burst. Time (CLOCK_MONOTONIC ns) is passed in.
"""

from __future__ import annotations

import hashlib
import random
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
    ) -> None:
        if interval_ns <= 0:
            raise ValueError("interval must be positive")
        self.interval_ns = interval_ns
        self.poisson = poisson
        self._rng = random.Random(seed)
        self._base = start_ns + phase_ns  # deadline 0
        self._k = 0  # index of the next deadline (periodic spacing)
        self.next_deadline_ns = self._base
        self.fired = 0
        self.skipped = 0

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
        return Fire(deadline_ns=deadline, lateness_ns=now_ns - deadline, skipped=skipped)
