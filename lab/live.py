"""A one-line live view of a running lab on a terminal (rewritten in place each tick)."""

from __future__ import annotations

import math
import shutil
from typing import Any, TextIO

import numpy as np


class LiveView:
    """Shows the critical RTT/jitter of the last second, best-effort goodput and limits."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._dirty = False

    def __call__(self, run: str, t_s: float, phase: str, rec: Any) -> None:
        """Render one tick; ``rec`` is the scenario's recorder of the current run."""
        parts = [f"{run.replace('_', ' '):<18} {t_s:5.1f}s {phase:<10}"]
        for app, short in (("robot-control", "robot"), ("safety-scanner", "scanner")):
            samples = [r for t, r in rec.probes.get(app, ())[-400:] if t >= t_s - 1.0]
            got = np.asarray([r for r in samples if not math.isnan(r)])
            if got.size:
                q1, p50, q3 = np.percentile(got, [25, 50, 75])
                parts.append(f"{short} p50 {p50:6.2f} IQR {q3 - q1:5.2f} ms")
            else:
                parts.append(f"{short} -")
        be = sum(rec.goodput_by_app.values())
        parts.append(f"BE {be:5.1f} Mbit/s")
        if rec.decisions:
            limits = rec.decisions[-1].get("limits") or {}
            parts.append("caps " + "/".join(str(v) for v in limits.values()))
        self.out.write("\r\x1b[2K" + " | ".join(parts))
        self.out.flush()
        self._dirty = True

    def close(self) -> None:
        """End the live line."""
        if self._dirty:
            self.out.write("\n")
            self.out.flush()
            self._dirty = False


class ClusterLiveView(LiveView):
    """The cluster lab's live line: each probed endpoint's p50 RTT over the last second,
    each node's best-effort goodput, the last decision's limits."""

    def __call__(self, run: str, t_s: float, phase: str, rec: Any) -> None:
        """Render one tick; ``rec`` is the cluster scenario's recorder of the run."""
        parts = [f"{run.replace('_', ' '):<18} {t_s:5.1f}s {phase:<10}"]
        for endpoint, samples in sorted(rec.probes.items()):
            got = np.asarray([r for t, r in samples[-400:] if t >= t_s - 1.0 and not math.isnan(r)])
            short = endpoint.replace("robot-control", "robot").replace("safety-scanner", "scanner")
            parts.append(f"{short} {np.median(got):6.2f} ms" if got.size else f"{short} -")
        parts.append(
            "BE " + " ".join(f"{n[-1]}:{v:5.1f}" for n, v in sorted(rec.goodput_by_node.items()))
        )
        if rec.decisions:
            limits = rec.decisions[-1].get("limits") or {}
            parts.append("caps " + " ".join(f"{k[:3]}{k[k.find('@'):] if '@' in k else ''}={v}"
                                            for k, v in limits.items()))  # fmt: skip
        # One terminal line, or the carriage return rewrites only its last part.
        width = shutil.get_terminal_size((160, 24)).columns - 1
        self.out.write("\r\x1b[2K" + " | ".join(parts)[:width])
        self.out.flush()
        self._dirty = True
