"""One pod's egress and ingress rates from successive readings of its interface
counters, sans-I/O: the sampler feeds ``PodMeter.observe(now_ns, counters, source=...)``
every interval and reads ``rates()``.

Readings form continuous segments. Each new reading is checked against the previous
one, interface by interface (``netdev.counter_delta``); the segment breaks, and the
rates are unknown until the next reading, when the step cannot be known:

- the counters are unreadable (the process vanished mid-read, ``/proc`` refused);
- they come from another source (the pod was re-resolved to another process: maybe the
  same network namespace, maybe a new one whose counters started again);
- the set of interfaces changed (one was added or removed: the sum would jump);
- a counter went down (a reset: the container's sandbox was recreated) or moved by more
  than ``max_rate`` could carry in the time between the readings.

A 64-bit counter that wraps (from its upper half) is a step, not a break. The rate over
the last interval is the step of the last two readings over their time apart; the mean
over ``window_ns`` (1 s) is the step from the newest reading at least that old, within
half an interval, in the same segment — until a segment is that old, the mean is unknown.
Unknown is None, never 0.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from detnet.controller.agent.netdev import counter_delta, pod_interfaces

# 400 Gbit/s in bytes per second: faster than any NIC a pod sits behind.
DEFAULT_MAX_RATE = 50e9
_MAX_HISTORY = 4096  # readings kept per pod, whatever the interval


@dataclass(frozen=True)
class Rates:
    """A pod's rates in bytes per second; None where unknown."""

    egress_bps: float | None = None
    ingress_bps: float | None = None
    egress_bps_1s: float | None = None
    ingress_bps_1s: float | None = None

    @property
    def known(self) -> bool:
        """True when the last interval's rates are known."""
        return self.egress_bps is not None


UNKNOWN = Rates()


class PodMeter:
    """The counters' history of one pod (see the module docstring)."""

    def __init__(
        self,
        *,
        interval_ns: int,
        window_ns: int = 1_000_000_000,
        max_rate: float = DEFAULT_MAX_RATE,
    ) -> None:
        if interval_ns <= 0 or window_ns <= 0 or not max_rate > 0:
            raise ValueError("interval, window and max_rate must be positive")
        self._tolerance_ns = interval_ns // 2
        self._window_ns = window_ns
        self._max_rate = max_rate
        self._source: object = None
        self._last: dict[str, tuple[int, int]] | None = None
        # (t_ns, transmitted, received): bytes since the segment started.
        self._history: deque[tuple[int, int, int]] = deque(maxlen=_MAX_HISTORY)

    def observe(
        self, now_ns: int, counters: Mapping[str, tuple[int, int]] | None, *, source: object
    ) -> str:
        """Fold in one reading (``{interface: (rx, tx)}``, ``lo`` included, or None when
        unreadable) from ``source`` (whatever identifies where it was read). Returns
        what happened: ``ok``, ``start`` (a new segment), ``unreadable``, ``source``,
        ``interfaces``, ``reset`` or ``stale`` (no time passed: ignored)."""
        if counters is None:
            self._break()
            return "unreadable"
        current = pod_interfaces(counters)
        if self._last is None or not self._history:
            return self._start(now_ns, current, source, "start")
        if source != self._source:
            return self._start(now_ns, current, source, "source")
        if current.keys() != self._last.keys():
            return self._start(now_ns, current, source, "interfaces")
        t_prev, tx_total, rx_total = self._history[-1]
        if now_ns <= t_prev:
            return "stale"
        limit = self._max_rate * (now_ns - t_prev) / 1e9
        for name, (rx, tx) in current.items():
            prev_rx, prev_tx = self._last[name]
            d_rx = counter_delta(prev_rx, rx, limit=limit)
            d_tx = counter_delta(prev_tx, tx, limit=limit)
            if d_rx is None or d_tx is None:
                return self._start(now_ns, current, source, "reset")
            rx_total += d_rx
            tx_total += d_tx
        self._last = current
        self._history.append((now_ns, tx_total, rx_total))
        self._prune()
        return "ok"

    def rates(self) -> Rates:
        """The rates as of the last reading."""
        h = self._history
        if self._last is None or len(h) < 2:
            return UNKNOWN
        (t1, tx1, rx1), (t0, tx0, rx0) = h[-1], h[-2]
        egress, ingress = (tx1 - tx0) * 1e9 / (t1 - t0), (rx1 - rx0) * 1e9 / (t1 - t0)
        tb, txb, rxb = h[0]
        if t1 - tb < self._window_ns - self._tolerance_ns:
            return Rates(egress_bps=egress, ingress_bps=ingress)
        span = (t1 - tb) / 1e9
        return Rates(
            egress_bps=egress,
            ingress_bps=ingress,
            egress_bps_1s=(tx1 - txb) / span,
            ingress_bps_1s=(rx1 - rxb) / span,
        )

    def _start(
        self, now_ns: int, current: dict[str, tuple[int, int]], source: object, why: str
    ) -> str:
        self._history.clear()
        self._history.append((now_ns, 0, 0))
        self._last, self._source = current, source
        return why

    def _break(self) -> None:
        self._history.clear()
        self._last, self._source = None, None

    def _prune(self) -> None:
        # Keep the newest reading at least a window (less the tolerance) old as the base.
        h = self._history
        horizon = h[-1][0] - self._window_ns + self._tolerance_ns
        while len(h) >= 3 and h[1][0] <= horizon:
            h.popleft()
