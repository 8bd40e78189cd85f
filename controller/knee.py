"""Seeing the knee coming: early warning of a queue, and memory of where congestion began.

A standing queue of 100 µs is fifty times our measurement noise and a twentieth of a 2 ms
queue-delay SLO, so the policy need not find the link's capacity by falling off it:

- ``QueueWatch`` raises an *early warning* for a target whose recent queueing delay is
  above a level just over its noise (a small fraction of the app's SLO, never below a few
  times the noise floor of its base RTT), or whose queueing delay is rising. While any
  target of a node warns, the policy does not climb there: the cap parks under the knee.
  A queue that stands above the level steps the caps back; one that is only rising holds
  them (a burst rises and falls by itself).
- ``KneeMemory`` keeps, per scope (and per group of scopes sharing a link: the sum of
  their rates), the rate at which congestion last appeared, fading
  after a while so that a knee that moved is found again. ``climb_to`` uses it to climb
  fast to a margin below the knee and slowly near and above it; ``cut_to`` to cut a cap
  that climbed past the knee back under it only, never by more than the configured
  factor; ``trim_to`` to step back under the knee on an early warning.
- ``drain_knee`` reads the link's knee off the queue a cut drains: the link serves what
  arrives plus what the queue loses, so the queue's slope, probe by probe from the
  moment the cut took effect, and the load after the cut give the rate it serves.

Pure: time comes in as ``now_ns``, delays in ms.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from detnet.controller.signals import fmt_ms

K = TypeVar("K", bound=Hashable)

NOISE_HORIZON_NS = 60 * 10**9  # the noise floor is the lowest recent delay of the last minute
_BUCKET_NS = 10**9  # ...kept as one minimum per second
TREND_NS = 10**9  # "rising": higher now than one second ago by more than the noise
# A queue this deep (ms) when a cut takes effect is one to read the drain of, down to
# this level (under it, the queue has emptied and the probes see only noise), over at
# least these many probes spanning this long (10 ms apart at the default probe interval).
DRAIN_FROM_MS = 2.0
DRAIN_TO_MS = 0.2
DRAIN_MIN_POINTS = 4
DRAIN_MIN_SPAN_NS = 30_000_000


@dataclass(frozen=True, kw_only=True)
class WarningParams:
    """How early to warn: a ``fraction`` of the app's tightest time threshold, never below
    ``noise_multiple`` times the target's noise floor nor below ``floor_ms``."""

    fraction: float = 0.1
    noise_multiple: float = 3.0
    floor_ms: float = 0.02


@dataclass
class _Track:
    minima: deque[tuple[int, float]]  # (bucket start ns, min delay ms in that second)
    history: deque[tuple[int, float]]  # (ns, delay ms) over the last TREND_NS or so


class QueueWatch:
    """Per-target early warning from the recent queueing delay (see the module docstring)."""

    def __init__(self, params: WarningParams | None = None) -> None:
        self.params = params or WarningParams()
        self._tracks: dict[str, _Track] = {}
        # Of the last update's warnings, the targets whose delay stood above the level
        # (a queue that stands), not only rising towards it.
        self.standing: set[str] = set()

    def noise_ms(self, target: str) -> float | None:
        """The target's noise floor: its lowest recent queueing delay of the last minute."""
        track = self._tracks.get(target)
        if track is None or not track.minima:
            return None
        return min(v for _, v in track.minima)

    def level_ms(self, target: str, basis_ms: float) -> float:
        """The warning level for ``target`` whose app's tightest threshold is ``basis_ms``."""
        p = self.params
        noise = self.noise_ms(target) or 0.0
        return max(p.fraction * basis_ms, p.noise_multiple * noise, p.floor_ms)

    def update(
        self, now_ns: int, delays_ms: Mapping[str, float | None], basis_ms: Mapping[str, float]
    ) -> dict[str, str]:
        """Take this step's recent queueing delay per target; return the targets that warn,
        with the reason (``"queue_delay 0.31 ms > 0.20 ms"`` or ``"queue_delay rising ..."``)."""
        warnings: dict[str, str] = {}
        self.standing = set()
        for target in list(self._tracks):
            if target not in delays_ms:
                del self._tracks[target]  # an endpoint that is gone leaves no state
        for target, delay in delays_ms.items():
            track = self._tracks.setdefault(target, _Track(deque(), deque()))
            if delay is None or not math.isfinite(delay):
                continue
            bucket = now_ns - now_ns % _BUCKET_NS
            if track.minima and track.minima[-1][0] == bucket:
                track.minima[-1] = (bucket, min(track.minima[-1][1], delay))
            else:
                track.minima.append((bucket, delay))
            while track.minima and now_ns - track.minima[0][0] > NOISE_HORIZON_NS:
                track.minima.popleft()
            track.history.append((now_ns, delay))
            while len(track.history) > 1 and now_ns - track.history[1][0] >= TREND_NS:
                track.history.popleft()
            basis = basis_ms.get(target)
            if basis is None:
                continue
            level = self.level_ms(target, basis)
            if delay > level:
                warnings[target] = f"queue_delay {fmt_ms(delay)} > early warning {fmt_ms(level)}"
                self.standing.add(target)
                continue
            then_ns, then = track.history[0]
            if now_ns - then_ns >= TREND_NS // 2 and delay - then > level / 2:
                warnings[target] = f"queue_delay rising {fmt_ms(then)} -> {fmt_ms(delay)}"
        return warnings


