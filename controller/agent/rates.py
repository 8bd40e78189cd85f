"""Every pod's egress and ingress rates from successive readings of its interface
counters, sans-I/O: the sampler feeds ``NodeMeter.observe(keys, readings)`` once per
tick with every pod's ``/proc/PID/net/dev`` and reads ``rates()`` when asked.

Each pod's readings form continuous segments. Each new reading is checked against the
previous one, interface by interface (``netdev.counter_steps``); the segment breaks, and
the rates are unknown until the next reading, when the step cannot be known:

- the counters are unreadable or do not parse (the process vanished mid-read, ``/proc``
  refused), or the reading is not newer than the last (never, with a monotonic clock);
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

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from detnet.controller.agent.netdev import (
    BOOL,
    I64,
    U64,
    NodeCounters,
    counter_steps,
    parse_node,
)

# 400 Gbit/s in bytes per second: faster than any NIC a pod sits behind.
DEFAULT_MAX_RATE = 50e9


class Rates(NamedTuple):
    """A pod's rates in bytes per second; None where unknown. (Immutable like a frozen
    dataclass, and built at a third of its cost: one per pod per snapshot.)"""

    egress_bps: float | None = None
    ingress_bps: float | None = None
    egress_bps_1s: float | None = None
    ingress_bps_1s: float | None = None

    @property
    def known(self) -> bool:
        """True when the last interval's rates are known."""
        return self.egress_bps is not None


UNKNOWN = Rates()


