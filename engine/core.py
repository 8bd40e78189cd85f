"""ProbeEngine: runs every target's prober on its schedule and serves the statistics.

Public API (what the controller, the lab and ``detnet probe`` use)::

    engine = ProbeEngine(targets, window_ns=10_000_000_000, on_sample=None,
                         allow_empty=False, max_total_rate_pps=None)
    await engine.start()          # resolve, open sockets, start the schedules
    await engine.add_target(t)    # while running: resolve, open, schedule (TargetError)
    await engine.remove_target(n) # stop, drop its probes in flight, close
    await engine.replace_targets(ts)  # the set difference of both, as TargetChanges
    engine.stats()                # {name: WindowStats} over the window, any thread
    engine.stats(since_ns={name: t}, window_ns=1_000_000_000)  # narrower windows
    engine.totals()               # {name: ProbeTotals} since the target was added
    engine.intervals(), engine.rate()  # effective intervals, the total-rate cap at work
    registry.register(engine.collector())
    await engine.aclose()         # stop sending, let probes in flight finish, close

or ``await engine.run(stop_event)`` for start / wait / aclose in one call. Scheduling uses
CLOCK_MONOTONIC: each target's next deadline (``scheduler.Timetable``) is armed with
``loop.call_later``, and the callback sends the probes of the newest passed deadline
(older ones are skipped).

The running targets are one immutable mapping, replaced whole on every change (copy on
write): a reader on another thread (the collector, on the HTTP server's thread) takes it
once and sees a target either completely or not at all, never half added or removed.

One module past 500 lines on purpose: the engine's one class, whose copy-on-write target
map, schedules and close order are one design; the I/O of a probe is ``probers.py``, its
arithmetic ``recorder.py`` and the schedule ``scheduler.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from detnet import native
from detnet.engine.collector import EngineCollector
from detnet.engine.errors import EngineError, TargetError
from detnet.engine.probers import Prober, make_prober
from detnet.engine.recorder import ProbeTotals, SampleCallback
from detnet.engine.ring import (
    LATENESS_EDGES_S,
    CumulativeHistogram,
    HistogramSnapshot,
    RingSnapshot,
)
from detnet.engine.scheduler import Cadence, Timetable
from detnet.engine.stats import WindowStats, window_stats
from detnet.engine.stream import SampleStream
from detnet.engine.targets import Target

DEFAULT_CAPACITY = 1 << 16  # ring slots of a target whose window is not bounded
MIN_CAPACITY = 1024
# How often overdue probes are turned into losses when no send or reply does it first.
_SWEEP_MIN_S, _SWEEP_MAX_S = 0.001, 0.1


@dataclass(frozen=True)
class Window:
    """One target's window: the records it covers and the statistics over them."""

    snapshot: RingSnapshot
    stats: WindowStats


@dataclass(frozen=True)
class Reading:
    """What a scrape reads of one target, all taken from one set of running targets."""

    target: Target
    window: Window
    totals: ProbeTotals
    histogram: HistogramSnapshot
    timestamp_source: str
    interval_ns: int  # the effective interval (stretched under the total-rate cap)


@dataclass(frozen=True)
class ProbeRate:
    """The total probe rate: asked for, planned after stretching, and the cap."""

    cap_pps: float | None
    demand_pps: float  # what the targets ask for together
    planned_pps: float  # what they get, at most the cap
    stretch: float  # the factor every interval is multiplied by (1.0: none)


