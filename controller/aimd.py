"""The asymmetric AIMD policy: cut best-effort egress fast where a critical SLO breaks,
give it back slowly, and park it just under the knee.

Pure and sans-I/O: time comes in as ``now_ns`` (monotonic), measurements as an
``Observation`` (engine ``WindowStats`` per probe target, what each target stands for,
measured usage, where the best-effort pods run), current limits as a mapping of
``Scope`` to Mbit/s; ``decide()`` returns a frozen ``Decision``. The control loop
(``loop.py``) feeds it and applies what it returns.

Limits are kept per *scope*: a best-effort workload (``scope: cluster``), or a workload
on one node (``scope: node``, where the probe targets are endpoints that carry nodes). A
*group* is the set of scopes one node's congestion can be relieved by: under node scope
the workloads' pods on that node; under cluster scope every workload. Rules (DESIGN.md,
"Facts the design rests on: Control"):

- A violation on a target cuts its group (a target without a node, a Service address,
  concerns every group) by ``decrease_factor`` at most once per ``decrease_cooldown``,
  from the measured mean usage when it is known and below the cap (so the first cut
  bites; for a cluster-wide limit, written to each pod, its busiest node's usage), to a
  margin under a remembered knee when that loses less (``knee.py``). When
  a cut had to start from the cap (usage unknown) and made no difference to the violated
  signal after ``effect_delay``, the next cut comes at once and deeper.
- After a cut, its group's targets are judged on samples taken ``effect_delay`` after it
  (``evidence_since``): samples of the queue the cut is draining say nothing of it. But
  that queue's slope, probe by probe from the moment the cut took effect, shows the rate
  the link serves (``drain_knee``): a closer bound on the group's knee than usage gives.
- When a violated node has nothing left to cut (no best-effort pods, or all at
  ``min_bandwidth``) for ``escalate_after`` cooldowns, the cut widens to every node; it
  narrows back once that node's SLO holds.
- A group's limits grow only after its targets (and the unplaced ones) have been stable
  for ``increase_interval`` (restarted after each increase), never while a target warns
  of a building queue, never for a cap its workload is not using (usage below 90 % of
  it; unknown usage counts as using), by ``increase_step``, or, with a remembered knee,
  straight to a margin below it (after a cooldown's dwell only) and then by small steps
  (after ``increase_interval``; a cooldown's while the knee is only an upper bound). A
  queue rising right after a step up undoes that step at once, and each step past a
  certain knee that had to be undone doubles the dwell before the next (up to
  ``2**MAX_DWELL_DOUBLINGS`` times, until the knee moves); each that stood halves it
  (up to ``2**MAX_DWELL_HALVINGS`` times, never under a cooldown). On a shared link a
  bursty workload keeps the room of its last burst (``_committed``); at the link's knee
  the part of a cap its workload does not use (above its last burst and a fair share of
  the knee) goes to the workloads using theirs (``_unused_caps``), and the caps of those
  that fill theirs even out, where they bind on one link (``_even_out``).
- Limits are whole Mbit/s, clamped to [min_bandwidth, max_bandwidth].

One module past 500 lines on purpose: the rules above share one state per group (timers,
the cut's severity, the knee memories) and are read, and reviewed, as one decision; the
arithmetic of a single step lives in ``knee.py``, the SLO evaluation in ``slo.py`` and
usage in ``usagewindow.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from detnet.controller.knee import (
    KneeMemory,
    QueueWatch,
    WarningParams,
    climb_to,
    cut_to,
    drain_knee,
    trim_to,
)
from detnet.controller.signals import (
    Endpoint,
    Evaluation,
    SignalState,
    Slo,
    evaluate,
    signal_value,
    targets_of,
)
from detnet.controller.usagewindow import USING_CAP_FRACTION, PeakMeter, UsageMeter
from detnet.controller.workloads import CLUSTER, Scope
from detnet.engine.stats import WindowStats

Action = Literal["decrease", "increase", "hold"]
# A violation this many times over its threshold is not a cap a few percent past the
# knee: it gets the full cut, not a step back under the knee.
GENTLE_MAX_SEVERITY = 2.0
# Climbing towards a group knee that is only an upper bound: this share of the load per
# step, up to UNCERTAIN_BAND under the bound; from there fine steps. Such a bound (the usage
# of senders ramping into a full queue) was from 8 % under to 18 % over the link's knee in
# the lab, and a step of more than about 1 % past a knee breaks a 2 ms queue SLO before
# the next control step can undo it. The band covers the usual case; a bound far over the
# knee leaves the cut close under it, and the queue's drain bounds it closer (``drain_knee``).
UNCERTAIN_STEP_FRACTION = 0.05
UNCERTAIN_BAND = 0.08
# At a knee that keeps being confirmed, the dwell before the next fine step doubles with
# each step past it that had to be undone, up to this many times: each costs a standing
# queue.
MAX_DWELL_DOUBLINGS = 3
# And it halves with each fine step in a row that stood, up to this many times (never
# under a cooldown): a knee noted at a passing burst is no knee, and at one step per
# increase_interval the caps took 40 s to climb the 10 % back to the link's in the lab.
MAX_DWELL_HALVINGS = 2
# How long a workload's peak rate keeps its room on a shared link (``_committed``):
# uploads and report bursts come every few seconds; one idle for longer leaves its room.
BURST_MEMORY_S = 10.0
ScopeMode = Literal["cluster", "node"]


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """The policy's knobs (config ``policy:``); bandwidths in Mbit/s, times in seconds.
    Every default is meant to need no tuning (docs/config.md says why each is what it is)."""

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
    usage_window_s: float = 1.0
    scope: ScopeMode = "cluster"
    # From a cut to its effect in the probes: enforcement, then a few probe intervals.
    effect_delay_s: float = 0.5
    # A violated node with nothing to cut for this many cooldowns widens the cut.
    escalate_after: int = 3
    # A blind cut without effect is followed by a deeper one, up to this factor.
    max_blind_factor: float = 0.5
    early_warning_fraction: float = 0.25
    knee_margin: float = 0.02
    knee_step_fraction: float = 0.01
    knee_memory_s: float = 120.0

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
        if self.usage_window_s < 0 or self.effect_delay_s < 0 or self.knee_memory_s < 0:
            raise ValueError("usage_window, effect_delay and knee_memory must not be negative")
        if self.scope not in ("cluster", "node"):
            raise ValueError("scope must be cluster or node")
        if self.escalate_after < 1:
            raise ValueError("escalate_after must be at least 1")
        if not self.decrease_factor <= self.max_blind_factor < 1.0:
            raise ValueError("max_blind_factor must be in [decrease_factor, 1)")
        for name in ("early_warning_fraction", "knee_margin", "knee_step_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")

    def clamp(self, mbit: float) -> int:
        """Whole Mbit/s within [min_bandwidth, max_bandwidth]."""
        return max(self.min_bandwidth, min(self.max_bandwidth, math.floor(mbit)))


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the policy sees at one step.

    ``stats``: each probe target's window (since its evidence start, ``evidence_since``);
    ``recent``: the same targets over the last second or so, for the queue's trend (the
    windows themselves when absent); ``endpoints``: what each target stands for (a target
    not listed is the app of that name, at its Service address); ``usage``: measured
    Mbit/s per scope, absent where unknown; ``placements``: per workload the nodes its
    running pods are on (node scope); ``trace``: per target, the queueing delay probe by
    probe over the last control interval ((monotonic send ns, ms), for the queue's slope
    after a cut); ``actuation_ns``: how long the last change of limits took from its
    decision to the enforcer's return (None when unknown or it failed)."""

    stats: Mapping[str, WindowStats | None]
    recent: Mapping[str, WindowStats | None] | None = None
    trace: Mapping[str, Sequence[tuple[int, float]]] | None = None
    actuation_ns: int | None = None
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)
    usage: Mapping[Scope, float] = field(default_factory=dict)
    placements: Mapping[str, frozenset[str]] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the policy decided at ``now_ns``: the action, the new limits and why."""

    now_ns: int
    action: Action
    limits: Mapping[Scope, int]  # Mbit/s per scope, every current scope included
    previous: Mapping[Scope, int]
    reasons: tuple[str, ...]
    signals: tuple[SignalState, ...]
    no_data: tuple[str, ...]  # targets with no measurements
    cut_nodes: tuple[str, ...] = ()  # groups cut ("" for the cluster group)
    escalated: bool = False  # the cut was widened to every node
    # The usage the step counted (Mbit/s, the mean over usage_window) per scope it knew.
    usage: Mapping[Scope, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """True when some limit differs from the previous one."""
        return dict(self.limits) != dict(self.previous)

    @property
    def violated(self) -> bool:
        """True when some signal broke its SLO."""
        return any(s.violated for s in self.signals)


@dataclass
class _Group:
    """The policy's memory of one group (a node, or the cluster)."""

    last_cut_ns: int | None = None
    last_trim_ns: int | None = None  # an early-warning step back: no cooldown for a cut
    stable_since_ns: int | None = None
    violated_since_ns: int | None = None
    blind: bool = False  # the last cut started from a cap: usage was unknown
    cut_severity: float = 0.0  # how far over its threshold the worst signal was then
    deepen: int = 0  # blind cuts in a row without effect
    gentle: bool = False  # the last cut only stepped back under the knee
    last_raise_ns: int | None = None
    before_raise: dict[Scope, int] = field(default_factory=dict)  # the caps then
    undone: int = 0  # steps past the knee undone since it was last found anew
    stood: int = 0  # fine steps at a known knee in a row that were not undone
    raised_at_knee: bool = False  # the last increase was such a fine step
    drain: _Drain | None = None  # the last cut, to read the knee off the queue it drains


