"""``detnet lab`` with the cluster topology: the tools it needs, the run, the table, the
JSON report and the plot. The CLI (``controller/cli/lab.py``) parses the flags, deals
with privileges and turns a LabError into its one-line error; this module does the rest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TextIO

from detnet.lab.cluster.plan import BEST_EFFORT, WORKLOADS
from detnet.lab.cluster.report import format_cluster_table
from detnet.lab.cluster.scenario import ClusterSettings, run_cluster_lab
from detnet.lab.errors import LabError

TOOLS = {"ip": "iproute2", "tc": "iproute2", "ss": "iproute2", "unshare": "util-linux",
         "sysctl": "procps", "sleep": "coreutils"}  # fmt: skip


def check_tools() -> None:
    """LabError naming the packages of the tools that are missing."""
    missing = sorted({f"{t} ({pkg})" for t, pkg in TOOLS.items() if shutil.which(t) is None})
    if missing:
        raise LabError(f"the cluster lab needs {', '.join(missing)}")


def run_command(
    settings: ClusterSettings,
    *,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    out: TextIO = sys.stdout,
) -> dict[str, object]:
    """Run the cluster lab, print its table, write ``json_path`` and ``plot_path``;
    return the report."""
    check_tools()
    from detnet.lab.live import ClusterLiveView

    view = ClusterLiveView(out) if out.isatty() else None
    try:
        report = run_cluster_lab(settings, view=view, log=lambda m: print(m, file=out, flush=True))
    finally:
        if view is not None:
            view.close()
    data = {name: run.pop("_data") for name, run in report["runs"].items() if "_data" in run}
    print(file=out)
    print(format_cluster_table(report), end="", file=out)
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise LabError(f"cannot write {json_path}: {exc.strerror or exc}") from exc
        print(f"report written to {json_path}", file=out)
    if plot_path is not None:
        from detnet.lab.plot import plot_cluster

        nodes = sorted({n for w in WORKLOADS if w.name in BEST_EFFORT for n in w.nodes})
        plot_cluster(data, settings.timeline, plot_path, nodes=nodes)
        print(f"plot written to {plot_path}", file=out)
    return report
