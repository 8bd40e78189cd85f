"""The lab's figures, computed from recorded samples: sans-I/O, so tests feed it synthetic runs.

Input per run: every critical probe (app, time since the run started, RTT or lost), the
best-effort goodput per second, and the controller's decisions. Output: the report the
issue specifies (``build_report``), a text table (``format_table``) and per-second series
for the live view and the plot (``series``).

Definitions (docs/lab.md):

- a *window* is one second; an app is *within SLO* in a window when it has probes there and
  each configured threshold of its ``Slo`` (``engine/slo.py``, the controller's type)
  holds: IQR jitter, p99 RTT (``max_latency_ms``), queueing delay (p90 RTT minus the base
  RTT, the app's minimum RTT in the quiet phase), loss ratio;
- *time to protect*: seconds from congestion start to the start of the first one-second
  window (sliding in 0.1 s steps) in which every app is within SLO; None if none is;
- *SLO attainment*: share of whole one-second windows from congestion start + time to
  protect until congestion end in which every app is within SLO (from congestion start
  when time to protect is None);
- *best-effort utilisation*: mean best-effort goodput over the same span, divided by the
  spare capacity (bottleneck minus the critical load).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detnet.engine.slo import Slo

PHASES = ("quiet", "congestion", "recovery")
_SLIDE_S = 0.1
_FIGURES = ("rtt_p50_ms", "rtt_p99_ms", "jitter_iqr_ms", "queue_delay_ms", "loss_ratio")


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """Phase durations in seconds; a run starts at 0 with the quiet phase."""

    quiet_s: float
    congestion_s: float
    recovery_s: float

    def bounds(self, phase: str) -> tuple[float, float]:
        """[start, end) of ``phase`` in seconds since the run started."""
        q, c = self.quiet_s, self.quiet_s + self.congestion_s
        return {"quiet": (0.0, q), "congestion": (q, c), "recovery": (c, c + self.recovery_s)}[
            phase
        ]

    @property
    def total_s(self) -> float:
        """Length of one run."""
        return self.quiet_s + self.congestion_s + self.recovery_s


@dataclass(frozen=True, kw_only=True)
class RunData:
    """What one run recorded. Times are seconds since the run started.

    ``probes`` maps an app to (t, rtt_ms) pairs, rtt NaN when the probe was lost;
    ``goodput`` holds (t_end, Mbit/s) per one-second sink report, best-effort apps summed;
    ``limits`` holds (t, total Mbit/s of the best-effort caps) after each decision."""

    probes: Mapping[str, Sequence[tuple[float, float]]]
    goodput: Sequence[tuple[float, float]] = ()
    decisions: Sequence[Mapping[str, Any]] = ()
    limits: Sequence[tuple[float, float]] = ()
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def samples(self, app: str) -> np.ndarray:
        """(n, 2) array of (t, rtt_ms) for ``app``, sorted by time."""
        if app not in self.arrays:
            a = np.asarray(self.probes.get(app, ()), dtype=float).reshape(-1, 2)
            self.arrays[app] = a[np.argsort(a[:, 0], kind="stable")]
        return self.arrays[app]


@dataclass(frozen=True, kw_only=True)
class AppStats:
    """Figures for one app over some span; None where there is no data."""

    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    jitter_iqr_ms: float | None
    queue_delay_ms: float | None
    loss_ratio: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The JSON form."""
        return {k: getattr(self, k) for k in _FIGURES}


def app_stats(rtt_ms: np.ndarray, *, base_ms: float | None) -> AppStats:
    """Figures over ``rtt_ms`` (NaN = lost probe); queueing delay is p90 minus ``base_ms``."""
    if rtt_ms.size == 0:
        return AppStats(
            rtt_p50_ms=None,
            rtt_p99_ms=None,
            jitter_iqr_ms=None,
            queue_delay_ms=None,
            loss_ratio=None,
        )
    got = rtt_ms[~np.isnan(rtt_ms)]
    loss = 1.0 - got.size / rtt_ms.size
    if got.size == 0:
        return AppStats(
            rtt_p50_ms=None,
            rtt_p99_ms=None,
            jitter_iqr_ms=None,
            queue_delay_ms=None,
            loss_ratio=loss,
        )
    q25, p50, q75, p90, p99 = np.percentile(got, [25, 50, 75, 90, 99])
    return AppStats(
        rtt_p50_ms=float(p50),
        rtt_p99_ms=float(p99),
        jitter_iqr_ms=float(q75 - q25),
        queue_delay_ms=None if base_ms is None else max(0.0, float(p90) - base_ms),
        loss_ratio=loss,
    )


def within_slo(stats: AppStats, slo: Slo) -> bool:
    """True when every configured SLO holds; a span without replies never qualifies."""
    return not breaches(stats, slo)