class _Drain(NamedTuple):
    """A cut whose queue is read at the next step: the load the group puts on the link
    after it (Mbit/s), and when it was decided."""

    load: float
    at_ns: int


class AsymmetricAimd:
    """The policy. Keeps timers, knees and usage means; everything else comes in."""

    def __init__(
        self, *, params: PolicyParams, slos: Sequence[Slo], workloads: Mapping[str, int | None]
    ) -> None:
        """``workloads`` maps each best-effort workload to its initial limit (or None)."""
        if not workloads:
            raise ValueError("the policy needs at least one best-effort workload")
        self.params = params
        self.slos = tuple(slos)
        self.workloads = dict(workloads)
        self._groups: dict[str, _Group] = {}
        self._usage: UsageMeter[Scope] = UsageMeter(_ns(params.usage_window_s))
        self._peaks: PeakMeter[Scope] = PeakMeter(_ns(BURST_MEMORY_S))
        self._burst_peaks: dict[Scope, float] = {}
        self._placements: Mapping[str, frozenset[str]] = {}
        self._knees: KneeMemory[Scope] = KneeMemory(_ns(params.knee_memory_s))
        # The knee of each group (the scopes that share a link): their summed rate.
        self._group_knees: KneeMemory[str] = KneeMemory(_ns(params.knee_memory_s))
        self._watch = QueueWatch(WarningParams(fraction=params.early_warning_fraction))
        self._escalated_by: set[str] = set()  # violated nodes that widened the cut
        self._basis = {slo.app: _tightest_ms(slo) for slo in slos}

    # --- scopes and start limits ---------------------------------------------------
    def scopes(self, placements: Mapping[str, Iterable[str]] | None = None) -> list[Scope]:
        """The scopes limits are kept for: per workload, one per node its pods run on
        under node scope (one cluster scope for a workload whose placement is unknown)."""
        out: list[Scope] = []
        for workload in self.workloads:
            nodes = sorted((placements or {}).get(workload, ()))
            if self.params.scope == "node" and nodes:
                out += [Scope(workload, node) for node in nodes]
            else:
                out.append(Scope(workload))
        return out

    def initial_limit(self, scope: Scope) -> int:
        """A scope's start limit: the workload's initial_bandwidth, else the maximum."""
        initial = self.workloads[scope.workload]
        return self.params.clamp(initial if initial is not None else self.params.max_bandwidth)

    def initial_limits(
        self,
        recorded: Mapping[Scope, int] | None = None,
        placements: Mapping[str, Iterable[str]] | None = None,
    ) -> dict[Scope, int]:
        """Start limits: what an enforcer recorded (for the scope, else for its workload
        cluster-wide), else initial_bandwidth, else the maximum."""
        recorded = recorded or {}
        out: dict[Scope, int] = {}
        for scope in self.scopes(placements):
            start = recorded.get(scope, recorded.get(Scope(scope.workload)))
            out[scope] = self.initial_limit(scope) if start is None else self.params.clamp(start)
        return out

    def evidence_since(self, endpoints: Mapping[str, Endpoint]) -> dict[str, int]:
        """Per probe target, the monotonic time from which its samples count: after the
        last cut (or trim) of its group took effect. Targets not named have no such bound."""
        delay = _ns(self.params.effect_delay_s)
        starts = {
            name: last + delay
            for name, g in self._groups.items()
            if (last := max(g.last_cut_ns or 0, g.last_trim_ns or 0))
        }
        if not starts:
            return {}
        out: dict[str, int] = {}
        for targets in targets_of(self.slos, endpoints).values():
            for target in targets:
                node = endpoints.get(target, Endpoint(target)).node
                if node is None or self.params.scope == "cluster":
                    since = max(starts.values())
                else:
                    since = starts.get(node, 0)
                if since:
                    out[target] = since
        return out

    # --- the decision ----------------------------------------------------------------
    def decide(
        self, *, now_ns: int, observation: Observation, limits: Mapping[Scope, int]
    ) -> Decision:
        """One control step. ``limits`` are the current caps; missing ones start fresh."""
        p, obs = self.params, observation
        scopes = self.scopes(obs.placements)
        previous = {s: int(limits.get(s, self.initial_limit(s))) for s in scopes}
        ev = evaluate(
            self.slos, obs.stats, endpoints=obs.endpoints, stable_fraction=p.stable_fraction
        )
        usage, ramping = self._usage.update(now_ns, obs.usage, previous)
        self._burst_peaks = self._peaks.update(now_ns, usage)
        self._placements = obs.placements
        warnings = self._warnings(now_ns, obs)
        self._knees.forget(set(scopes))

        members: dict[str, list[Scope]] = {}
        for s in scopes:
            members.setdefault(self._group_of(s.node), []).append(s)
        for node in ev.violated_nodes | ev.unstable_nodes | ev.no_data_nodes:
            if node is not None:
                members.setdefault(self._group_of(node), [])
        for name in members:
            self._groups.setdefault(name, _Group())

        new = dict(previous)
        reasons: list[str] = []
        cut: list[str] = []
        raised: list[str] = []
        self._read_drains(now_ns, obs, reasons)
        violated = self._affected(ev.violated_nodes, members)
        for name in sorted(violated):
            self._cut_group(
                name, now_ns, members[name], ev, usage, ramping, previous, new, reasons, cut
            )
        escalated = self._escalate(now_ns, violated, members, usage, previous, new, reasons, cut)
        held = violated | self._affected(ev.unstable_nodes | ev.no_data_nodes, members)
        for name in sorted(members):
            if name in held:
                self._groups[name].stable_since_ns = None
                self._groups[name].violated_since_ns = (
                    self._groups[name].violated_since_ns if name in violated else None
                )
                # Unstable but within SLO while the queue builds: the last climb passed
                # the knee. Step back now rather than wait for the violation and its cut.
                warn = self._warning_of(name, warnings)
                if name not in violated and warn and not self._escalated_by:
                    self._trim(
                        name, now_ns, members[name], usage, previous, new, reasons, cut, warn
                    )
                continue
            self._groups[name].violated_since_ns = None
            self._climb_group(
                name, now_ns, members[name], usage, warnings, previous, new, reasons, raised, cut
            )
        self._hold_reasons(ev, reasons)

        action: Action = "decrease" if cut else "increase" if raised else "hold"
        if new == previous and action != "hold":
            action = "hold"
        return Decision(
            now_ns=now_ns,
            action=action,
            limits=new,
            previous=previous,
            reasons=tuple(reasons) or ("no change",),
            signals=ev.signals,
            no_data=ev.no_data,
            cut_nodes=tuple(cut),
            escalated=escalated,
            usage=usage,
        )

    # --- cutting -----------------------------------------------------------------------
    def _cut_group(
        self,
        name: str,
        now_ns: int,
        scopes: list[Scope],
        ev: Evaluation,
        usage: Mapping[Scope, float],
        ramping: Mapping[Scope, float],
        previous: Mapping[Scope, int],
        new: dict[Scope, int],
        reasons: list[str],
        cut: list[str],
    ) -> None:
        p, g = self.params, self._groups[name]
        where = self._where(name)
        mine = [s for s in ev.violations if self._group_of(s.node) == name or s.node is None]
        reasons += [s.describe() for s in mine]
        if g.violated_since_ns is None:
            g.violated_since_ns = now_ns
        severity = max((_over(s) for s in mine), default=1.0)
        if g.last_trim_ns is not None and now_ns - g.last_trim_ns < _ns(p.effect_delay_s):
            # A trim's small step is no reason to wait a cooldown, but its effect is due.
            reasons.append(f"{where}waiting for the last trim to take effect")
            return
        if g.last_cut_ns is not None and now_ns - g.last_cut_ns < _ns(p.decrease_cooldown_s):
            blind_again = (
                g.blind
                and now_ns - g.last_cut_ns >= _ns(p.effect_delay_s)
                and severity >= 0.9 * g.cut_severity
            )
            if not blind_again:
                left = (_ns(p.decrease_cooldown_s) - (now_ns - g.last_cut_ns)) / 1e9
                reasons.append(f"{where}cooldown: next cut in {left:.2f} s")
                return
            g.deepen += 1
            reasons.append(f"{where}the last cut (from the cap: usage unknown) had no effect")
        else:
            g.deepen = 0
        waiting = [f"{s} for {ramping[s]:.1f} s" for s in scopes if s in ramping]
        if waiting:
            reasons.append(f"{where}usage ramping up ({', '.join(waiting)})")
            return
        factor = self._cut_factor(mine, deepen=g.deepen)
        # Back under the knee only for a mild first overshoot: a violation several times
        # over its threshold, or one that a gentle cut did not end, is no small overshoot
        # (the link itself may have slowed): the full factor then.
        gentle_ok = severity < GENTLE_MAX_SEVERITY and not g.gentle and not g.deepen
        blind = gentle = False
        quiet: list[str] = []
        for s in scopes:
            cap, used = previous[s], usage.get(s)
            if _quiet(used, p):
                # Sending no more than min_bandwidth: a cut to it would not slow its
                # traffic now, only starve it later (a false alarm while it was idle).
                quiet.append(str(s))
                continue
            if used is None:
                blind = True
            base = used if used is not None and 0 <= used < cap else float(cap)
            if used is not None and s.node == CLUSTER:
                base = min(base, _busiest(s.workload, usage, default=base))
            knee = self._knees.get(s, now_ns) if used is not None and gentle_ok else None
            to = cut_to(cap, base, knee, factor=factor, margin=p.knee_margin)
            gentle = gentle or to > base * (1.0 - factor) + 1e-9
            new[s] = min(cap, p.clamp(to))
            if used is not None:
                # A violation at a cap under the remembered knee: the knee moved down.
                remembered = self._knees.get(s, now_ns)
                moved = remembered is not None and cap <= math.floor(
                    remembered * (1.0 - p.knee_margin)
                )
                self._knees.note(s, min(used, float(cap)), now_ns, uncertain=moved)
        self._note_group_knee(name, now_ns, scopes, usage, previous, at_least=False)
        if self._group_knees.uncertain(name):
            g.undone = 0  # the knee moved (or was never seen): a new one to find
        if all(new[s] == previous[s] for s in scopes):
            what = "every workload" if name == CLUSTER else "every best-effort pod"
            if not scopes:
                reasons.append(f"{where}no best-effort pods")
            elif quiet:
                reasons.append(
                    f"{where}nothing to cut: {', '.join(quiet)} send at most min_bandwidth"
                    + ("" if len(quiet) == len(scopes) else ", the rest are at it")
                )
            else:
                reasons.append(f"{where}{what} at min_bandwidth")
            return
        g.last_cut_ns, g.blind, g.cut_severity, g.gentle = now_ns, blind, severity, gentle
        g.stood, g.raised_at_knee = 0, False
        g.drain = _Drain(_load(scopes, usage, new), now_ns)
        if self._just_raised(g, now_ns):
            self._step_undone(g)
        cut.append(name)
        reasons.append(f"{where}cut {factor:.0%}" + (" from the cap" if blind else ""))

    def _escalate(
        self,
        now_ns: int,
        violated: set[str],
        members: Mapping[str, list[Scope]],
        usage: Mapping[Scope, float],
        previous: Mapping[Scope, int],
        new: dict[Scope, int],
        reasons: list[str],
        cut: list[str],
    ) -> bool:
        """Node scope: widen the cut to every node for violated nodes that have had
        nothing left to cut for ``escalate_after`` cooldowns; narrow back when they heal."""
        p = self.params
        self._escalated_by &= violated
        if p.scope != "node":
            return False
        patience = p.escalate_after * _ns(p.decrease_cooldown_s)
        for name in violated - self._escalated_by:
            g, scopes = self._groups[name], members[name]
            stuck = all(new[s] <= p.min_bandwidth or _quiet(usage.get(s), p) for s in scopes)
            if (
                stuck
                and g.violated_since_ns is not None
                and now_ns - g.violated_since_ns >= patience
            ):
                self._escalated_by.add(name)
        if not self._escalated_by:
            return False
        nodes = ", ".join(sorted(self._escalated_by))
        reasons.append(f"escalated: {nodes} cannot be relieved on the node; cutting every node")
        for name in sorted(set(members) - violated):
            g = self._groups[name]
            if g.last_cut_ns is not None and now_ns - g.last_cut_ns < _ns(p.decrease_cooldown_s):
                continue
            changed = False
            for s in members[name]:
                cap, used = previous[s], usage.get(s)
                base = used if used is not None and 0 <= used < cap else float(cap)
                new[s] = min(cap, p.clamp(base * (1.0 - p.decrease_factor)))
                changed = changed or new[s] != cap
            if changed:
                g.last_cut_ns, g.blind, g.deepen = now_ns, False, 0
                cut.append(name)
        return True

    def _cut_factor(self, violations: Sequence[SignalState], *, deepen: int) -> float:
        """decrease_factor, compounded by severity when the multiplier is on, and doubled
        (up to max_blind_factor) per blind cut in a row that had no effect."""
        p = self.params
        f = p.decrease_factor
        if p.severity_max_multiplier > 1.0:
            severity = max((_over(s) for s in violations), default=1.0)
            k = max(1.0, min(severity, p.severity_max_multiplier))
            f = 1.0 - (1.0 - f) ** k
        if deepen:
            f = max(f, min(p.max_blind_factor, 1.0 - (1.0 - f) ** (2**deepen)))
        return f

    # --- climbing ----------------------------------------------------------------------
    def _climb_group(
        self,
        name: str,
        now_ns: int,
        scopes: list[Scope],
        usage: Mapping[Scope, float],
        warnings: Mapping[str | None, _Warning],
        previous: Mapping[Scope, int],
        new: dict[Scope, int],
        reasons: list[str],
        raised: list[str],
        cut: list[str],
    ) -> None:
        p, g = self.params, self._groups[name]
        where = self._where(name)
        warn = self._warning_of(name, warnings)
        if self._escalated_by:
            g.stable_since_ns = None
            return
        if warn:
            g.stable_since_ns = None
            self._trim(name, now_ns, scopes, usage, previous, new, reasons, cut, warn)
            return
        if not scopes:
            return
        if g.stable_since_ns is None:
            g.stable_since_ns = now_ns
        dwelt = (now_ns - g.stable_since_ns) / 1e9
        knees = {s: self._knees.get(s, now_ns) for s in scopes}
        for s, knee in knees.items():
            if knee is not None and previous[s] >= knee * (1 + 2 * p.knee_margin):
                # Climbed well past it without a warning: the knee moved up (less critical
                # traffic, a faster link), but not far: the caps are still near it. Follow
                # it in small steps; a knee far above comes back to the normal pace when
                # the memory fades (knee_memory), since no warning refreshes it.
                self._knees.move_up(s, float(previous[s]))
                knees[s] = self._knees.get(s, now_ns)
                g.undone = 0  # a knee found anew: its first step past it comes soon
        load = _committed(scopes, usage, previous, self._burst_peaks)
        group_knee = self._group_knees.get(name, now_ns)
        if group_knee is not None and load >= group_knee * (1 + 2 * p.knee_margin):
            self._group_knees.move_up(name, load)  # as for one scope's knee, above
            group_knee = self._group_knees.get(name, now_ns)
            g.undone = 0
        if group_knee is None and all(k is None for k in knees.values()):
            g.undone = 0  # no knee remembered: none to back off from
        ceiling = None if group_knee is None else group_knee * (1 - p.knee_margin)
        if ceiling is not None:
            # The group's knee is the link's: under it every workload may climb, however
            # low its own knee (noted when the others took more of the link).
            below = load < math.floor(ceiling)
            knees = dict.fromkeys(knees)
        else:
            below = all(
                k is not None and previous[s] < math.floor(k * (1 - p.knee_margin))
                for s, k in knees.items()
            )
        # Under the knee, or near one that is only an upper bound (seen while the senders
        # ramped into a full queue: the link's real knee is often above it), a cooldown's
        # dwell; at a knee a warning marked, each fine step waits increase_interval, since
        # each one that passes it costs a standing queue.
        if group_knee is not None:
            bound = self._group_knees.uncertain(name)
        else:
            bound = any(k is not None and self._knees.uncertain(s) for s, k in knees.items())
        if below or bound:
            dwell = p.decrease_cooldown_s
        else:
            doublings = min(g.undone, MAX_DWELL_DOUBLINGS) - min(g.stood, MAX_DWELL_HALVINGS)
            dwell = max(p.decrease_cooldown_s, p.increase_interval_s * 2.0**doublings)
        if dwelt < dwell:
            reasons.append(f"{where}all apps stable for {dwelt:.2f} s of {dwell:.2f} s dwell")
            return
        idle: list[str] = []
        base = dict(previous)  # what the step climbs from (and an undo returns to)
        for s in scopes:
            cap, used = previous[s], usage.get(s)
            if used is not None and used < USING_CAP_FRACTION * cap:
                idle.append(str(s))
                continue
            step = climb_to(
                cap,
                knees[s],
                step=p.increase_step,
                margin=p.knee_margin,
                fine=p.knee_step_fraction,
                uncertain=self._knees.uncertain(s),
            )
            new[s] = max(cap, p.clamp(step))
        if ceiling is not None and group_knee is not None:
            # The link is shared: together the caps climb to the margin under the group's
            # knee, then by one fine step of it, however many workloads share it.
            fine = max(1.0, min(float(p.increase_step), p.knee_step_fraction * group_knee))
            climbing = [s for s in scopes if str(s) not in idle]
            reclaimed: dict[Scope, int] = {}
            if load >= math.floor(ceiling) and climbing:
                reclaimed = self._unused_caps(scopes, usage, previous, idle, group_knee)
                if reclaimed:
                    new.update(reclaimed)
                    load = _committed(scopes, usage, new, self._burst_peaks)
                # The step climbs from even caps; undone, it leaves them even.
                evened = _even_out(base, climbing) if self._one_link(name, climbing) else {}
                if evened:
                    for s in climbing:  # each one's climb, from its even cap
                        new[s] = p.clamp(new[s] + base[s] - previous[s])
                    moved = ", ".join(f"{s} {a} -> {b}" for s, (a, b) in evened.items())
                    reasons.append(f"{where}at the knee, the caps in use even out: {moved}")
            budget = ceiling - load if load < math.floor(ceiling) else fine
            if self._group_knees.uncertain(name):
                # Only an upper bound: steps of a twentieth of the load, so that the climb
                # takes the same few steps on any link.
                # Near the bound, fine steps: the real knee may be anywhere there.
                coarse = (1.0 - UNCERTAIN_BAND) * group_knee - load
                budget = min(budget, max(fine, min(UNCERTAIN_STEP_FRACTION * load, coarse)))
            for s in climbing:
                # Under the group's knee the room is the budget, not increase_step: the
                # climb to it takes the same few steps on a 100 and a 400 Mbit/s link.
                new[s] = max(new[s], p.clamp(base[s] + budget))
            _share_climb(new, base, climbing, budget)
            if reclaimed and not any(new[s] > previous[s] for s in climbing):
                new.update({s: previous[s] for s in reclaimed})  # nobody to give it to
            elif reclaimed:
                moved = ", ".join(f"{s} {previous[s]} -> {v}" for s, v in reclaimed.items())
                reasons.append(f"{where}at the knee, unused cap goes to the others: {moved}")
        if all(new[s] == previous[s] for s in scopes):
            why = "every workload at max_bandwidth"
            if idle:
                why = f"stable, but not raising unused caps: {', '.join(idle)}"
            reasons.append(f"{where}{why}")
            return
        # A fine step at the knee that stood a whole dwell (the next one is due and it was
        # not undone) shortens the next dwell.
        at_knee = not (below or bound)
        stood = at_knee and g.raised_at_knee and g.last_raise_ns is not None
        g.stood, g.raised_at_knee = (g.stood + 1 if stood else 0), at_knee
        g.stable_since_ns = g.last_raise_ns = now_ns  # the next step dwells anew
        g.before_raise = {s: base[s] for s in scopes}
        g.gentle = False  # a healthy climb: the next overshoot may be a small one again
        raised.append(name)
        steps = {new[s] - previous[s] for s in scopes if new[s] != previous[s]}
        how = f"+{steps.pop()} Mbit/s" if len(steps) == 1 else "towards the knee"
        reasons.append(f"{where}all apps stable for {dwelt:.2f} s: {how}")
        if idle:
            reasons.append(f"{where}not raising unused caps: {', '.join(idle)}")

    def _unused_caps(
        self,
        scopes: list[Scope],
        usage: Mapping[Scope, float],
        previous: Mapping[Scope, int],
        idle: list[str],
        group_knee: float,
    ) -> dict[Scope, int]:
        """At the group's knee, the lower caps of the workloads not using theirs: down to
        their peak over BURST_MEMORY_S plus the margin, never under a fair share of the
        knee. A cap above that only lets a burst coincide with the others' traffic, while
        the others lose what it leaves unused; the fair share keeps a workload that fell
        silent from being starved when it sends again."""
        p = self.params
        fair = math.floor(group_knee / max(1, len(scopes)))
        out: dict[Scope, int] = {}
        for s in scopes:
            if str(s) not in idle or s not in usage:
                continue
            peak = max(usage[s], self._burst_peaks.get(s, usage[s]))
            floor_mbit = p.clamp(max(math.ceil(peak * (1 + p.knee_margin)), fair))
            if floor_mbit < previous[s]:
                out[s] = floor_mbit
        return out

    def _note_group_knee(
        self,
        name: str,
        now_ns: int,
        scopes: list[Scope],
        usage: Mapping[Scope, float],
        previous: Mapping[Scope, int],
        *,
        at_least: bool,
    ) -> None:
        """Congestion appeared at the group's present load (when every scope's usage is
        known); ``at_least`` (an early warning): never lower than the knee remembered."""
        if not scopes or any(s not in usage for s in scopes):
            return
        load = _load(scopes, usage, previous)
        remembered = self._group_knees.get(name, now_ns)
        if at_least:
            # A queue that stands at this load is a knee we saw: certain, and never lower
            # than a certain one remembered (below it, a warning may be a burst).
            if remembered is not None and not self._group_knees.uncertain(name):
                load = max(load, remembered)
            self._group_knees.note(name, load, now_ns)
            return
        # A violation with caps far above what was used (no cap had bitten yet) comes with
        # the load of senders ramping into a full queue and its drops: more than the link
        # carried. An upper bound only: the climb back goes in UNCERTAIN_STEP_FRACTION steps.
        unbounded = any(
            usage[s] < USING_CAP_FRACTION * previous[s] for s in scopes if previous[s] > 0
        )
        # A violation under the knee remembered: the knee moved down (the link slowed),
        # and this load is an upper bound on where it went.
        moved = remembered is not None and load <= math.floor(
            remembered * (1.0 - self.params.knee_margin)
        )
        self._group_knees.note(name, load, now_ns, uncertain=unbounded or moved)

    @property
    def reads_drain(self) -> bool:
        """Whether the next step reads the queue a cut drains: only then does it need
        ``Observation.trace``."""
        return any(g.drain is not None for g in self._groups.values())

    def _read_drains(self, now_ns: int, obs: Observation, reasons: list[str]) -> None:
        """The step after a cut: where the queue it drains says the link's knee is
        (``drain_knee`` on each of the group's targets' probes since the cut reached the
        enforcer; the lowest reading), noted for the group, still as a bound, when no
        knee is known or only a bound (then the lower of the two). The senders' ramp into
        a full queue bounds the knee only to within some 20 % (usage counts what the
        queue dropped); the drain reads it closer, so the climb's coarse steps (up to
        UNCERTAIN_BAND under the bound) stop nearer the knee."""
        for name, g in self._groups.items():
            drain, g.drain = g.drain, None
            if drain is None or obs.actuation_ns is None:
                continue
            since = drain.at_ns + obs.actuation_ns
            readings = [
                knee
                for target, trace in (obs.trace or {}).items()
                if self._concerns(name, obs.endpoints.get(target, Endpoint(target)).node)
                and (knee := drain_knee(drain.load, trace, since_ns=since)) is not None
            ]
            remembered = self._group_knees.get(name, now_ns)
            if not readings or (remembered is not None and not self._group_knees.uncertain(name)):
                continue
            # Still an estimate: senders that lost packets to the full queue may send
            # less than their new caps (the drain then looks faster, the knee higher: 102
            # for a link of 98 in the lab). It narrows the bound; a warning marks the knee.
            knee = min(readings) if remembered is None else min(*readings, remembered)
            self._group_knees.note(name, knee, now_ns, uncertain=True)
            g.undone = 0
            reasons.append(
                f"{self._where(name)}the queue the cut drains shows the link's knee at "
                f"{knee:.0f} Mbit/s"
            )

    def _concerns(self, name: str, node: str | None) -> bool:
        """Whether a target on ``node`` (None: unplaced) says something of group ``name``."""
        return node in (name, None) or name == CLUSTER

    def _warning_of(self, name: str, warnings: Mapping[str | None, _Warning]) -> _Warning | None:
        """The early warning that concerns group ``name``, if any (a standing one first)."""
        mine = [w for node, w in warnings.items() if self._concerns(name, node)]
        return max(mine, key=lambda w: w.standing, default=None)

    def _trim(
        self,
        name: str,
        now_ns: int,
        scopes: list[Scope],
        usage: Mapping[Scope, float],
        previous: Mapping[Scope, int],
        new: dict[Scope, int],
        reasons: list[str],
        cut: list[str],
        warning: _Warning,
    ) -> None:
        """An early warning: the caps in use step back under the knee (at most once per
        cooldown) when the queue stands above the warning level, and the knee is
        remembered where it began to build now; a queue that is only rising holds them."""
        p, g = self.params, self._groups[name]
        where = self._where(name)
        why = warning.reason
        # A queue rising right after a step up is that step passing the knee: undone at
        # once, before it stands (a quarter of a second later it stood at 1-1.5 ms in the
        # lab). Later, a rise is as likely a burst, which falls by itself: hold.
        overshot = self._just_raised(g, now_ns)
        if not warning.standing and not overshot:
            reasons.append(f"{where}holding: {why}")
            return
        steps = [t for t in (g.last_cut_ns, g.last_trim_ns) if t is not None]
        cooling = bool(steps) and now_ns - max(steps) < _ns(p.decrease_cooldown_s)
        trimmed = False
        for s in scopes:
            cap, used = previous[s], usage.get(s)
            if used is not None and used < USING_CAP_FRACTION * cap:
                continue  # not using its cap: not what builds the queue
            if cooling:
                continue
            # The queue begins to build here, now. Above the remembered knee, the knee is
            # higher than remembered (the trim then only undoes the last small step); below
            # it, a warning is no proof (a burst): the memory stands, and a knee that truly
            # moved down shows as a violation at a cap under it (cut_to).
            point = min(float(cap), used if used is not None else float(cap))
            knee = max(point, self._knees.get(s, now_ns) or 0.0)
            self._knees.note(s, knee, now_ns)
            # Rounded up: a whole-Mbit/s floor under a 2 % margin would trim a 45 Mbit/s cap
            # by two steps; a trim is still at least one.
            to = math.ceil(trim_to(cap, used, knee, margin=p.knee_margin))
            new[s] = min(cap, p.clamp(min(cap - 1, to)))
            if overshot and s in g.before_raise:
                # The step that passed the knee is undone, all of it and no more: the
                # caps before it held for a whole dwell. A deeper trim would ratchet them
                # down; a shallower one (by a knee remembered far above, an upper bound)
                # leaves most of a coarse step standing on the queue.
                new[s] = min(cap, g.before_raise[s])
            trimmed = trimmed or new[s] != cap
        if not cooling:
            self._note_group_knee(name, now_ns, scopes, usage, previous, at_least=True)
        if trimmed:
            g.last_trim_ns = now_ns
            g.stood, g.raised_at_knee = 0, False
            cut.append(name)
            reasons.append(f"{where}trimming under the knee: {why}")
            if overshot:
                self._step_undone(g)
        else:
            reasons.append(f"{where}holding: {why}")

    def _warnings(self, now_ns: int, obs: Observation) -> dict[str | None, _Warning]:
        """Early warnings by node (None: a target without a node), first reason each
        (a standing queue before one that is only rising)."""
        recent = obs.recent if obs.recent is not None else obs.stats
        delays: dict[str, float | None] = {}
        basis: dict[str, float] = {}
        for app, targets in targets_of(self.slos, obs.endpoints).items():
            for target in targets:
                window = recent.get(target)
                delays[target] = None if window is None else signal_value(window, "queue_delay")
                level = self._basis[app]
                if level is not None:
                    basis[target] = level
        out: dict[str | None, _Warning] = {}
        warned = self._watch.update(now_ns, delays, basis)
        standing = self._watch.standing
        for target, why in sorted(warned.items(), key=lambda kv: (kv[0] not in standing, kv[0])):
            node = obs.endpoints.get(target, Endpoint(target)).node
            out.setdefault(node, _Warning(f"{target} {why}", target in standing))
        return out

    # --- helpers -------------------------------------------------------------------------
    def _just_raised(self, g: _Group, now_ns: int) -> bool:
        """Whether the group's last increase is what the probes see now: within twice
        effect_delay of it (the step reaches the wire, then the queue it builds shows;
        a step past the knee by 1 % grows the queue by 10 ms a second). Later, a rise
        is as likely a burst."""
        horizon = 2 * _ns(self.params.effect_delay_s)
        return g.last_raise_ns is not None and now_ns - g.last_raise_ns < horizon

    def _step_undone(self, g: _Group) -> None:
        """The last increase passed the knee and was undone: the next waits longer."""
        g.undone += 1
        g.last_raise_ns = None

    def _one_link(self, name: str, scopes: list[Scope]) -> bool:
        """Whether the caps of ``scopes`` in group ``name`` all bind on one link: a node's
        group, or every workload on the same one node (no placements at all: the tc
        enforcer's one machine). A cluster-wide cap binds each pod on its own node."""
        if name != CLUSTER:
            return True
        placed = [self._placements.get(s.workload, frozenset()) for s in scopes]
        return not any(placed) or (all(len(n) == 1 for n in placed) and len(set(placed)) == 1)

    def _group_of(self, node: str | None) -> str:
        return CLUSTER if node is None or self.params.scope == "cluster" else node

    def _affected(
        self, nodes: Iterable[str | None], members: Mapping[str, list[Scope]]
    ) -> set[str]:
        """The groups trouble on ``nodes`` concerns: a node's own, or all for None."""
        out: set[str] = set()
        for node in nodes:
            out |= set(members) if node is None else {self._group_of(node)}
        return out

    def _where(self, name: str) -> str:
        return "" if name == CLUSTER else f"{name}: "

    def _hold_reasons(self, ev: Evaluation, reasons: list[str]) -> None:
        """Why groups hold: targets without data, signals above the stable fraction."""
        reasons += [f"{t} no data" for t in ev.no_data]
        frac = self.params.stable_fraction
        reasons += [
            f"{s.describe()} (above {frac:.0%} of the SLO)"
            for s in ev.signals
            if not s.stable and not s.violated and s.value is not None
        ]


