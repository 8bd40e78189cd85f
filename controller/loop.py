"""The control loop: the thin asyncio adapter around the policy.

On its own cadence (absolute deadlines, so the period does not drift with the step's
cost) it gathers an ``Observation``: measured usage (the node agents', through a
``UsageSource``, or the enforcer's own), the probe windows since each target's evidence
start (``AsymmetricAimd.evidence_since``: samples taken while a cut's queue drains say
nothing of the cut) and over the last second (the queue's trend), what each probe target
stands for (the endpoint feed) and where the best-effort pods run (the enforcer's
placements); calls ``AsymmetricAimd.decide()`` and, when the desired limits differ from
the applied ones, awaits ``Enforcer.apply()``. A failed apply is logged and counted and
the next step applies again; the loop never stops on an enforcement error, and never
waits on usage longer than its source's deadline. Each decision is one log line (JSON
with ``--log-format json``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TextIO

from detnet.controller.aimd import AsymmetricAimd, Decision, Observation, Scope
from detnet.controller.enforce.base import Enforcer
from detnet.controller.errors import EnforcementError
from detnet.controller.metrics import ControllerMetrics
from detnet.controller.workloads import PodRef
from detnet.engine.parse import escape
from detnet.engine.stats import WindowStats
from detnet.engine.targets import Endpoint

log = logging.getLogger("detnet.controller.loop")
_DIGITS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
RECENT_WINDOW_NS = 1_000_000_000  # the queue's trend: the last second of samples


class StatsSource(Protocol):
    """What the loop needs of the engine: its live windows by target name."""

    def stats(
        self,
        now_ns: int | None = None,
        *,
        window_ns: int | None = None,
        since_ns: Mapping[str, int] | None = None,
    ) -> Mapping[str, WindowStats | None]:
        """Window statistics per target: the configured window, or the last
        ``window_ns``, each target's starting no earlier than its ``since_ns``."""
        ...

    def queue_trace(
        self, now_ns: int | None = None, *, window_ns: int
    ) -> Mapping[str, Sequence[tuple[int, float]]]:
        """Per target, (monotonic send ns, queueing delay ms) of each probe over the last
        ``window_ns``, oldest first."""
        ...


class UsageSource(Protocol):
    """Measured egress per scope from outside the enforcer (the node agents)."""

    async def usage(self, pods: Mapping[str, Sequence[PodRef]]) -> Mapping[Scope, float]:
        """Mbit/s per scope of ``pods`` (per workload); a scope whose usage is not
        fully known is absent. Returns within its own deadline; never raises for an
        agent's failure."""
        ...


class Clock(Protocol):
    """Monotonic time and sleeping to a deadline (a fake in tests)."""

    def now_ns(self) -> int:
        """Monotonic nanoseconds."""
        ...

    async def sleep_until(self, deadline_ns: int) -> None:
        """Return at or after ``deadline_ns``."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic_ns`` and ``asyncio.sleep``."""

    def now_ns(self) -> int:
        """Monotonic nanoseconds."""
        return time.monotonic_ns()

    async def sleep_until(self, deadline_ns: int) -> None:
        """Sleep until the deadline (returns at once when it has passed)."""
        delay = (deadline_ns - time.monotonic_ns()) / 1e9
        await asyncio.sleep(max(0.0, delay))


