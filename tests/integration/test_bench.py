"""The benchmark harness runs end to end and writes the documented JSON shapes.

These check behaviour only (what is reported, and how), never the figures: speed is
what the benchmarks themselves print.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs both backends itself: once per suite is enough


def bench(*args: str, tmp_path: Path) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "detnet.controller", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_compare_reports_every_tool_and_marks_missing_ones_skipped(tmp_path, monkeypatch):
    # A PATH without irtt and sockperf: both must be reported as skipped, not dropped.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bindir))
    report = bench(
        "compare", "--path", "loopback", "--rate", "200", "--duration", "1", "--rounds", "1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert report["path"] == "loopback"
    assert report["rate_per_s"] == 200
    assert report["duration_s"] == 1
    assert set(report["tools"]) == {"detnet", "irtt", "sockperf"}
    detnet = report["tools"]["detnet"]
    assert detnet["status"] == "ok"
    assert set(detnet["rtt_us"]) == {"min", "p50", "p99", "stddev"}
    assert 0 < detnet["rtt_us"]["min"] <= detnet["rtt_us"]["p50"] <= detnet["rtt_us"]["p99"]
    assert detnet["cpu_us_per_probe"] > 0
    for tool in ("irtt", "sockperf"):
        assert report["tools"][tool]["status"].startswith(f"skipped: {tool} is not installed")
        assert report["tools"][tool]["rtt_us"] is None


@pytest.mark.skipif(
    not (shutil.which("irtt") and shutil.which("sockperf")),
    reason="irtt and sockperf not installed (`make bench-deps` installs them as root)",
)
def test_compare_measures_irtt_and_sockperf_when_installed(tmp_path):
    report = bench(
        "compare", "--path", "loopback", "--rate", "200", "--duration", "1", "--rounds", "1",
        tmp_path=tmp_path,
    )  # fmt: skip
    for tool in ("detnet", "irtt", "sockperf"):
        t = report["tools"][tool]
        assert t["status"] == "ok", t
        assert t["samples"] > 50
        assert t["rtt_us"]["min"] <= t["rtt_us"]["p50"] <= t["rtt_us"]["p99"]


def test_throughput_reports_both_backends(tmp_path):
    report = bench("throughput", "--seconds", "0.5", "--batch", "32", tmp_path=tmp_path)
    assert set(report["backends"]) == {"cython", "python"}
    for figures in report["backends"].values():
        assert figures["probes_per_s"] > 0
        assert figures["reflector_pps"] > 0


def test_stats_compares_numpy_with_sorted(tmp_path):
    report = bench("stats", "--seconds", "0.5", tmp_path=tmp_path)
    assert [row["window"] for row in report["iqr"]] == [20, 1000, 10000]
    assert all(row["sorted_us"] > 0 and row["numpy_us"] > 0 for row in report["iqr"])
    assert len(report["engine_cpu"]) == 2


def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "detnet.controller", "bench", "compare", "--rate", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "detnet bench: error: --rate must be between 1 and 20000 probes/s"
    ]