@dataclass(frozen=True)
class TargetChanges:
    """What ``replace_targets`` did; ``failed`` maps a name to its one-line error (a new
    target not added, or a changed one that kept its old definition)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Running:
    target: Target
    prober: Prober
    interval_ns: int


_NOTHING: Mapping[str, _Running] = MappingProxyType({})


def _timer_slack_ns(loop: asyncio.AbstractEventLoop) -> int:
    # libuv timers (uvloop) count whole milliseconds and round the delay to the nearest
    # one, so a callback wakes up to 0.5 ms either side of its deadline. A wake-up that
    # early counts as on time; otherwise sub-millisecond leftovers would re-arm at 0 ms
    # (a spin) or 1 ms (a skipped slot at 1 ms intervals). The default loop is precise.
    return 500_000 if type(loop).__module__.startswith("uvloop") else 0


def ring_capacity(target: Target, *, window_ns: int | None, window_samples: int | None) -> int:
    """Ring slots for ``target``'s window: its records at the target's own rate, a quarter
    spare, as a power of two from MIN_CAPACITY to DEFAULT_CAPACITY. A ring is 65 bytes a
    slot: sized for a 5 s window at 10 Hz it is 66 kB, where 64k slots were 4 MB per
    endpoint (400 MB for 100 of them)."""
    needs = [] if window_samples is None else [window_samples]
    if window_ns is not None:
        needs.append(-(-window_ns // target.interval_ns) * target.batch)
    if not needs:
        return DEFAULT_CAPACITY
    want = int(min(needs) * 1.25) + 64
    return min(max(1 << (want - 1).bit_length(), MIN_CAPACITY), DEFAULT_CAPACITY)


def _cadence(t: Target) -> Cadence:
    return Cadence(interval_ns=t.interval_ns, batch=t.batch, poisson=t.poisson)


class ProbeEngine:
    """Probes ``targets`` continuously and keeps per-target ring-buffer statistics.

    The window is the last ``window_ns`` of finished probes and/or the last
    ``window_samples`` of them (both: whichever is smaller); neither: the whole ring.
    ``capacity`` is the number of records each target's ring keeps (default: enough for
    the window, ``ring_capacity``; a ``windows(window_ns=...)`` longer than the engine's
    window sees only what the ring holds). ``on_sample`` is
    called on the loop with one ``Sample`` per finished probe (received or lost); a
    ``SampleStream`` there (``--stream``) also reports what it dropped.
    An engine refuses to start without targets unless ``allow_empty`` (targets that come
    later through ``add_target``). ``max_total_rate_pps`` caps the probes per second of
    all targets together: intervals are stretched uniformly to stay under it.
    """

    def __init__(
        self,
        targets: Iterable[Target] = (),
        *,
        window_ns: int | None = None,
        window_samples: int | None = None,
        capacity: int | None = None,
        on_sample: SampleCallback | None = None,
        allow_empty: bool = False,
        max_total_rate_pps: float | None = None,
    ) -> None:
        configured: dict[str, Target] = {}
        for t in targets:
            if t.name in configured:
                raise TargetError(f"target name {t.name!r} is used twice")
            configured[t.name] = t
        if not configured and not allow_empty:
            raise TargetError("no targets to probe")
        if window_ns is not None and window_ns <= 0:
            raise TargetError("the window must be positive")
        if window_samples is not None and window_samples <= 0:
            raise TargetError("the window must hold at least one sample")
        if max_total_rate_pps is not None and not (
            math.isfinite(max_total_rate_pps) and max_total_rate_pps > 0
        ):
            raise EngineError(
                f"the total probe rate cap must be a positive number, not {max_total_rate_pps}"
            )
        self.window_ns = window_ns
        self.window_samples = window_samples
        self.capacity = capacity
        self.on_sample = on_sample
        self.max_total_rate_pps = max_total_rate_pps
        self.backend: str = native.BACKEND
        self.lateness = CumulativeHistogram(LATENESS_EDGES_S)
        self.clock_read_ns: float = 0.0
        self._stream = on_sample if isinstance(on_sample, SampleStream) else None
        self._configured = configured  # before start: the targets start() opens
        self._running: Mapping[str, _Running] = _NOTHING  # published, replaced whole
        self._adding: set[str] = set()  # names being resolved and opened
        self._timetable: Timetable | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_period = _SWEEP_MAX_S
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slack_ns = 0
        self._state = "new"  # new -> starting -> running -> closed
        self._rate: ProbeRate | None = None  # published with the running set

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve every target, open its sockets and start probing.

        Raises TargetError (and opens nothing) when a target cannot be resolved or opened.
        """
        if self._state != "new":
            raise EngineError(f"the engine cannot start: it is {self._state}")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._slack_ns = _timer_slack_ns(loop)
        self.clock_read_ns = float(native.clock_read_cost_ns(1000))
        self._state = "starting"
        opened: list[tuple[Target, Prober]] = []
        try:
            for t in list(self._configured.values()):
                opened.append((t, await self._open(t)))
        except BaseException:
            await _close_all(p for _, p in opened)
            if self._state == "starting":
                self._state = "new"
            raise
        if self._state != "starting":  # closed while opening
            await _close_all(p for _, p in opened)
            raise EngineError("the engine was closed while starting")
        self._state = "running"
        self._timetable = Timetable(
            start_ns=native.monotonic_ns(), max_total_rate_pps=self.max_total_rate_pps
        )
        self._commit(add=opened)
        self._sweeper = loop.call_later(self._sweep_period, self._sweep)

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop sending; with ``drain``, wait until every probe in flight got its reply or
        timed out, and every two-step reply its stamp (or settled one-step), so every probe
        sent is accounted for; then close everything.

        The last windows and totals stay readable."""
        self._state = "closed"
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        running = list(self._running.values())
        if drain and running:
            longest = max(r.target.timeout_ns + r.prober.recorder.settle_ns for r in running)
            deadline = native.monotonic_ns() + longest
            while True:
                now = native.monotonic_ns()
                for r in running:
                    r.prober.recorder.sweep(now)
                if all(
                    r.prober.recorder.in_flight == 0 and r.prober.recorder.awaiting_stamps == 0
                    for r in running
                ):
                    break
                if now > deadline:
                    break
                await asyncio.sleep(min(0.005, max((deadline - now) / 1e9, 0.0)))
        await _close_all(r.prober for r in running)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, probe until ``stop`` is set, then close (draining probes in flight)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.aclose()

    async def __aenter__(self) -> ProbeEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- targets that come and go -------------------------------------------------------
    async def add_target(self, target: Target) -> None:
        """Probe ``target`` from now on: resolve it, open it, schedule it on the grid of the
        running targets (its first probe within one interval). Before ``start()`` it only
        joins the targets start() opens.

        TargetError, and nothing changes, when the name is taken or the target cannot be
        resolved or opened (or the engine closes meanwhile)."""
        name = target.name
        self._check_open()
        if name in self._running or name in self._adding or name in self._configured:
            raise TargetError(f"target name {name!r} is used twice")
        if self._state == "new":
            self._configured[name] = target
            return
        self._adding.add(name)
        try:
            prober = await self._open(target)
        finally:
            self._adding.discard(name)
        if self._state != "running":
            await _close_all([prober])
            raise TargetError(f"target {name}: the engine closed while it was being added")
        self._commit(add=[(target, prober)])

    async def remove_target(self, name: str) -> None:
        """Stop probing ``name``: its schedule stops, its series leave the windows, totals
        and /metrics at once, and its sockets close. TargetError when there is no such
        target (or it is still being added).

        Probes still in flight are dropped, neither received nor lost: the endpoint is
        going away (a terminating pod stops answering), so a loss would blame the app for
        it, and waiting up to a timeout per removed endpoint would hold the caller (a
        watcher with new endpoints to add) for as long."""
        self._check_open()
        if self._state == "new":
            if self._configured.pop(name, None) is None:
                raise TargetError(f"no target named {name!r}")
            return
        entry = self._running.get(name)
        if entry is None:
            being = " (it is still being added)" if name in self._adding else ""
            raise TargetError(f"no target named {name!r}{being}")
        self._commit(remove=[name])
        await _close_all([entry.prober])

    async def replace_targets(self, targets: Iterable[Target]) -> TargetChanges:
        """Make the probed set ``targets``: remove the targets not in it, add the new ones
        and replace those whose definition changed (new address, say), in one step for the
        scheduler. New targets are opened concurrently; one that fails is reported in
        ``failed`` and the rest goes on (a changed one that fails keeps running as it was).

        TargetError, and nothing changes, when a name is used twice in ``targets``."""
        desired: dict[str, Target] = {}
        for t in targets:
            if t.name in desired:
                raise TargetError(f"target name {t.name!r} is used twice")
            desired[t.name] = t
        self._check_open()
        if self._state == "new":
            before = self._configured
            self._configured = desired
            return TargetChanges(
                added=tuple(sorted(set(desired) - set(before))),
                removed=tuple(sorted(set(before) - set(desired))),
                replaced=tuple(
                    sorted(n for n in before if n in desired and before[n] != desired[n])
                ),
            )
        current = self._running
        failed: dict[str, str] = {}
        to_open = []
        for name, t in desired.items():
            if name in self._adding:
                failed[name] = f"target {name}: it is still being added"
            elif name not in current or current[name].target != t:
                to_open.append(t)
        self._adding.update(t.name for t in to_open)
        try:
            results = await self._open_many(to_open)
        finally:
            self._adding.difference_update(t.name for t in to_open)
        opened: list[tuple[Target, Prober]] = []
        for t, res in zip(to_open, results, strict=True):
            if isinstance(res, Prober):
                opened.append((t, res))
            else:
                failed[t.name] = str(res)
        if self._state != "running":
            await _close_all(p for _, p in opened)
            raise TargetError("the engine closed while its targets were being replaced")
        current = self._running  # other changes may have landed while opening
        replaced = [t.name for t, _ in opened if t.name in current]
        removed = [n for n in current if n not in desired]
        old = [current[n].prober for n in (*removed, *replaced)]
        self._commit(add=opened, remove=[*removed, *replaced])
        await _close_all(old)
        return TargetChanges(
            added=tuple(sorted(t.name for t, _ in opened if t.name not in replaced)),
            removed=tuple(sorted(removed)),
            replaced=tuple(sorted(replaced)),
            failed=failed,
        )

    def _check_open(self) -> None:
        if self._state == "closed":
            raise TargetError("the engine is closed")
        if self._state == "starting":
            raise TargetError("the engine is starting: change its targets once start() returned")

    async def _open(self, t: Target) -> Prober:
        """Resolve and open ``t``'s prober; TargetError (nothing left open) on failure."""
        loop = asyncio.get_running_loop()
        address = await _resolve(loop, t)
        capacity = self.capacity or ring_capacity(
            t, window_ns=self.window_ns, window_samples=self.window_samples
        )
        prober = make_prober(t, address=address, capacity=capacity, on_sample=self.on_sample)
        try:
            await prober.open()
        except (OSError, TimeoutError) as exc:
            await _close_all([prober])
            raise TargetError(
                f"target {t.name} ({t.url}): cannot open: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:
            await _close_all([prober])
            raise
        return prober

    async def _open_many(self, targets: list[Target]) -> list[Prober | TargetError]:
        """Open ``targets`` concurrently: each one's prober, or its TargetError. Cancelled,
        it closes what it opened."""
        tasks = [asyncio.ensure_future(self._open(t)) for t in targets]
        if not tasks:
            return []
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(_opened(tasks))
            raise
        out: list[Prober | TargetError] = []
        for task in tasks:
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, TargetError):
                out.append(exc)
            elif exc is not None or task.cancelled():
                await _close_all(_opened(tasks))
                raise exc or asyncio.CancelledError()
            else:
                out.append(task.result())
        return out

    def _commit(
        self, *, add: Iterable[tuple[Target, Prober]] = (), remove: Iterable[str] = ()
    ) -> None:
        """Apply one change to the running set: timetable, published mapping, timers."""
        assert self._timetable is not None
        add, remove = list(add), list(remove)
        now = native.monotonic_ns()
        retimed = self._timetable.update(
            now_ns=now, add={t.name: _cadence(t) for t, _ in add}, remove=remove
        )
        running = dict(self._running)
        for name in remove:
            del running[name]
            handle = self._timers.pop(name, None)
            if handle is not None:
                handle.cancel()
        tt = self._timetable
        for t, p in add:
            running[t.name] = _Running(t, p, tt.interval_ns(t.name))
        for name in retimed:
            running[name] = _Running(
                running[name].target, running[name].prober, tt.interval_ns(name)
            )
        self._rate = ProbeRate(
            cap_pps=self.max_total_rate_pps,
            demand_pps=tt.demand_pps,
            planned_pps=tt.planned_pps,
            stretch=tt.stretch,
        )
        self._running = MappingProxyType(running)
        for name in {*retimed, *(t.name for t, _ in add)}:
            self._arm(name, now)
        timeouts = [r.target.timeout_ns for r in running.values()]
        timeout_s = min(timeouts) / 1e9 if timeouts else _SWEEP_MAX_S * 4
        self._sweep_period = min(max(timeout_s / 4, _SWEEP_MIN_S), _SWEEP_MAX_S)

    # --- reading (any thread) -----------------------------------------------------------
    @property
    def targets(self) -> Mapping[str, Target]:
        """The targets probed now (before start: the targets start() will open)."""
        if self._state in ("new", "starting"):
            return MappingProxyType(dict(self._configured))
        return {name: r.target for name, r in self._running.items()}

    @property
    def probers(self) -> Mapping[str, Prober]:
        """The running probers by target name (read-only use)."""
        return {name: r.prober for name, r in self._running.items()}

    @property
    def timetable(self) -> Timetable | None:
        """The send schedules of the running targets (read-only use, on the loop)."""
        return self._timetable

    def stats(
        self,
        now_ns: int | None = None,
        *,
        window_ns: int | None = None,
        since_ns: Mapping[str, int] | None = None,
    ) -> dict[str, WindowStats]:
        """Window statistics of every target; the arguments are those of ``windows()``."""
        return {
            name: w.stats
            for name, w in self.windows(now_ns, window_ns=window_ns, since_ns=since_ns).items()
        }

    def windows(
        self,
        now_ns: int | None = None,
        *,
        window_ns: int | None = None,
        since_ns: Mapping[str, int] | None = None,
    ) -> dict[str, Window]:
        """Every target's window: the snapshot (a copy of its records) and its statistics.

        ``window_ns`` replaces the engine's time window for this call (a short recent span,
        say); ``since_ns`` further limits a target's window to records completed at or
        after its entry (CLOCK_MONOTONIC; after the last cut took effect, say). A window
        without records still has its WindowStats: counts 0, every statistic None."""
        if window_ns is not None and window_ns <= 0:
            raise ValueError("the window must be positive")
        now = native.monotonic_ns() if now_ns is None else now_ns
        span = self.window_ns if window_ns is None else window_ns
        return {name: self._window(r, now, span, since_ns) for name, r in self._running.items()}

    def _window(
        self, r: _Running, now: int, span: int | None, since_ns: Mapping[str, int] | None
    ) -> Window:
        bounds = [now - span] if span is not None else []
        if since_ns is not None and r.target.name in since_ns:
            bounds.append(since_ns[r.target.name])
        rec = r.prober.recorder
        snap = rec.ring.snapshot(last_n=self.window_samples, since_ns=max(bounds, default=None))
        stats = window_stats(
            snap,
            target=r.target.name,
            protocol=r.target.protocol,
            base_rtt_ns=rec.base_rtt(now),
            default_source=rec.timestamp_source,
        )
        return Window(snap, stats)

    def queue_trace(
        self, now_ns: int | None = None, *, window_ns: int
    ) -> dict[str, tuple[tuple[int, float], ...]]:
        """Each target's queueing delay probe by probe over the last ``window_ns``: (when
        the probe was sent, CLOCK_MONOTONIC ns, the completion time less its RTT; its RTT
        over the base RTT, ms), oldest first. Targets without a base RTT are left out."""
        out: dict[str, tuple[tuple[int, float], ...]] = {}
        for name, w in self.windows(now_ns, window_ns=window_ns).items():
            base = w.stats.base_rtt_ns
            if base is None:
                continue
            snap = w.snapshot
            got = ~np.isnan(snap.rtt_ns)
            sent = snap.t_ns[got] - snap.rtt_ns[got].astype(np.int64)
            queue = np.maximum(0.0, (snap.rtt_ns[got] - base) / 1e6)
            out[name] = tuple(zip(sent.tolist(), queue.tolist(), strict=True))
        return out

    def readings(self, now_ns: int | None = None) -> dict[str, Reading]:
        """Everything the collector exports per target, from one set of running targets."""
        now = native.monotonic_ns() if now_ns is None else now_ns
        out: dict[str, Reading] = {}
        for name, r in self._running.items():
            rec = r.prober.recorder
            out[name] = Reading(
                target=r.target,
                window=self._window(r, now, self.window_ns, None),
                totals=rec.totals(),
                histogram=rec.histogram.snapshot(),
                timestamp_source=rec.timestamp_source,
                interval_ns=r.interval_ns,
            )
        return out

    def totals(self) -> dict[str, ProbeTotals]:
        """Counters of every target since it was added."""
        return {name: r.prober.recorder.totals() for name, r in self._running.items()}

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """Cumulative RTT histograms of every target."""
        return {name: r.prober.recorder.histogram.snapshot() for name, r in self._running.items()}

    @property
    def stream_dropped(self) -> int | None:
        """Records the ``SampleStream`` given as ``on_sample`` dropped (None: none given)."""
        return None if self._stream is None else self._stream.dropped

    def timestamp_sources(self) -> dict[str, str]:
        """``"kernel"`` or ``"user"``: what each target's latest samples used."""
        return {name: r.prober.recorder.timestamp_source for name, r in self._running.items()}

    def intervals(self) -> dict[str, int]:
        """Every target's effective interval (ns): its own, stretched under the rate cap."""
        return {name: r.interval_ns for name, r in self._running.items()}

    def rate(self) -> ProbeRate:
        """The total probe rate asked for and planned, and the stretch of the cap."""
        published = self._rate
        if published is not None:
            return published  # the live timetable belongs to the loop: never read it here
        tt = Timetable(start_ns=0, max_total_rate_pps=self.max_total_rate_pps)
        tt.update(now_ns=0, add={n: _cadence(t) for n, t in self._configured.items()})
        return ProbeRate(
            cap_pps=self.max_total_rate_pps,
            demand_pps=tt.demand_pps,
            planned_pps=tt.planned_pps,
            stretch=tt.stretch,
        )

    def collector(self) -> EngineCollector:
        """A prometheus_client Collector reading this engine at scrape time."""
        return EngineCollector(self)

    # --- scheduling ---------------------------------------------------------------------
    def _arm(self, name: str, now_ns: int) -> None:
        assert self._loop is not None
        assert self._timetable is not None
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        delay = (self._timetable.next_deadline_ns(name) - now_ns) / 1e9
        self._timers[name] = self._loop.call_later(max(delay, 0.0), self._tick, name)

    def _tick(self, name: str) -> None:
        r = self._running.get(name)
        if self._state != "running" or r is None or self._timetable is None:
            return
        now = native.monotonic_ns()
        fire = self._timetable.fire(name, now, slack_ns=self._slack_ns)
        if fire is not None:
            prober = r.prober
            prober.recorder.skipped += fire.skipped
            prober.send(now, prober.target.batch)
            # Lateness against the deadline; an early (within the slack) send counts as 0.
            self.lateness.add_one(max(fire.lateness_ns, 0))
            now = native.monotonic_ns()
        self._arm(name, now)

    def _sweep(self) -> None:
        if self._state != "running" or self._loop is None:
            return
        now = native.monotonic_ns()
        for r in self._running.values():
            r.prober.recorder.sweep(now)
        self._sweeper = self._loop.call_later(self._sweep_period, self._sweep)


def _opened(tasks: Iterable[asyncio.Future[Prober]]) -> list[Prober]:
    return [t.result() for t in tasks if t.done() and not t.cancelled() and not t.exception()]


async def _close_all(probers: Iterable[Prober]) -> None:
    for p in list(probers):
        with contextlib.suppress(OSError):
            await p.aclose()


async def _resolve(loop: asyncio.AbstractEventLoop, target: Target) -> str:
    """The numeric address of ``target.host``; TargetError when it does not resolve."""
    kind = socket.SOCK_STREAM if target.protocol == "tcp" else socket.SOCK_DGRAM
    try:
        infos = await loop.getaddrinfo(target.host, target.port or None, type=kind)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetError(f"target {target.name}: cannot resolve {target.host!r}: {exc}") from exc
    if not infos:
        raise TargetError(f"target {target.name}: {target.host!r} has no address")
    return str(infos[0][4][0])