@dataclass(frozen=True)
class Knee:
    """Where congestion last appeared for one scope: the rate (Mbit/s) and when."""

    mbps: float
    at_ns: int
    # Noted at a violation that came under the knee remembered before: the knee moved
    # down, and this rate (the queue was already building there) is only an upper bound.
    uncertain: bool = False


class KneeMemory(Generic[K]):
    """The knee per scope, forgotten ``memory_ns`` after it was last seen."""

    def __init__(self, memory_ns: int) -> None:
        self.memory_ns = memory_ns
        self._knees: dict[K, Knee] = {}

    def note(self, key: K, mbps: float, now_ns: int, *, uncertain: bool = False) -> None:
        """Congestion appeared while ``key`` ran at ``mbps`` (``uncertain``: a knee that
        moved down, an upper bound only)."""
        if mbps > 0 and math.isfinite(mbps):
            self._knees[key] = Knee(mbps, now_ns, uncertain)

    def uncertain(self, key: K) -> bool:
        """Whether ``key``'s knee is only an upper bound (see ``note``)."""
        knee = self._knees.get(key)
        return knee is not None and knee.uncertain

    def get(self, key: K, now_ns: int) -> float | None:
        """The remembered knee of ``key``, None when unknown or faded."""
        knee = self._knees.get(key)
        if knee is None:
            return None
        if now_ns - knee.at_ns > self.memory_ns:
            del self._knees[key]
            return None
        return knee.mbps

    def move_up(self, key: K, mbps: float) -> None:
        """The knee of ``key`` is at least ``mbps`` (caps stood there without a warning);
        it still fades from when congestion was last seen."""
        knee = self._knees.get(key)
        if knee is not None and mbps > knee.mbps and math.isfinite(mbps):
            self._knees[key] = Knee(mbps, knee.at_ns, knee.uncertain)

    def drop(self, key: K) -> None:
        """Forget ``key``'s knee (it moved)."""
        self._knees.pop(key, None)

    def forget(self, keep: set[K]) -> None:
        """Drop the knees of scopes that no longer exist."""
        for key in [k for k in self._knees if k not in keep]:
            del self._knees[key]


def climb_to(
    cap: int,
    knee: float | None,
    *,
    step: int,
    margin: float,
    fine: float,
    uncertain: bool = False,
) -> float:
    """The next cap when climbing: ``cap + step`` without a knee; with one, straight to
    ``margin`` below it (halfway there, at least 1 Mbit/s, when the knee is ``uncertain``),
    then by ``fine`` of it (at most ``step``) near and above it."""
    if knee is None:
        return float(cap + step)
    below = knee * (1.0 - margin)
    if cap < math.floor(below):
        if uncertain:  # an upper bound: a jump to it would overshoot the new knee
            return min(below, max(cap + 1.0, (cap + below) / 2))
        return below
    return cap + max(1.0, min(float(step), fine * knee))


def cut_to(cap: int, base: float, knee: float | None, *, factor: float, margin: float) -> float:
    """The cap after a cut from ``base`` (usage, or the cap when usage is unknown): by
    ``factor``; but when the cap had climbed past a remembered knee, only back to
    ``margin`` below the knee, which loses less. A cap at or under the knee that still
    congests means the knee moved: the full factor then."""
    full = base * (1.0 - factor)
    if knee is not None and cap > math.floor(knee * (1.0 - margin)):
        return max(full, knee * (1.0 - margin))
    return full


def trim_to(cap: int, used: float | None, knee: float | None, *, margin: float) -> float:
    """The cap after an early warning: back to ``margin`` under the knee (the cap, or the
    usage when lower, where the queue began to build when no knee is remembered)."""
    point = knee if knee is not None else min(float(cap), used if used is not None else cap)
    return min(float(cap), point * (1.0 - margin))


def drain_knee(load: float, trace: Sequence[tuple[int, float]], *, since_ns: int) -> float | None:
    """The knee a draining queue shows: ``load / (1 + slope)``, the slope (ms of queue per
    ms) fitted by least squares to ``trace`` (probe send ns, queue ms) from ``since_ns``
    (when the cut took effect) until the queue falls under DRAIN_TO_MS. None unless the
    queue stood (at least DRAIN_FROM_MS at the start) and DRAIN_MIN_POINTS probes over
    DRAIN_MIN_SPAN_NS saw it fall. An estimate, not a bound either way: what
    ``since_ns`` leaves out of the cut's delay and the critical traffic (not in ``load``)
    make the drain look slower, senders that send less than ``load`` (TCP recovering
    from the full queue's drops) make it look faster."""
    points: list[tuple[int, float]] = []
    for t, q in sorted(p for p in trace if p[0] >= since_ns):
        if q < DRAIN_TO_MS:
            break
        points.append((t, q))
    if load <= 0 or len(points) < DRAIN_MIN_POINTS or points[0][1] < DRAIN_FROM_MS:
        return None
    if points[-1][0] - points[0][0] < DRAIN_MIN_SPAN_NS:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_q = sum(q for _, q in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (q - mean_q) for t, q in points) / var * 1e6  # ms per ms
    return load / (1.0 + slope) if -1.0 < slope < 0.0 else None
