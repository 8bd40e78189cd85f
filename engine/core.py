"""ProbeEngine: runs every target's prober on its schedule and serves the statistics.

Public API (what the controller, the lab and ``detnet probe`` use)::

    engine = ProbeEngine(targets, window_ns=10_000_000_000, on_sample=None)
    await engine.start()          # resolve, open sockets, start the schedules
    engine.stats()                # {name: WindowStats} over the window, any thread
    engine.totals()               # {name: ProbeTotals} since start
    registry.register(engine.collector())
    await engine.aclose()         # stop sending, let probes in flight finish, close

or ``await engine.run(stop_event)`` for start / wait / aclose in one call. Scheduling uses
CLOCK_MONOTONIC: each target's next deadline is armed with ``loop.call_later``, and the
callback sends the probes of the newest passed deadline (older ones are skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from detnet import native
from detnet.engine.collector import EngineCollector
from detnet.engine.errors import TargetError
from detnet.engine.probers import Prober, make_prober
from detnet.engine.recorder import ProbeTotals, SampleCallback
from detnet.engine.ring import (
    LATENESS_EDGES_S,
    CumulativeHistogram,
    HistogramSnapshot,
    RingSnapshot,
)
from detnet.engine.scheduler import Schedule, phase_offset
from detnet.engine.stats import WindowStats, window_stats
from detnet.engine.targets import Target

DEFAULT_CAPACITY = 1 << 16
# How often overdue probes are turned into losses when no send or reply does it first.
_SWEEP_MIN_S, _SWEEP_MAX_S = 0.001, 0.1


@dataclass(frozen=True)
class Window:
    """One target's window: the records it covers and the statistics over them."""

    snapshot: RingSnapshot
    stats: WindowStats


def _timer_slack_ns(loop: asyncio.AbstractEventLoop) -> int:
    # libuv timers (uvloop) count whole milliseconds and round the delay to the nearest
    # one, so a callback wakes up to 0.5 ms either side of its deadline. A wake-up that
    # early counts as on time; otherwise sub-millisecond leftovers would re-arm at 0 ms
    # (a spin) or 1 ms (a skipped slot at 1 ms intervals). The default loop is precise.
    return 500_000 if type(loop).__module__.startswith("uvloop") else 0