class DecisionLog:
    """Writes one line per decision: a JSON object, or text.

    Repeated holds with the same reasons are written once, so a quiet loop at 4 Hz does
    not flood the log; every change, every failure and every new kind of reason is
    written (a hold whose reasons differ only in their numbers is not)."""

    def __init__(
        self,
        *,
        fmt: str = "text",
        stream: TextIO | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if fmt not in ("text", "json"):
            raise ValueError("log format must be text or json")
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self.wall_clock = wall_clock
        self._last_hold: tuple[str, ...] | None = None

    def decision(
        self,
        decision: Decision,
        *,
        enforce_s: float | None,
        error: str | None = None,
        at: float | None = None,
    ) -> None:
        """Log one decision (and how long enforcing it took, if it was enforced).

        ``at`` is the wall-clock time the decision was taken (default: now); the line is
        written after enforcement, so "ts" would otherwise include the apply time."""
        if decision.action == "hold" and error is None:
            # Same reasons with other numbers (values, cooldown countdown): nothing new.
            key = tuple(_DIGITS.sub("#", r) for r in decision.reasons)
            if key == self._last_hold:
                return
            self._last_hold = key
        else:
            self._last_hold = None
        if self.fmt == "json":
            record: dict[str, object] = {
                "ts": round(at if at is not None else self.wall_clock(), 6),
                "event": "decision",
                "action": decision.action,
                "reasons": list(decision.reasons),
                "limits": {str(k): v for k, v in decision.limits.items()},
                "previous": {str(k): v for k, v in decision.previous.items()},
                "usage": {str(k): round(v, 1) for k, v in decision.usage.items()},
                "enforce_s": None if enforce_s is None else round(enforce_s, 6),
            }
            if error is not None:
                record["error"] = error
            line = json.dumps(record, separators=(",", ":"))
        else:
            when = at if at is not None else self.wall_clock()
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            # Names and reasons carry user text (workload names) and errors carry remote
            # text (API messages): escaped, one decision stays one line that cannot forge
            # another or repaint the terminal. JSON escapes them by itself.
            limits = " ".join(
                f"{escape(str(name))}={decision.previous.get(name)}->{mbit}M"
                if decision.previous.get(name) != mbit
                else f"{escape(str(name))}={mbit}M"
                for name, mbit in decision.limits.items()
            )
            reasons = "; ".join(escape(r) for r in decision.reasons)
            line = f"{stamp} {decision.action:<8} {limits} | {reasons}"
            if enforce_s is not None:
                line += f" | enforced in {enforce_s * 1e3:.1f} ms"
            if error is not None:
                line += f" | ENFORCEMENT FAILED: {escape(error)}"
        print(line, file=self.stream, flush=True)


class ControlLoop:
    """Engine -> policy -> enforcer, every ``interval_s``.

    ``endpoints`` returns what each probe target stands for (targets not named are apps
    at their Service address); ``usage`` measures the best-effort pods the enforcer
    lists (without it, the enforcer's own ``usage()``)."""

    def __init__(
        self,
        *,
        engine: StatsSource,
        policy: AsymmetricAimd,
        enforcer: Enforcer,
        interval_s: float = 0.25,
        metrics: ControllerMetrics | None = None,
        clock: Clock | None = None,
        decision_log: DecisionLog | None = None,
        endpoints: Callable[[], Mapping[str, Endpoint]] | None = None,
        usage: UsageSource | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.engine = engine
        self.policy = policy
        self.enforcer = enforcer
        self.interval_ns = round(interval_s * 1e9)
        self.metrics = metrics
        self.clock: Clock = clock or MonotonicClock()
        self.decision_log = decision_log
        self.endpoints = endpoints or dict
        self.usage_source = usage
        self.desired: dict[Scope, int] = {}  # what the policy wants
        self.applied: dict[Scope, int] = {}  # what the enforcer last confirmed
        self.started = False
        self.steps = 0
        self.enforcement_errors = 0
        self.last_step_ns: int | None = None
        self.last_decision: Decision | None = None
        self._stop = asyncio.Event()
        self._actuation_ns: int | None = None

    async def start(self) -> dict[Scope, int]:
        """Start the enforcer and pick the start limits: recorded, else initial, else max.

        The start limits are applied once, so every workload is under a known cap."""
        recorded = await self.enforcer.start()
        self.desired = self.policy.initial_limits(recorded, self.enforcer.placements())
        if self.metrics is not None:
            self.metrics.set_slos(self.policy.slos)
        self.started = True
        await self._enforce(self.desired)
        return dict(self.desired)

    async def observe(self) -> Observation:
        """What the policy decides on now: usage first (it may take up to its source's
        deadline), then the probe windows, so they are as fresh as they can be."""
        usage = await self._usage()
        endpoints = self.endpoints()
        since = self.policy.evidence_since(endpoints)
        return Observation(
            stats=self.engine.stats(since_ns=since),
            recent=self.engine.stats(window_ns=RECENT_WINDOW_NS),
            # Probe by probe only the step after a cut, when the policy reads its drain.
            trace=(
                self.engine.queue_trace(window_ns=self.interval_ns)
                if self.policy.reads_drain
                else None
            ),
            actuation_ns=self._actuation_ns,
            endpoints=endpoints,
            usage=usage,
            placements=self.enforcer.placements(),
        )

    async def _usage(self) -> Mapping[Scope, float]:
        try:
            if self.usage_source is not None:
                return dict(await self.usage_source.usage(self.enforcer.pods()))
            return dict(await self.enforcer.usage())
        except EnforcementError as exc:
            # Without usage the policy cuts from the cap and raises only blind-safe caps.
            log.warning("usage unavailable: %s", exc)
            return {}

    async def step(self) -> Decision:
        """One control step: decide, and apply when the limits differ from applied ones."""
        observation = await self.observe()
        t0 = time.perf_counter()
        now_ns = self.clock.now_ns()
        # The wall-clock twin of now_ns: the logged "ts" is the policy's own time, so the
        # log shows cooldowns and dwells exactly as the policy counted them.
        decided_at = self.decision_log.wall_clock() if self.decision_log is not None else None
        decision = self.policy.decide(now_ns=now_ns, observation=observation, limits=self.desired)
        self.desired = dict(decision.limits)
        step_s = time.perf_counter() - t0
        enforce_s: float | None = None
        error: str | None = None
        if self.desired != self.applied:
            enforce_s, error = await self._enforce(self.desired)
            # From the decision to the enforcer's return: when the new limits began.
            self._actuation_ns = None
            if error is None and enforce_s is not None:
                self._actuation_ns = round((step_s + enforce_s) * 1e9)
        if self.metrics is not None:
            self.metrics.record_decision(decision)
            self.metrics.set_usage(observation.usage)
            self.metrics.loop_seconds.observe(step_s)
        if self.decision_log is not None:
            self.decision_log.decision(decision, enforce_s=enforce_s, error=error, at=decided_at)
        self.steps += 1
        self.last_step_ns = now_ns
        self.last_decision = decision
        return decision

    async def _enforce(self, limits: Mapping[Scope, int]) -> tuple[float | None, str | None]:
        """Apply ``limits``; on failure log, count, and leave ``applied`` so we retry."""
        t0 = time.perf_counter()
        try:
            await self.enforcer.apply(dict(limits))
        except EnforcementError as exc:
            self.enforcement_errors += 1
            if self.metrics is not None:
                self.metrics.enforcement_errors.labels(enforcer=self.enforcer.name).inc()
            log.error("enforcement failed (retrying next step): %s", exc)
            return time.perf_counter() - t0, str(exc)
        elapsed = time.perf_counter() - t0
        self.applied = dict(limits)
        if self.metrics is not None:
            self.metrics.enforcement_latency.labels(enforcer=self.enforcer.name).observe(elapsed)
            self.metrics.set_limits(self.applied)
        return elapsed, None

    async def run(self, *, steps: int | None = None) -> None:
        """Step on absolute deadlines until ``stop()`` (or ``steps`` steps); call start() first.

        A step that overruns its slot skips the missed slots instead of bursting."""
        if not self.started:
            raise RuntimeError("call start() before run()")
        deadline = self.clock.now_ns()
        done = 0
        while not self._stop.is_set() and (steps is None or done < steps):
            await self.step()
            done += 1
            deadline += self.interval_ns
            now = self.clock.now_ns()
            if now >= deadline:
                missed = (now - deadline) // self.interval_ns + 1
                deadline += missed * self.interval_ns
            sleeper = asyncio.ensure_future(self.clock.sleep_until(deadline))
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, stopper):
                    task.cancel()
                await asyncio.gather(sleeper, stopper, return_exceptions=True)

    def stop(self) -> None:
        """Ask ``run()`` to return after the step in progress (an apply is not cut short)."""
        self._stop.set()

    def healthy(self, *, now_ns: int | None = None, tolerance: float = 5.0) -> bool:
        """True when a step ran within ``tolerance`` intervals (the /healthz check)."""
        if self.last_step_ns is None:
            return False
        now = self.clock.now_ns() if now_ns is None else now_ns
        return now - self.last_step_ns <= tolerance * self.interval_ns