def breaches(stats: AppStats, slo: Slo) -> list[str]:
    """The thresholds of ``slo`` that ``stats`` break, as ``"latency 6.10 > 5.00"`` (ms;
    loss as a ratio); ``"no replies"`` for a span without one."""
    if stats.rtt_p50_ms is None:
        return ["no replies"]
    values = {
        "jitter": stats.jitter_iqr_ms,
        "latency": stats.rtt_p99_ms,
        "queue_delay": stats.queue_delay_ms,
        "loss": stats.loss_ratio,
    }
    out = []
    for signal, threshold in slo.thresholds().items():
        value = values.get(signal)
        if value is None or not value <= threshold:
            shown = "-" if value is None else f"{value:.2f}"
            out.append(f"{signal} {shown} > {threshold:.2f}")
    return out


def _span(samples: np.ndarray, start: float, end: float) -> np.ndarray:
    lo, hi = np.searchsorted(samples[:, 0], [start, end], side="left")
    return samples[lo:hi, 1]


def base_rtts(run: RunData, slos: Sequence[Slo], timeline: Timeline) -> dict[str, float | None]:
    """Each app's base RTT: its minimum in the quiet phase (else over the whole run)."""
    out: dict[str, float | None] = {}
    for slo in slos:
        s = run.samples(slo.app)
        quiet = _span(s, *timeline.bounds("quiet"))
        for candidate in (quiet, s[:, 1]):
            got = candidate[~np.isnan(candidate)]
            if got.size:
                out[slo.app] = float(got.min())
                break
        else:
            out[slo.app] = None
    return out


def _all_within(
    run: RunData, slos: Sequence[Slo], base: Mapping[str, float | None], start: float, end: float
) -> bool:
    return all(
        within_slo(app_stats(_span(run.samples(s.app), start, end), base_ms=base[s.app]), s)
        for s in slos
    )


def _mean_goodput(run: RunData, start: float, end: float) -> float | None:
    # a sink report at t_end covers [t_end - 1, t_end): count only reports wholly inside
    # the span, so a phase never borrows a neighbour's traffic
    vals = [mbps for t_end, mbps in run.goodput if t_end - 1.0 >= start and t_end <= end]
    return float(np.mean(vals)) if vals else None


def mean_goodput(run: RunData, start: float, end: float) -> float | None:
    """Mean best-effort goodput (Mbit/s) of the one-second reports wholly inside
    [start, end); None when there is none (the cluster lab's per-node figures)."""
    return _mean_goodput(run, start, end)


def summarise_run(
    run: RunData,
    *,
    slos: Sequence[Slo],
    timeline: Timeline,
    bottleneck_mbps: float,
    critical_mbps: float = 0.0,
    bottleneck_from_s: float | None = None,
    bottleneck_after_mbps: float | None = None,
    step_at_s: float | None = None,
) -> dict[str, Any]:
    """One RUN of the report: time to protect, SLO attainment, utilisation, phases.

    A knee step (the bottleneck drops to ``bottleneck_after_mbps`` at
    ``bottleneck_from_s``) is counted in the spare capacity second by second. With
    ``step_at_s`` (a load or knee step during congestion) the run also has ``step``: how
    the step was weathered (``step_summary``)."""
    base = base_rtts(run, slos, timeline)
    c_start, c_end = timeline.bounds("congestion")
    ttp: float | None = None
    for k in range(max(0, math.floor((c_end - c_start - 1.0) / _SLIDE_S + 1e-9) + 1)):
        if _all_within(run, slos, base, c_start + k * _SLIDE_S, c_start + k * _SLIDE_S + 1.0):
            ttp = round(k * _SLIDE_S, 3)
            break
    from_s = c_start + (ttp or 0.0)
    missed = missed_windows(run, slos, base, from_s, c_end)

    def utilisation(start: float) -> float | None:
        """Best effort's mean goodput from ``start`` to the end of congestion over the
        mean spare capacity then."""
        spare = mean_spare(
            start,
            c_end,
            before=bottleneck_mbps - critical_mbps,
            step_s=bottleneck_from_s,
            after=None if bottleneck_after_mbps is None else bottleneck_after_mbps - critical_mbps,
        )
        be = _mean_goodput(run, start, c_end)
        return None if be is None or spare <= 0 else be / spare

    phases: dict[str, Any] = {}
    for phase in PHASES:
        start, end = timeline.bounds(phase)
        phases[phase] = {
            "apps": {
                s.app: app_stats(
                    _span(run.samples(s.app), start, end), base_ms=base[s.app]
                ).as_dict()
                for s in slos
            },
            "best_effort_mbps": _mean_goodput(run, start, end),
        }
    return {
        "time_to_protect_s": ttp,
        "slo_attainment": _share_within(from_s, c_end, missed),
        # What the attainment lost: when, and which thresholds broke.
        "missed_windows": missed,
        "best_effort_utilisation": utilisation(from_s),
        # The second half of the congestion: the cut and the climb back are over.
        "settled_utilisation": utilisation(c_start + (c_end - c_start) / 2),
        **_after_increases(run, slos, base, c_start, c_end),
        **(
            {}
            if step_at_s is None
            else {"step": step_summary(run, slos, base, step_at_s, c_start, c_end)}
        ),
        "phases": phases,
        "decisions": [dict(d) for d in run.decisions],
    }