class _Warning(NamedTuple):
    """An early warning that concerns a group: why, and whether its queue stands above
    the warning level (else it is only rising)."""

    reason: str
    standing: bool


def _busiest(workload: str, usage: Mapping[Scope, float], *, default: float) -> float:
    """A cluster-wide limit's cut base: the usage of the workload's busiest node. The
    limit is written to each of its pods, so 20 % under their sum does not bite where
    it sends most (the uploader's 128 Mbit/s, 97 of them from node-a's pod, cut to 102
    per pod in the cluster lab, and the first cut did nothing there)."""
    nodes = [v for k, v in usage.items() if k.workload == workload and k.node != CLUSTER]
    return max(nodes, default=default)


def _quiet(used: float | None, params: PolicyParams) -> bool:
    """A workload known to send no more than ``min_bandwidth``: no cut can slow it."""
    return used is not None and used <= params.min_bandwidth


def _load(
    scopes: Iterable[Scope], usage: Mapping[Scope, float], caps: Mapping[Scope, int]
) -> float:
    """What a group puts on its link: each scope's usage, or its cap where the usage is
    unknown or above it."""
    total = 0.0
    for s in scopes:
        used = usage.get(s)
        total += caps[s] if used is None else min(used, float(caps[s]))
    return total


def _committed(
    scopes: Iterable[Scope],
    usage: Mapping[Scope, float],
    caps: Mapping[Scope, int],
    peaks: Mapping[Scope, float],
) -> float:
    """What a group may put on its link at once: each scope's cap, for a scope that uses
    less than half of it twice its usage or its peak over BURST_MEMORY_S if higher. A
    bursty workload between bursts still counts with the rate of its last burst, so that
    the others do not climb into the room its next burst needs."""
    total = 0.0
    for s in scopes:
        used = usage.get(s)
        if used is None:
            total += caps[s]
        else:
            total += min(float(caps[s]), max(2.0 * used, peaks.get(s, used)))
    return total


