"""The lab's plots (matplotlib, an optional extra): the one-node lab's timeline
(robot-control's RTT and jitter, best-effort caps and goodput, without and with the
controller) and the cluster lab's runs side by side, per endpoint and per node."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from detnet.lab.cluster.report import ClusterRunData
from detnet.lab.errors import LabError
from detnet.lab.report import RunData, Timeline, series


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LabError("--plot needs matplotlib: pip install 'detnet[plot]'") from exc
    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        fig.savefig(path)
    except OSError as exc:
        raise LabError(f"cannot write {path}: {exc}") from exc
    finally:
        plt.close(fig)


def plot_timeline(runs: Mapping[str, RunData], timeline: Timeline, path: Path) -> None:
    """Write a PNG of both runs on one time axis to ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    top = 0.0  # the best-effort axis ends a third above the most goodput seen
    for name, run in runs.items():
        label = name.replace("_", " ")
        s = series(run, "robot-control")
        axes[0].plot(s["t"], s["p50"], label=f"p50 RTT, {label}")
        axes[1].plot(s["t"], s["iqr"], label=f"IQR jitter, {label}")
        if run.goodput:
            t, mbps = zip(*run.goodput, strict=True)
            axes[2].plot(t, mbps, label=f"best-effort goodput, {label}")
            top = max(top, *mbps)
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
    if top > 0:
        # Uncapped limits (1000 Mbit/s each) would flatten the caps' saw-tooth to a line.
        axes[2].set_ylim(0, top * 1.35)
    axes[2].set_title("best-effort (caps above the top: uncapped)")
    axes[2].set_xlabel("seconds since the run started (shaded: congestion)")
    fig.tight_layout()
    _save(plt, fig, path)


def plot_cluster(
    runs: Mapping[str, ClusterRunData],
    timeline: Timeline,
    path: Path,
    *,
    nodes: Sequence[str],
    ylim_mbps: float = 130.0,
) -> None:
    """Write a PNG of the cluster lab: the runs side by side (columns), per row one
    probed endpoint's p50 RTT and IQR, then each node's best-effort goodput and the
    limits the Cilium stand-in applied to its pods (dashed; none drawn: no limit)."""
    plt = _pyplot()
    endpoints = sorted({e for run in runs.values() for e in run.probes})
    rows = len(endpoints) + len(nodes)
    fig, axes = plt.subplots(
        rows, max(1, len(runs)), sharex=True, sharey="row", figsize=(5 * len(runs), 2.2 * rows),
        squeeze=False,
    )  # fmt: skip
    for col, (name, run) in enumerate(runs.items()):
        axes[0][col].set_title(name.replace("_", " "))
        flat = RunData(probes=run.probes)
        for row, endpoint in enumerate(endpoints):
            ax = axes[row][col]
            s = series(flat, endpoint)
            ax.plot(s["t"], s["p50"], label="p50 RTT")
            ax.plot(s["t"], s["iqr"], label="IQR jitter")
            ax.set_ylabel(f"{endpoint}\nms", fontsize="small")
        for i, node in enumerate(nodes):
            ax = axes[len(endpoints) + i][col]
            if run.goodput.get(node):
                t, mbps = zip(*run.goodput[node], strict=True)
                ax.plot(t, mbps, label="best-effort goodput")
            limits: dict[str, list[tuple[float, float]]] = {}
            for r in run.bandwidth:
                if r.get("node") == node and isinstance(r.get("t_s"), int | float):
                    rate = r.get("rate_bytes_per_s")
                    mbps_cap = rate * 8 / 1e6 if isinstance(rate, int | float) else math.nan
                    limits.setdefault(str(r.get("pod")), []).append((r["t_s"], mbps_cap))
            for pod, steps in sorted(limits.items()):
                steps = sorted(steps)
                steps.append((max(timeline.total_s, steps[-1][0]), steps[-1][1]))  # to the end
                t, caps = zip(*steps, strict=True)
                ax.step(
                    t, caps, where="post", linestyle="--", label=f"limit {pod.rsplit('-', 2)[0]}"
                )
            ax.set_ylim(0, ylim_mbps)
            ax.set_ylabel(f"{node}\nMbit/s", fontsize="small")
        for row in range(rows):
            start, end = timeline.bounds("congestion")
            axes[row][col].axvspan(start, end, alpha=0.1, color="red")
        axes[-1][col].set_xlabel("s since the run started (shaded: congestion)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="x-small")
    fig.tight_layout()
    _save(plt, fig, path)