def _attainment(
    run: RunData, slos: Sequence[Slo], base: Mapping[str, float | None], start: float, end: float
) -> float | None:
    """The share of whole one-second windows from ``start`` to ``end`` within SLO."""
    return _share_within(start, end, missed_windows(run, slos, base, start, end))


def _share_within(start: float, end: float, missed: Sequence[object]) -> float | None:
    """The share of the whole one-second windows from ``start`` to ``end`` not ``missed``."""
    n = math.floor(end - start + 1e-9)
    return (n - len(missed)) / n if n > 0 else None


def missed_windows(
    run: RunData, slos: Sequence[Slo], base: Mapping[str, float | None], start: float, end: float
) -> list[dict[str, Any]]:
    """The whole one-second windows from ``start`` to ``end`` outside the SLO: each as
    ``{"t_s": its start, "breaches": {app: [what broke]}}`` (time since the run started)."""
    out: list[dict[str, Any]] = []
    for i in range(math.floor(end - start + 1e-9)):
        w = start + i
        broke = {}
        for s in slos:
            why = breaches(app_stats(_span(run.samples(s.app), w, w + 1.0), base_ms=base[s.app]), s)
            if why:
                broke[s.app] = why
        if broke:
            out.append({"t_s": round(w, 3), "breaches": broke})
    return out


def mean_spare(
    start: float, end: float, *, before: float, step_s: float | None, after: float | None
) -> float:
    """The mean spare capacity over [start, end), with an optional step to ``after``."""
    if step_s is None or after is None or step_s >= end:
        return before
    if step_s <= start:
        return after
    return (before * (step_s - start) + after * (end - step_s)) / (end - start)


AFTER_INCREASE_S = 2.0


def step_summary(
    run: RunData,
    slos: Sequence[Slo],
    base: Mapping[str, float | None],
    at_s: float,
    c_start: float,
    c_end: float,
) -> dict[str, Any]:
    """How a step at ``at_s`` was weathered, over the one-second windows from it to the
    end of congestion: ``broke`` (some window left the SLO), ``recovery_s`` (from the step
    to the start of the first window within SLO after the last one that was not: 0.0 when
    none broke, None when it never came back), ``slo_attainment`` (the share of whole
    windows within SLO) and the best-effort goodput in the 5 s before and after it."""
    starts = np.arange(at_s, c_end - 1.0 + 1e-9, _SLIDE_S)
    within = [_all_within(run, slos, base, w, w + 1.0) for w in starts]
    bad = [i for i, ok in enumerate(within) if not ok]
    if not bad:
        recovery: float | None = 0.0
    elif bad[-1] + 1 < len(within):
        recovery = round(float(starts[bad[-1] + 1] - at_s), 3)
    else:
        recovery = None
    return {
        "at_s": round(at_s, 3),
        "broke": bool(bad),
        "recovery_s": recovery,
        "slo_attainment": _attainment(run, slos, base, at_s, c_end),
        "best_effort_mbps_before": _mean_goodput(run, max(c_start, at_s - 5.0), at_s),
        "best_effort_mbps_after": _mean_goodput(run, at_s, c_end),
    }


def _after_increases(
    run: RunData,
    slos: Sequence[Slo],
    base: Mapping[str, float | None],
    c_start: float,
    c_end: float,
) -> dict[str, int]:
    """How many increases during congestion were followed, within AFTER_INCREASE_S, by a
    one-second window in which some app left its SLO: each is a climb past the knee."""
    increases = violations = 0
    for d in run.decisions:
        t = d.get("t_s")
        if d.get("action") != "increase" or not isinstance(t, int | float):
            continue
        if not c_start <= t < c_end:
            continue
        increases += 1
        starts = np.arange(t, min(t + AFTER_INCREASE_S, c_end - 1.0) + 1e-9, _SLIDE_S)
        if any(not _all_within(run, slos, base, w, w + 1.0) for w in starts):
            violations += 1
    return {"increases": increases, "violations_after_increase": violations}


