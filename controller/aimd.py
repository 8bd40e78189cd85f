"""The asymmetric AIMD policy: cut best-effort egress fast when a critical SLO breaks,
give it back slowly once every critical app has been healthy for a while.

Pure and sans-I/O: time comes in as ``now_ns`` (monotonic), measurements as engine
``WindowStats``, current limits and measured usage as plain mappings; ``decide()`` returns
a frozen ``Decision``. The control loop (``loop.py``) feeds it and applies what it returns.

Rules (DESIGN.md, "Facts the design rests on: Control"):

- A signal with a configured threshold is *violated* when its value is above it, and
  *stable* when it is at or below ``stable_fraction`` of it. Unset thresholds are not
  evaluated. An app whose configured signals have no data is reported and makes the
  policy hold: it never increases blind.
- On any violation every workload is cut by ``decrease_factor`` at most once per
  ``decrease_cooldown`` (the actuation delay: a second cut before the first took effect
  over-cuts). The cut starts from the measured usage when it is known and below the cap,
  so the first cut bites even when the cap was far above the traffic. Usage is the mean
  of the readings over ``usage_window`` (a peak would count a burst's slow-start
  overshoot as the workload's rate); a reading far above the earlier peak marks the start
  of a burst, so the mean restarts after it and a cut waits until the new readings cover
  30 % of the window (0.3 s by default): one 100 ms sample is not a rate.
- Limits grow by ``increase_step`` only after every app has been stable for
  ``increase_interval`` (the dwell, restarted after each increase), and only for
  workloads using their cap (usage >= 90 % of it, or unknown usage): a cap nobody uses
  would drift to the maximum and leave the next burst unprotected.
- Limits are whole Mbit/s, clamped to [min_bandwidth, max_bandwidth], never below 1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from detnet.engine.stats import WindowStats

Action = Literal["decrease", "increase", "hold"]
Signal = Literal["jitter", "latency", "queue_delay", "loss"]

SIGNALS: tuple[Signal, ...] = ("jitter", "latency", "queue_delay", "loss")
# How each signal is spelled in a decision's reasons: says which statistic was used.
SIGNAL_LABELS: dict[Signal, str] = {
    "jitter": "jitter_iqr",
    "latency": "latency_p99",
    "queue_delay": "queue_delay",
    "loss": "loss_ratio",
}
USING_CAP_FRACTION = 0.9  # usage at or above this share of its cap counts as "using it"
# A reading this many times the previous peak is a workload ramping up: the rate it shows
# covers partly idle time, and the next few swing with slow start and bursts.
RAMP_RATIO = 1.5
# After a ramp, a cut waits until the readings since cover this share of usage_window, so
# it starts from a mean rate rather than one 100 ms sample (0.3 s by default).
RAMP_SETTLE_FRACTION = 0.3


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """The policy's knobs (config ``policy:``); bandwidths in Mbit/s, times in seconds."""

    decrease_factor: float = 0.20
    decrease_cooldown_s: float = 1.5
    increase_step: int = 10
    increase_interval_s: float = 5.0
    stable_fraction: float = 0.5
    min_bandwidth: int = 10
    max_bandwidth: int = 1000
    # The prototype's severity multiplier: a violation k times over its threshold cuts as
    # if k cuts happened at once, k capped here. 1.0 turns it off.
    severity_max_multiplier: float = 1.0
    # Usage is the mean of the readings over this horizon: one control step's reading is
    # noisy for bursty workloads, and a cut from it would land far from the 20% intended.
    usage_window_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.decrease_factor < 1.0:
            raise ValueError("decrease_factor must be in (0, 1)")
        if self.min_bandwidth < 1 or self.max_bandwidth < self.min_bandwidth:
            raise ValueError("need 1 <= min_bandwidth <= max_bandwidth")
        if self.increase_step < 1:
            raise ValueError("increase_step must be at least 1 Mbit/s")
        if not 0.0 < self.stable_fraction <= 1.0:
            raise ValueError("stable_fraction must be in (0, 1]")
        if self.decrease_cooldown_s < 0 or self.increase_interval_s < 0:
            raise ValueError("cooldown and dwell must not be negative")
        if self.severity_max_multiplier < 1.0:
            raise ValueError("severity_max_multiplier must be at least 1")
        if self.usage_window_s < 0:
            raise ValueError("usage_window must not be negative")

    def clamp(self, mbit: float) -> int:
        """Whole Mbit/s within [min_bandwidth, max_bandwidth]."""
        return max(self.min_bandwidth, min(self.max_bandwidth, math.floor(mbit)))


