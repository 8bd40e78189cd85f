"""The lab's timeline plot (matplotlib, an optional extra): robot-control's RTT and jitter,
best-effort caps and goodput, without and with the controller."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from detnet.lab.errors import LabError
from detnet.lab.report import RunData, Timeline, series


def plot_timeline(runs: Mapping[str, RunData], timeline: Timeline, path: Path) -> None:
    """Write a PNG of both runs on one time axis to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LabError("--plot needs matplotlib: pip install 'detnet[plot]'") from exc
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    for name, run in runs.items():
        label = name.replace("_", " ")
        s = series(run, "robot-control")
        axes[0].plot(s["t"], s["p50"], label=f"p50 RTT, {label}")
        axes[1].plot(s["t"], s["iqr"], label=f"IQR jitter, {label}")
        if run.goodput:
            t, mbps = zip(*run.goodput, strict=True)
            axes[2].plot(t, mbps, label=f"best-effort goodput, {label}")
        if run.limits:
            t, caps = zip(*run.limits, strict=True)
            axes[2].step(t, caps, where="post", linestyle="--", label=f"caps (sum), {label}")
    for ax, unit in zip(axes, ("ms", "ms", "Mbit/s"), strict=True):
        for phase in ("congestion",):
            start, end = timeline.bounds(phase)
            ax.axvspan(start, end, alpha=0.1, color="red")
        ax.set_ylabel(unit)
        ax.legend(loc="upper right", fontsize="small")
    axes[0].set_title("robot-control RTT")
    axes[1].set_title("robot-control jitter")
    axes[2].set_title("best-effort")
    axes[2].set_xlabel("seconds since the run started (shaded: congestion)")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise LabError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(fig)