class ProbeEngine:
    """Probes ``targets`` continuously and keeps per-target ring-buffer statistics.

    The window is the last ``window_ns`` of finished probes and/or the last
    ``window_samples`` of them (both: whichever is smaller); neither: the whole ring.
    ``capacity`` is the number of records each target's ring keeps. ``on_sample`` is
    called on the loop with one ``Sample`` per finished probe (received or lost).
    """

    def __init__(
        self,
        targets: Iterable[Target],
        *,
        window_ns: int | None = None,
        window_samples: int | None = None,
        capacity: int = DEFAULT_CAPACITY,
        on_sample: SampleCallback | None = None,
    ) -> None:
        self.targets: dict[str, Target] = {}
        for t in targets:
            if t.name in self.targets:
                raise TargetError(f"target name {t.name!r} is used twice")
            self.targets[t.name] = t
        if not self.targets:
            raise TargetError("no targets to probe")
        if window_ns is not None and window_ns <= 0:
            raise TargetError("the window must be positive")
        if window_samples is not None and window_samples <= 0:
            raise TargetError("the window must hold at least one sample")
        self.window_ns = window_ns
        self.window_samples = window_samples
        self.capacity = capacity
        self.on_sample = on_sample
        self.backend: str = native.BACKEND
        self.lateness = CumulativeHistogram(LATENESS_EDGES_S)
        self.clock_read_ns: float = 0.0
        self._probers: dict[str, Prober] = {}
        self._schedules: dict[str, Schedule] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slack_ns = 0
        self._running = False

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve every target, open its sockets and start probing.

        Raises TargetError (and opens nothing) when a target cannot be resolved or opened.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._slack_ns = _timer_slack_ns(loop)
        self.clock_read_ns = float(native.clock_read_cost_ns(1000))
        try:
            for t in self.targets.values():
                address = await _resolve(loop, t)
                prober = make_prober(
                    t, address=address, capacity=self.capacity, on_sample=self.on_sample
                )
                try:
                    await prober.open()
                except (OSError, TimeoutError) as exc:
                    raise TargetError(
                        f"target {t.name} ({t.url}): cannot open: {exc or type(exc).__name__}"
                    ) from exc
                self._probers[t.name] = prober
        except BaseException:
            await self._close_probers()
            raise
        self._running = True
        now = native.monotonic_ns()
        for name, t in self.targets.items():
            self._schedules[name] = Schedule(
                interval_ns=t.interval_ns,
                start_ns=now,
                phase_ns=phase_offset(name, t.interval_ns),
                poisson=t.poisson,
            )
            self._arm(name, now)
        timeout_s = min(t.timeout_ns for t in self.targets.values()) / 1e9
        self._sweep_period = min(max(timeout_s / 4, _SWEEP_MIN_S), _SWEEP_MAX_S)
        self._sweeper = loop.call_later(self._sweep_period, self._sweep)

    async def aclose(self, *, drain: bool = True) -> None:
        """Stop sending; with ``drain``, wait until every probe in flight got its reply or
        timed out (so every probe sent is accounted for); then close everything."""
        self._running = False
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if drain and self._probers:
            deadline = native.monotonic_ns() + max(t.timeout_ns for t in self.targets.values())
            while True:
                now = native.monotonic_ns()
                for p in self._probers.values():
                    p.recorder.sweep(now)
                if all(p.recorder.in_flight == 0 for p in self._probers.values()):
                    break
                if now > deadline:
                    break
                await asyncio.sleep(min(0.005, max((deadline - now) / 1e9, 0.0)))
        await self._close_probers()

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

    # --- reading ------------------------------------------------------------------------
    def stats(self, now_ns: int | None = None) -> dict[str, WindowStats]:
        """Window statistics of every target (safe from any thread)."""
        return {name: w.stats for name, w in self.windows(now_ns).items()}

    def windows(self, now_ns: int | None = None) -> dict[str, Window]:
        """Every target's window: the snapshot (a copy of its records) and its statistics."""
        now = native.monotonic_ns() if now_ns is None else now_ns
        since = None if self.window_ns is None else now - self.window_ns
        out: dict[str, Window] = {}
        for name, p in list(self._probers.items()):
            rec = p.recorder
            snap = rec.ring.snapshot(last_n=self.window_samples, since_ns=since)
            stats = window_stats(
                snap,
                target=name,
                protocol=p.target.protocol,
                base_rtt_ns=rec.base_rtt(now),
                default_source=rec.timestamp_source,
            )
            out[name] = Window(snap, stats)
        return out

    def totals(self) -> dict[str, ProbeTotals]:
        """Counters of every target since start."""
        return {name: p.recorder.totals() for name, p in self._probers.items()}

    def histograms(self) -> dict[str, HistogramSnapshot]:
        """Cumulative RTT histograms of every target."""
        return {name: p.recorder.histogram.snapshot() for name, p in self._probers.items()}

    def timestamp_sources(self) -> dict[str, str]:
        """``"kernel"`` or ``"user"``: what each target's latest samples used."""
        return {name: p.recorder.timestamp_source for name, p in self._probers.items()}

    @property
    def probers(self) -> Mapping[str, Prober]:
        """The running probers by target name (read-only use)."""
        return self._probers

    def collector(self) -> EngineCollector:
        """A prometheus_client Collector reading this engine at scrape time."""
        return EngineCollector(self)

    # --- scheduling ---------------------------------------------------------------------
    def _arm(self, name: str, now_ns: int) -> None:
        assert self._loop is not None
        delay = (self._schedules[name].next_deadline_ns - now_ns) / 1e9
        self._timers[name] = self._loop.call_later(max(delay, 0.0), self._tick, name)

    def _tick(self, name: str) -> None:
        if not self._running:
            return
        now = native.monotonic_ns()
        fire = self._schedules[name].fire(now, slack_ns=self._slack_ns)
        if fire is not None:
            prober = self._probers[name]
            prober.recorder.skipped += fire.skipped
            prober.send(now, prober.target.batch)
            # Lateness against the deadline; an early (within the slack) send counts as 0.
            self.lateness.add_one(max(fire.lateness_ns, 0))
            now = native.monotonic_ns()
        self._arm(name, now)

    def _sweep(self) -> None:
        if not self._running or self._loop is None:
            return
        now = native.monotonic_ns()
        for p in self._probers.values():
            p.recorder.sweep(now)
        self._sweeper = self._loop.call_later(self._sweep_period, self._sweep)

    async def _close_probers(self) -> None:
        probers = list(self._probers.values())
        for p in probers:
            with contextlib.suppress(OSError):
                await p.aclose()


async def _resolve(loop: asyncio.AbstractEventLoop, target: Target) -> str:
    """The numeric address of ``target.host``; TargetError when it does not resolve."""
    kind = socket.SOCK_DGRAM if target.protocol == "udp" else socket.SOCK_STREAM
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=kind)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetError(f"target {target.name}: cannot resolve {target.host!r}: {exc}") from exc
    if not infos:
        raise TargetError(f"target {target.name}: {target.host!r} has no address")
    return str(infos[0][4][0])