@dataclass(frozen=True, kw_only=True)
class Slo:
    """One critical app's thresholds; None means the signal is not evaluated."""

    target: str
    max_jitter_ms: float | None = None
    max_latency_ms: float | None = None
    max_queue_delay_ms: float | None = None
    max_loss_ratio: float | None = None

    def thresholds(self) -> dict[Signal, float]:
        """The configured thresholds by signal (ms for time signals, a ratio for loss)."""
        raw: dict[Signal, float | None] = {
            "jitter": self.max_jitter_ms,
            "latency": self.max_latency_ms,
            "queue_delay": self.max_queue_delay_ms,
            "loss": self.max_loss_ratio,
        }
        return {signal: value for signal, value in raw.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class SignalState:
    """One app's signal against its threshold at one decision."""

    target: str
    signal: Signal
    threshold: float  # ms for time signals, ratio for loss
    value: float | None  # None: no data
    violated: bool
    stable: bool

    def describe(self) -> str:
        """``robot-control jitter_iqr 2.31 ms > 1.00 ms`` style text."""
        label = SIGNAL_LABELS[self.signal]
        if self.value is None:
            return f"{self.target} {label} no data"
        if self.signal == "loss":
            val, thr = f"{self.value:.4f}", f"{self.threshold:.4f}"
        else:
            val, thr = _ms(self.value), _ms(self.threshold)
        if self.violated:
            return f"{self.target} {label} {val} > {thr}"
        return f"{self.target} {label} {val} <= {thr}"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the policy decided at ``now_ns``: the action, the new limits and why."""

    now_ns: int
    action: Action
    limits: Mapping[str, int]  # Mbit/s per workload, every workload included
    previous: Mapping[str, int]
    reasons: tuple[str, ...]
    signals: tuple[SignalState, ...]
    no_data: tuple[str, ...]  # apps with no measurements

    @property
    def changed(self) -> bool:
        """True when some limit differs from the previous one."""
        return dict(self.limits) != dict(self.previous)

    @property
    def violated(self) -> bool:
        """True when some signal broke its SLO."""
        return any(s.violated for s in self.signals)


def _value(stats: WindowStats, signal: Signal) -> float | None:
    """The statistic a signal is judged on, in ms (or a ratio for loss)."""
    if signal == "loss":
        # A window with nothing due yet says nothing about loss.
        return stats.loss_ratio if stats.sent > 0 else None
    ns = {
        "jitter": stats.jitter_iqr_ns,
        "latency": stats.rtt_p99_ns,
        "queue_delay": stats.queue_delay_ns,
    }[signal]
    return None if ns is None else ns / 1e6


class AsymmetricAimd:
    """The policy. Keeps only the cut and dwell timers; everything else comes in."""

    def __init__(
        self,
        policy: PolicyParams,
        slos: Sequence[Slo],
        workloads: Mapping[str, int | None],
    ) -> None:
        """``workloads`` maps each best-effort workload to its initial limit (or None)."""
        if not workloads:
            raise ValueError("the policy needs at least one best-effort workload")
        self.params = policy
        self.slos = tuple(slos)
        self.workloads = dict(workloads)
        self._last_cut_ns: int | None = None
        self._stable_since_ns: int | None = None
        self._ramp_ns: dict[str, int] = {}  # when each workload last ramped up
        self._usage_seen: dict[str, deque[tuple[int, float]]] = {
            name: deque() for name in self.workloads
        }

    def initial_limits(self, recorded: Mapping[str, int] | None = None) -> dict[str, int]:
        """Start limits: what an enforcer recorded, else initial_bandwidth, else the maximum."""
        recorded = recorded or {}
        out: dict[str, int] = {}
        for name, initial in self.workloads.items():
            start = recorded.get(
                name, initial if initial is not None else self.params.max_bandwidth
            )
            out[name] = self.params.clamp(start)
        return out

    def evaluate(
        self, stats: Mapping[str, WindowStats | None]
    ) -> tuple[tuple[SignalState, ...], tuple[str, ...]]:
        """Judge every configured signal; return the states and the apps with no data."""
        states: list[SignalState] = []
        no_data: list[str] = []
        frac = self.params.stable_fraction
        for slo in self.slos:
            window = stats.get(slo.target)
            missing = False
            for signal, threshold in slo.thresholds().items():
                value = None if window is None else _value(window, signal)
                if value is None:
                    missing = True
                    states.append(
                        SignalState(
                            target=slo.target,
                            signal=signal,
                            threshold=threshold,
                            value=None,
                            violated=False,
                            stable=False,
                        )
                    )
                    continue
                states.append(
                    SignalState(
                        target=slo.target,
                        signal=signal,
                        threshold=threshold,
                        value=value,
                        violated=value > threshold,
                        stable=value <= frac * threshold,
                    )
                )
            if missing or (window is None and not slo.thresholds()):
                no_data.append(slo.target)
        return tuple(states), tuple(no_data)

    def decide(
        self,
        *,
        now_ns: int,
        stats: Mapping[str, WindowStats | None],
        limits: Mapping[str, int],
        usage: Mapping[str, float],
    ) -> Decision:
        """One control step. ``limits`` are the current caps; missing ones start fresh."""
        p = self.params
        start = self.initial_limits()
        previous = {name: int(limits.get(name, start[name])) for name in self.workloads}
        states, no_data = self.evaluate(stats)
        violations = [s for s in states if s.violated]
        usage, ramping = self._usage_estimate(now_ns, usage, previous)

        def result(action: Action, new: Mapping[str, int], reasons: list[str]) -> Decision:
            return Decision(
                now_ns=now_ns,
                action=action,
                limits=dict(new),
                previous=previous,
                reasons=tuple(reasons),
                signals=states,
                no_data=no_data,
            )

        if violations:
            self._stable_since_ns = None
            reasons = [s.describe() for s in violations]
            if self._last_cut_ns is not None and now_ns - self._last_cut_ns < _ns(
                p.decrease_cooldown_s
            ):
                left = (_ns(p.decrease_cooldown_s) - (now_ns - self._last_cut_ns)) / 1e9
                return result("hold", previous, [*reasons, f"cooldown: next cut in {left:.2f} s"])
            if ramping:
                return result(
                    "hold", previous, [*reasons, f"usage ramping up ({', '.join(ramping)})"]
                )
            factor = self._cut_factor(violations)
            new: dict[str, int] = {}
            for name, cap in previous.items():
                used = usage.get(name)
                base = used if used is not None and 0 <= used < cap else cap
                new[name] = min(cap, p.clamp(base * (1.0 - factor)))
            if new == previous:
                return result("hold", previous, [*reasons, "every workload at min_bandwidth"])
            self._last_cut_ns = now_ns
            return result("decrease", new, [*reasons, f"cut {factor:.0%}"])

        if no_data:
            # Never increase blind; and a gap in the evidence restarts the dwell.
            self._stable_since_ns = None
            return result("hold", previous, [f"{app} no data" for app in no_data])

        unstable = [s for s in states if not s.stable]
        if unstable:
            self._stable_since_ns = None
            return result(
                "hold",
                previous,
                [f"{s.describe()} (above {p.stable_fraction:.0%} of the SLO)" for s in unstable],
            )

        if self._stable_since_ns is None:
            self._stable_since_ns = now_ns
        dwelt = (now_ns - self._stable_since_ns) / 1e9
        if dwelt < p.increase_interval_s:
            return result(
                "hold",
                previous,
                [f"all apps stable for {dwelt:.2f} s of {p.increase_interval_s:.2f} s dwell"],
            )
        new = dict(previous)
        idle: list[str] = []
        for name, cap in previous.items():
            used = usage.get(name)
            if used is not None and used < USING_CAP_FRACTION * cap:
                idle.append(name)
                continue
            new[name] = max(cap, p.clamp(cap + p.increase_step))
        if new == previous:
            why = "every workload at max_bandwidth"
            if idle:
                why = f"stable, but not raising unused caps: {', '.join(idle)}"
            return result("hold", previous, [why])
        self._stable_since_ns = now_ns  # the next step needs a dwell of its own
        reasons = [f"all apps stable for {dwelt:.2f} s: +{p.increase_step} Mbit/s"]
        if idle:
            reasons.append(f"not raising unused caps: {', '.join(idle)}")
        return result("increase", new, reasons)

    def _usage_estimate(
        self, now_ns: int, usage: Mapping[str, float], caps: Mapping[str, int]
    ) -> tuple[dict[str, float], list[str]]:
        """Remember this step's readings; return each workload's mean rate over the usage
        window, and the workloads that ramped up too recently for their mean to count.

        A reading far above the earlier peak marks the start of a burst: it covers partly
        idle time, so it and everything before it leave the mean, which restarts."""
        window = _ns(self.params.usage_window_s)
        settle = round(window * RAMP_SETTLE_FRACTION)
        means: dict[str, float] = {}
        ramping: list[str] = []
        for name, seen in self._usage_seen.items():
            used = usage.get(name)
            ramped = self._ramp_ns.get(name)
            settling = ramped is not None and now_ns - ramped < settle
            if used is not None:
                before = max((value for _, value in seen), default=None)
                seen.append((now_ns, used))
                if (
                    not settling  # a ramp's own growth must not postpone the cut forever
                    and before is not None
                    and used >= 1.0  # Mbit/s: not an idle workload's noise
                    and used > RAMP_RATIO * before
                    and used < USING_CAP_FRACTION * caps[name]
                ):
                    seen.clear()
                    self._ramp_ns[name] = now_ns
            while seen and now_ns - seen[0][0] > window:
                seen.popleft()
            if seen:
                means[name] = sum(value for _, value in seen) / len(seen)
            ramped = self._ramp_ns.get(name)
            if ramped is not None and now_ns - ramped < settle:
                ramping.append(f"{name} for {(now_ns - ramped) / 1e9:.1f} s")
        return means, ramping

    def _cut_factor(self, violations: Sequence[SignalState]) -> float:
        """decrease_factor, compounded by severity when the multiplier is on."""
        f = self.params.decrease_factor
        if self.params.severity_max_multiplier <= 1.0:
            return f
        severity = max(
            (s.value / s.threshold for s in violations if s.value is not None and s.threshold > 0),
            default=1.0,
        )
        k = max(1.0, min(severity, self.params.severity_max_multiplier))
        return 1.0 - (1.0 - f) ** k


def _ms(value: float) -> str:
    """Milliseconds as in the SLO; sub-0.1 ms values in µs so they do not print as 0.00."""
    return f"{value:.2f} ms" if value >= 0.1 or value == 0 else f"{value * 1e3:.1f} µs"


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
