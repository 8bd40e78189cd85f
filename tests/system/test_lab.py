"""A shortened `detnet lab` run as root, asserting the issue's claims against its report,
and that it leaves no namespace, interface or process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_root

pytestmark = [requires_root, pytest.mark.root, pytest.mark.slow]


def _lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("detnet-lab-")}


def _lab_processes() -> set[int]:
    """PIDs whose command line runs the lab's traffic or a detnet endpoint in a lab netns."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"detnet.lab.traffic" in cmd or b"detnet-lab-" in cmd:
            found.add(int(entry.name))
    return found


def _run_lab(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """A one-node `detnet lab` run with ``flags``; it must succeed. Its output and report."""
    report_path = tmp_path / "lab.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "detnet.controller", "lab", "--topology", "node"),
            *flags,
            *("--json", str(report_path)),
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads(report_path.read_text())


def test_shortened_lab_meets_the_claims(tmp_path: Path) -> None:
    before_ns, before_procs = _lab_namespaces(), _lab_processes()
    done, report = _run_lab(tmp_path, "--quiet", "4", "--congestion", "16", "--recovery", "3")
    without = report["runs"]["without_controller"]
    with_ = report["runs"]["with_controller"]

    # without the controller, robot-control's IQR jitter breaks its 1 ms SLO under congestion
    robot_off = without["phases"]["congestion"]["apps"]["robot-control"]
    assert robot_off["jitter_iqr_ms"] > 1.0
    assert without["slo_attainment"] < 0.5

    # with it: protected within 3 s, then within SLO but for one window at most (a fine
    # step of the climb that finds the knee costs one about once a minute, docs/lab.md;
    # in this phase's 13-15 windows that is 7 % of the attainment). Best effort keeps at
    # least 65% of the spare capacity. (The 70% of `make lab` is for its default 20 s of
    # congestion: this 16 s phase leaves room for only two give-back steps after the cut.)
    assert with_["time_to_protect_s"] is not None
    assert with_["time_to_protect_s"] <= 3.0
    assert len(with_["missed_windows"]) <= 1, with_["missed_windows"]
    assert with_["best_effort_utilisation"] >= 0.65
    assert any(d["action"] == "decrease" for d in with_["decisions"])
    quiet = with_["phases"]["quiet"]["apps"]["robot-control"]
    assert quiet["jitter_iqr_ms"] < 1.0

    # nothing left behind
    assert _lab_namespaces() == before_ns
    assert _lab_processes() <= before_procs
    assert "without_controller" in done.stdout


def test_a_knee_step_is_weathered(tmp_path: Path) -> None:
    """The bottleneck drops to 60 % halfway through congestion: without the controller the
    SLO never comes back; with it, it does before congestion ends, and the caps follow
    the link down."""
    done, report = _run_lab(
        tmp_path, "--quiet", "2", "--congestion", "10", "--recovery", "1", "--step", "knee"
    )
    assert report["config"]["lab"]["step"] == "knee"
    without = report["runs"]["without_controller"]["step"]
    with_ = report["runs"]["with_controller"]["step"]
    assert without["at_s"] == with_["at_s"] == pytest.approx(2 + 10 / 2)
    assert without["recovery_s"] is None  # the queue stands until the senders stop
    assert with_["recovery_s"] is not None
    # the caps end under the lower link: best effort is held to less than 60 Mbit/s
    assert with_["best_effort_mbps_after"] < 0.6 * report["config"]["lab"]["bottleneck_mbps"]
    assert "knee step at" in done.stdout
