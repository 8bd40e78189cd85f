"""Best-effort usage as the policy counts it: the mean rate over a short horizon.

One control step's reading is noisy for bursty workloads (a 100 ms sample of a TCP upload
swings with slow start and pauses), and a cut from it lands far from the 20 % intended;
a peak counts a burst's overshoot as the workload's rate. So usage is the mean of the
readings over ``window_ns``. A reading far above the earlier peak marks the start of a
burst: everything before it leaves the mean, which restarts from it; until the new
readings cover ``settle`` of the window the scope is *ramping* and a cut waits for a mean
(bounded: a ramp's own growth never postpones the cut again). The first reading may
cover partly idle time, but it stays: a burst shorter than one reading (an upload at
400 Mbit/s) is nothing but that reading, and without it the workload read as idle.

Pure: time comes in as ``now_ns``; readings are Mbit/s per key (any hashable scope).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# A reading this many times the previous peak is a workload ramping up.
RAMP_RATIO = 1.5
# After a ramp, a cut waits until the readings since cover this share of the window.
RAMP_SETTLE_FRACTION = 0.2
# Usage at or above this share of its cap counts as "using it".
USING_CAP_FRACTION = 0.9
# Below this (Mbit/s) a reading is an idle workload's noise, never a ramp.
_IDLE_MBPS = 1.0


class UsageMeter(Generic[K]):
    """Mean usage per key over a horizon, with ramp detection."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self._seen: dict[K, deque[tuple[int, float]]] = {}
        self._ramp_ns: dict[K, int] = {}

    def update(
        self, now_ns: int, readings: Mapping[K, float], caps: Mapping[K, int]
    ) -> tuple[dict[K, float], dict[K, float]]:
        """Remember this step's readings; return the mean rate of every key that has one,
        and the keys still settling after a ramp (with seconds since it began)."""
        settle = round(self.window_ns * RAMP_SETTLE_FRACTION)
        for key in readings.keys() | self._seen.keys():
            seen = self._seen.setdefault(key, deque())
            used = readings.get(key)
            ramped = self._ramp_ns.get(key)
            settling = ramped is not None and now_ns - ramped < settle
            if used is not None:
                before = max((value for _, value in seen), default=None)
                seen.append((now_ns, used))
                cap = caps.get(key)
                if (
                    not settling
                    and before is not None
                    and used >= _IDLE_MBPS
                    and used > RAMP_RATIO * before
                    and (cap is None or used < USING_CAP_FRACTION * cap)
                ):
                    seen.clear()
                    seen.append((now_ns, used))
                    self._ramp_ns[key] = now_ns
            while seen and now_ns - seen[0][0] > self.window_ns:
                seen.popleft()
        means = {k: sum(v for _, v in s) / len(s) for k, s in self._seen.items() if s}
        ramping = {k: (now_ns - t) / 1e9 for k, t in self._ramp_ns.items() if now_ns - t < settle}
        for key in [k for k, s in self._seen.items() if not s and k not in ramping]:
            del self._seen[key]  # a scope that is gone (pod deleted) leaves no state
            self._ramp_ns.pop(key, None)
        return means, ramping


class PeakMeter(Generic[K]):
    """The highest usage mean per key over a horizon: what a bursty workload sends when
    it sends. Between two uploads its mean drops to nothing, but the room its next burst
    needs is what it took in the last one."""

    def __init__(self, window_ns: int) -> None:
        self.window_ns = window_ns
        self._seen: dict[K, deque[tuple[int, float]]] = {}  # decreasing values, oldest first

    def update(self, now_ns: int, means: Mapping[K, float]) -> dict[K, float]:
        """Remember this step's means; return each key's peak over the horizon."""
        for key, value in means.items():
            seen = self._seen.setdefault(key, deque())
            while seen and seen[-1][1] <= value:
                seen.pop()  # a later, higher mean outlives it: it can never be the peak
            seen.append((now_ns, value))
        for key in list(self._seen):
            seen = self._seen[key]
            while seen and now_ns - seen[0][0] > self.window_ns:
                seen.popleft()
            if not seen:
                del self._seen[key]
        return {key: seen[0][1] for key, seen in self._seen.items()}