class NodeMeter:
    """Every pod's counters' history, one column per pod and one row per tick (a ring of
    ``history`` rows), and the rates it gives (see the module docstring).

    ``observe(keys, readings)`` takes one tick: the pods to meter and what was read for
    them, ``{key: (t_ns, net/dev bytes or None, source)}``; a pod without a reading (not
    resolved yet) has no segment until it has one. ``rates()`` gives every pod's rates
    as of the last tick. Per tick the work is one parse of all the files together
    (``netdev.parse_node``) and a few numpy operations over all the pods' interfaces;
    only a tick whose set of pods, sources or interfaces differs from the previous one
    goes pod by pod."""

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
        # Enough rows for a window of ticks however they jitter (a tick never comes
        # early: the schedule skips late ones), and some.
        self._rows = max(8, 2 * -(-window_ns // interval_ns) + 8)
        self._keys: list[str] = []
        self._column: dict[str, int] = {}
        self._t = np.zeros((self._rows, 0), dtype=np.int64)
        self._tx = np.zeros((self._rows, 0), dtype=np.int64)  # bytes since the segment began
        self._rx = np.zeros((self._rows, 0), dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)  # tick its segment began; -1: none
        self._tick = -1
        self._last = _Last()

    @property
    def keys(self) -> list[str]:
        """The pods metered, in column order."""
        return list(self._keys)

    def observe(
        self, keys: Sequence[str], readings: Mapping[str, tuple[int, bytes | None, int]]
    ) -> tuple[Counter[str], list[str]]:
        """Fold in one tick. Returns the segments broken, by reason (``unreadable``,
        ``malformed``, ``source``, ``interfaces``, ``reset``, ``stale``), and the keys
        whose file did not parse (to be read through another process)."""
        if len(keys) != len(self._keys) or list(keys) != self._keys:
            self._remap(keys)
        broken: Counter[str] = Counter()
        self._tick += 1
        k, rows = self._tick, self._rows
        row, prev_row = k % rows, (k - 1) % rows
        start = self._start
        # Comprehensions and zip(*...): per pod, no Python-level statement.
        got = [readings.get(key) for key in self._keys]
        cols = [c for c, r in enumerate(got) if r is not None and r[1] is not None]
        failed = [c for c, r in enumerate(got) if r is not None and r[1] is None]
        if failed:
            broken["unreadable"] += int(np.count_nonzero(start[failed] >= 0))
        read = np.zeros(len(self._keys), dtype=bool)
        read[cols] = True
        start[~read] = -1
        if not cols:
            self._last = _Last()
            return broken, []
        present = [got[c] for c in cols]
        times, data_tuple, source_tuple = zip(*present, strict=True)
        datas: list[bytes] = list(data_tuple)
        sources: list[int] = list(source_tuple)
        read_keys = [self._keys[c] for c in cols]
        ca = np.array(cols, dtype=np.int64)
        t_now = np.array(times, dtype=np.int64)
        last = self._last
        if (
            not last.bad
            and datas == last.datas
            and read_keys == last.keys
            and sources == last.sources
        ):
            # Not a byte moved anywhere since the last tick: every step is 0.
            cont = start[ca] >= 0
            stale = cont & (t_now <= self._t[prev_row, ca])
            if stale.any():
                broken["stale"] += int(np.count_nonzero(stale))
            going = cont & ~stale
            self._t[row, ca] = t_now
            self._tx[row, ca] = np.where(going, self._tx[prev_row, ca], 0)
            self._rx[row, ca] = np.where(going, self._rx[prev_row, ca], 0)
            start[ca] = np.where(going, start[ca], k)
            start[ca[stale]] = -1
            return broken, []
        node = parse_node(datas)
        if (
            read_keys == last.keys
            and sources == last.sources
            and node.counts == last.counts
            and node.names == last.names
        ):
            prev_rx, prev_tx = last.rx, last.tx
            cont = start[ca] >= 0
        else:
            prev_rx, prev_tx, cont = self._align(read_keys, sources, node, ca, broken)
        bad = np.zeros(len(cols), dtype=bool)
        if node.bad:
            bad[list(node.bad)] = True
            broken["malformed"] += int(np.count_nonzero(bad & (start[ca] >= 0)))
        t_prev = self._t[prev_row, ca]
        stale = cont & (t_now <= t_prev)
        if stale.any():
            broken["stale"] += int(np.count_nonzero(stale))
        pod_limit = self._max_rate * (t_now - t_prev) / 1e9
        one_each = len(node.names) == len(cols) and not node.bad  # one interface per pod
        limit = pod_limit if one_each else np.repeat(pod_limit, node.counts)
        d_rx, ok_rx = counter_steps(prev_rx, node.rx, limit)
        d_tx, ok_tx = counter_steps(prev_tx, node.tx, limit)
        if one_each:  # the usual pod (eth0 alone): a line is a pod
            reset = cont & ~stale & ~(ok_rx & ok_tx)
            step_rx = np.where(ok_rx, d_rx, 0).astype(np.int64)
            step_tx = np.where(ok_tx, d_tx, 0).astype(np.int64)
        else:
            ends = node.starts + np.array(node.counts, dtype=np.int64)
            failing = np.concatenate(([0], np.cumsum(~(ok_rx & ok_tx), dtype=np.int64)))
            reset = cont & ~stale & ((failing[ends] - failing[node.starts]) > 0)
            step_rx = _segment_sums(d_rx, ok_rx, node.starts, ends)
            step_tx = _segment_sums(d_tx, ok_tx, node.starts, ends)
        if reset.any():
            broken["reset"] += int(np.count_nonzero(reset))
        going = cont & ~stale & ~reset & ~bad
        self._t[row, ca] = t_now
        self._tx[row, ca] = np.where(going, self._tx[prev_row, ca] + step_tx, 0)
        self._rx[row, ca] = np.where(going, self._rx[prev_row, ca] + step_rx, 0)
        start[ca] = np.where(going, start[ca], k)
        start[ca[bad | stale]] = -1  # unknown until a reading that parses
        self._last = _Last(
            read_keys, sources, node.names, node.counts, node.rx, node.tx, datas, node.bad
        )
        return broken, [read_keys[i] for i in sorted(node.bad)]

    def rates(self) -> dict[str, Rates]:
        """Every pod's rates as of the last tick."""
        k, rows = self._tick, self._rows
        if k < 0 or not self._keys:
            return dict.fromkeys(self._keys, UNKNOWN)
        row, prev_row = k % rows, (k - 1) % rows
        start = self._start
        known = (start >= 0) & (k - start >= 1)
        t1, t0 = self._t[row], self._t[prev_row]
        span = np.where(known, t1 - t0, 1)
        egress = (self._tx[row] - self._tx[prev_row]) * 1e9 / span
        ingress = (self._rx[row] - self._rx[prev_row]) * 1e9 / span
        # The base of the mean: the newest reading of the segment, before the last, at
        # least a window (less half an interval) older than the last.
        depth = max(1, min(rows - 1, k))  # at tick 0 a row of its own: never a base
        ticks = k - np.arange(1, depth + 1, dtype=np.int64)
        back = ticks % rows
        horizon = t1 - self._window_ns + self._tolerance_ns
        candidate = (ticks[:, None] >= start[None, :]) & (self._t[back] <= horizon[None, :])
        has_base = known & candidate.any(axis=0)
        base = back[candidate.argmax(axis=0)]
        cols = np.arange(len(self._keys))
        tb = self._t[base, cols]
        base_span = np.where(has_base, t1 - tb, 1)
        egress_1s = (self._tx[row] - self._tx[base, cols]) * 1e9 / base_span
        ingress_1s = (self._rx[row] - self._rx[base, cols]) * 1e9 / base_span
        out: dict[str, Rates] = {}
        for key, kn, hb, e, i, e1, i1 in zip(
            self._keys,
            known.tolist(),
            has_base.tolist(),
            egress.tolist(),
            ingress.tolist(),
            egress_1s.tolist(),
            ingress_1s.tolist(),
            strict=True,
        ):
            out[key] = Rates(e, i, e1, i1) if hb else Rates(e, i) if kn else UNKNOWN
        return out

    def _remap(self, keys: Sequence[str]) -> None:
        """New columns for a new set of pods; the pods that stay keep theirs."""
        new_keys = list(keys)
        if len(set(new_keys)) != len(new_keys):
            raise ValueError("keys must be distinct")
        old = self._column
        shape = (self._rows, len(new_keys))
        t, tx, rx = (np.zeros(shape, dtype=np.int64) for _ in range(3))
        start = np.full(len(new_keys), -1, dtype=np.int64)
        for c, key in enumerate(new_keys):
            o = old.get(key)
            if o is not None:
                t[:, c], tx[:, c], rx[:, c] = self._t[:, o], self._tx[:, o], self._rx[:, o]
                start[c] = self._start[o]
        self._keys, self._column = new_keys, {key: c for c, key in enumerate(new_keys)}
        self._t, self._tx, self._rx, self._start = t, tx, rx, start

    def _align(
        self,
        read_keys: list[str],
        sources: list[int],
        node: NodeCounters,
        ca: I64,
        broken: Counter[str],
    ) -> tuple[U64, U64, BOOL]:
        """The previous tick's counters lined up with this tick's lines, pod by pod (the
        set of pods, a source or an interface changed), and which pods continue."""
        last = self._last
        before: dict[str, tuple[int, list[bytes], U64, U64]] = {}
        offset = 0
        for key, source, count in zip(last.keys, last.sources, last.counts, strict=True):
            end = offset + count
            before[key] = (source, last.names[offset:end], last.rx[offset:end], last.tx[offset:end])
            offset = end
        prev_rx = np.zeros(len(node.names), dtype=np.uint64)
        prev_tx = np.zeros(len(node.names), dtype=np.uint64)
        cont = np.zeros(len(read_keys), dtype=bool)
        starts = node.starts.tolist()
        for i, key in enumerate(read_keys):
            had = before.get(key)
            if had is None or self._start[ca[i]] < 0:
                continue  # a new segment: nothing to step from
            s, e = starts[i], starts[i] + node.counts[i]
            if had[0] != sources[i]:
                broken["source"] += 1
            elif had[1] != node.names[s:e]:
                broken["interfaces"] += 1
            else:
                prev_rx[s:e], prev_tx[s:e] = had[2], had[3]
                cont[i] = True
        return prev_rx, prev_tx, cont


@dataclass(frozen=True)
class _Last:
    """The previous tick's readings, to step from."""

    keys: list[str] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    names: list[bytes] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    rx: U64 = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    tx: U64 = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    datas: list[bytes] = field(default_factory=list)  # the files as read: unchanged is cheap
    bad: frozenset[int] = frozenset()


def _segment_sums(values: U64, known: BOOL, starts: I64, ends: I64) -> I64:
    """Per pod, the sum of its lines' known values (empty segments sum to 0)."""
    acc = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(np.where(known, values, 0))))
    return (acc[ends] - acc[starts]).astype(np.int64)