def _share_climb(
    new: dict[Scope, int], previous: Mapping[Scope, int], climbing: list[Scope], budget: float
) -> None:
    """Scale the climbs of ``climbing`` so that together they add at most ``budget``
    Mbit/s (at least 1 when they climb at all), in proportion to their own."""
    wanted = {s: new[s] - previous[s] for s in climbing if new[s] > previous[s]}
    total = sum(wanted.values())
    if total <= budget or not wanted:
        return
    allowed = max(1, math.floor(budget))
    given = {s: math.floor(d * allowed / total) for s, d in wanted.items()}
    # What rounding left goes to the largest climbs first, and between equal ones to the
    # lower cap (a fine step on even caps keeps them even, whatever the names).
    for s in sorted(wanted, key=lambda s: (-wanted[s], previous[s], str(s))):
        if sum(given.values()) >= allowed:
            break
        given[s] += 1
    for s, d in given.items():
        new[s] = previous[s] + d


def _even_out(caps: dict[Scope, int], scopes: list[Scope]) -> dict[Scope, tuple[int, int]]:
    """Share the caps of ``scopes`` evenly in place, their sum kept (whole Mbit/s, the odd
    ones to the larger caps); return what moved, as (before, after). At the link's knee
    the workloads that fill their caps share it max-min fairly, not as the first cut left
    them: a cut from a bursty upload's peak left it more than its share, idle between
    uploads, while the steady dashboard beside it was held under its own."""
    if not scopes:
        return {}
    base, extra = divmod(sum(caps[s] for s in scopes), len(scopes))
    moved: dict[Scope, tuple[int, int]] = {}
    for i, s in enumerate(sorted(scopes, key=lambda s: (-caps[s], str(s)))):
        share = base + (1 if i < extra else 0)
        if share != caps[s]:
            moved[s] = (caps[s], share)
            caps[s] = share
    return moved


def _over(state: SignalState) -> float:
    """How many times over its threshold a violated signal is."""
    if state.value is None or state.threshold <= 0:
        return 1.0
    return state.value / state.threshold


def _tightest_ms(slo: Slo) -> float | None:
    """The threshold early warnings are a fraction of: the queue-delay SLO, else the
    tightest time threshold the app has."""
    t = slo.thresholds()
    if "queue_delay" in t:
        return t["queue_delay"]
    times = [v for k, v in t.items() if k != "loss"]
    return min(times) if times else None


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


__all__ = [
    "CLUSTER",
    "AsymmetricAimd",
    "Decision",
    "Endpoint",
    "Observation",
    "PolicyParams",
    "Scope",
    "SignalState",
    "Slo",
]
