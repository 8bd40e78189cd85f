"""A one-line live view of a running lab on a terminal (rewritten in place each tick)."""

from __future__ import annotations

import math
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