def build_report(
    config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``--json`` document: ``{"config": ..., "runs": {RUN NAME: RUN}}``."""
    return {"config": dict(config), "runs": {name: dict(run) for name, run in runs.items()}}


# ---------------------------------------------------------------------------- views


def series(run: RunData, app: str, *, step_s: float = 1.0) -> dict[str, np.ndarray]:
    """Per-window series of ``app``: window end t, p50 and IQR (ms), for plots and live view."""
    s = run.samples(app)
    if not s.size:
        empty = np.empty(0)
        return {"t": empty, "p50": empty, "iqr": empty}
    ends = np.arange(step_s, s[-1, 0] + step_s, step_s)
    p50, iqr = [], []
    for end in ends:
        stats = app_stats(_span(s, end - step_s, end), base_ms=None)
        p50.append(np.nan if stats.rtt_p50_ms is None else stats.rtt_p50_ms)
        iqr.append(np.nan if stats.jitter_iqr_ms is None else stats.jitter_iqr_ms)
    return {"t": ends, "p50": np.asarray(p50), "iqr": np.asarray(iqr)}


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Mapping[str, Any]) -> str:
    """The end-of-run report as aligned text."""
    lines: list[str] = []
    header = (
        f"{'run':<19}{'phase':<11}{'app':<17}{'p50 ms':>8}{'p99 ms':>8}{'IQR ms':>8}"
        f"{'queue ms':>9}{'loss':>7}{'BE Mbit/s':>10}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for run_name, run in report["runs"].items():
        for phase in PHASES:
            p = run["phases"][phase]
            first = True
            for app, st in p["apps"].items():
                loss = _fmt(None if st["loss_ratio"] is None else 100 * st["loss_ratio"], ".1f")
                be = _fmt(p["best_effort_mbps"], ".1f") if first else ""
                lines.append(
                    f"{run_name if first and phase == 'quiet' else '':<19}"
                    f"{phase if first else '':<11}{app:<17}"
                    f"{_fmt(st['rtt_p50_ms']):>8}{_fmt(st['rtt_p99_ms']):>8}"
                    f"{_fmt(st['jitter_iqr_ms']):>8}{_fmt(st['queue_delay_ms']):>9}"
                    f"{loss + '%':>7}"
                    f"{be:>10}"
                )
                first = False
        ttp, att, util = (
            run["time_to_protect_s"],
            run["slo_attainment"],
            run["best_effort_utilisation"],
        )
        lines.append(
            f"{'':<19}time to protect {_fmt(ttp, '.1f')} s, SLO attainment "
            f"{_fmt(None if att is None else 100 * att, '.1f')}%, best-effort utilisation "
            f"{_fmt(None if util is None else 100 * util, '.1f')}% "
            f"(settled: {_pct(run.get('settled_utilisation'))}), "
            f"{len(run['decisions'])} decisions, "
            f"{run.get('violations_after_increase', 0)} of {run.get('increases', 0)} "
            "increases followed by a violation"
        )
        missed = run.get("missed_windows") or []
        if missed and ttp is not None:  # unprotected, every window is outside
            lines.append(f"{'':<19}{missed_line(missed)}")
        step = run.get("step")
        if step:
            lines.append(f"{'':<19}{step_line(report, step)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


MISSED_SHOWN = 3


def missed_line(missed: Sequence[Mapping[str, Any]]) -> str:
    """The windows outside the SLO, the first MISSED_SHOWN with what broke."""
    shown = [
        f"{w['t_s']:.1f} s ("
        + ", ".join(f"{app} {'; '.join(why)}" for app, why in w["breaches"].items())
        + ")"
        for w in missed[:MISSED_SHOWN]
    ]
    more = f" and {len(missed) - MISSED_SHOWN} more" if len(missed) > MISSED_SHOWN else ""
    return f"windows outside the SLO: {', '.join(shown)}{more}"


def _pct(value: float | None) -> str:
    return _fmt(None if value is None else 100 * value, ".1f") + "%"


def step_line(report: Mapping[str, Any], step: Mapping[str, Any]) -> str:
    """One line on how a run weathered its step (``step_summary``)."""
    rec, att = step["recovery_s"], step["slo_attainment"]
    how = (
        "SLO held" if not step["broke"]
        else "never recovered" if rec is None
        else f"recovered in {rec:.1f} s"
    )  # fmt: skip
    return (
        f"{report['config']['lab'].get('step', 'a')} step at {step['at_s']:.1f} s: {how}, "
        f"SLO attainment after it {_fmt(None if att is None else 100 * att, '.1f')}%, "
        f"best effort {_fmt(step['best_effort_mbps_before'], '.1f')} -> "
        f"{_fmt(step['best_effort_mbps_after'], '.1f')} Mbit/s"
    )


def decisions_total_limits(decisions: Iterable[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(t, sum of limits) after each decision that carries ``t_s`` and ``limits``."""
    out = []
    for d in decisions:
        limits = d.get("limits")
        if isinstance(limits, Mapping) and "t_s" in d:
            out.append((float(d["t_s"]), float(sum(float(v) for v in limits.values()))))
    return out
