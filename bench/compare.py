"""``detnet bench compare``: detnet against irtt and sockperf on the same path.

Each tool probes the same server host at the same rate for the same time, in alternating
rounds (detnet, irtt, sockperf, detnet, ...) so that drift on a shared machine hits all of
them alike. For each we report RTT min/p50/p99/stddev and the client's CPU per probe, read
from the kernel's per-thread schedstat over the steady part of the run (start-up excluded).

irtt and sockperf timestamp in user space, so their RTT includes the scheduler's wake-up;
detnet's network RTT is kernel RX minus kernel TX minus the reflector's turnaround.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detnet.bench.common import (
    BenchError,
    NetPath,
    Summary,
    background,
    cpu_ns,
    detnet_command,
    loopback,
    table,
    veth_pair,
    write_json,
)

TOOLS = ("detnet", "irtt", "sockperf")
PORTS = {"detnet": 5201, "irtt": 2112, "sockperf": 11111}
PROBE_SIZE = 64
WARMUP_S = 1.0  # start-up (imports, handshakes) excluded from CPU and samples


@dataclass(frozen=True)
class Run:
    """One tool's run: RTT samples (ns) and client CPU per probe over the steady part."""

    rtt_ns: np.ndarray
    cpu_ns_per_probe: float


def _steady_cpu(proc: subprocess.Popen[bytes], *, rate: float, duration_s: float) -> float:
    """CPU ns per probe of ``proc`` between WARMUP_S and shortly before its end."""
    window = max(duration_s - 0.5, 0.5)
    time.sleep(WARMUP_S)
    start = cpu_ns(proc.pid)
    t0 = time.monotonic()
    time.sleep(window)
    used = cpu_ns(proc.pid) - start
    return used / (rate * (time.monotonic() - t0))


def _finish(proc: subprocess.Popen[bytes], what: str) -> bytes:
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed ({proc.returncode}): {err.decode(errors='replace')[:300]}")
    return out


def detnet_stream(
    path: NetPath, *, rate: float, duration_s: float, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """Run ``detnet probe --stream`` against ``detnet reflect``; return the steady-state
    records (start-up excluded) and the client's CPU ns per probe."""
    interval_us = round(1e6 / rate)
    cmd = [
        *path.client_prefix, *detnet_command(), "probe",
        "--target", f"bench=udp://{path.server_addr}:{PORTS['detnet']}",
        "--interval", f"{interval_us}us", "--duration", f"{WARMUP_S + duration_s}s",
        "--size", str(PROBE_SIZE), "--stream",
    ]  # fmt: skip
    # The stream goes to a file: a pipe nobody reads until the end would fill and block
    # the prober mid-run.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
        cpu = _steady_cpu(proc, rate=rate, duration_s=duration_s)
        _finish(proc, "detnet probe")
        out.seek(0)
        records = [json.loads(line) for line in out if line.strip()]
    if not records:
        raise BenchError("detnet probe streamed no records")
    first = min(r["sent_ns"] for r in records)
    steady = [r for r in records if r["sent_ns"] >= first + WARMUP_S * 1e9 / 2]
    return steady, cpu


def run_detnet(path: NetPath, *, rate: float, duration_s: float) -> Run:
    """detnet's network RTT (kernel timestamps, reflector turnaround removed)."""
    records, cpu = detnet_stream(path, rate=rate, duration_s=duration_s)
    rtt = [r["rtt_ns"] for r in records if r["rtt_ns"] is not None]
    return Run(np.asarray(rtt, dtype=np.float64), cpu)


def run_irtt(path: NetPath, *, rate: float, duration_s: float) -> Run:
    """irtt's client against its server; its RTT already excludes server processing."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "irtt.json"
        cmd = [
            *path.client_prefix, "irtt", "client", "-Q",
            "-i", f"{round(1e6 / rate)}us", "-d", f"{round((WARMUP_S + duration_s) * 1000)}ms",
            "-l", str(PROBE_SIZE), "-o", str(out), f"{path.server_addr}:{PORTS['irtt']}",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cpu = _steady_cpu(proc, rate=rate, duration_s=duration_s)
        _finish(proc, "irtt client")
        trips = json.loads(out.read_text())["round_trips"]
    skip = int(rate * WARMUP_S / 2)
    rtt = [
        t["delay"]["rtt"] for t in trips[skip:] if t.get("lost") == "false" and "rtt" in t["delay"]
    ]
    return Run(np.asarray(rtt, dtype=np.float64), cpu)


def run_sockperf(path: NetPath, *, rate: float, duration_s: float) -> Run:
    """sockperf ping-pong; RTT is its per-message receive minus send time."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "sockperf.csv"
        cmd = [
            *path.client_prefix, "sockperf", "ping-pong", "-i", path.server_addr,
            "-p", str(PORTS["sockperf"]), f"--mps={round(rate)}", "-m", str(PROBE_SIZE),
            "-t", str(round(WARMUP_S + duration_s)), "--full-log", str(log),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        cpu = _steady_cpu(proc, rate=rate, duration_s=duration_s)
        _finish(proc, "sockperf ping-pong")
        rtt = []
        for line in log.read_text().splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 3 and fields[0].isdigit():
                rtt.append((float(fields[2]) - float(fields[1])) * 1e9)
    return Run(np.asarray(rtt, dtype=np.float64), cpu)


RUNNERS: dict[str, Callable[..., Run]] = {
    "detnet": run_detnet,
    "irtt": run_irtt,
    "sockperf": run_sockperf,
}


def _servers(path: NetPath, available: list[str]) -> Iterator[tuple[str, list[str]]]:
    addr = path.server_addr
    commands = {
        "detnet": [*detnet_command(), "reflect", "--udp", f"{addr}:{PORTS['detnet']}"],
        "irtt": ["irtt", "server", "-i", "0", "-d", "0", "-b", f"{addr}:{PORTS['irtt']}"],
        "sockperf": ["sockperf", "server", "-i", addr, "-p", str(PORTS["sockperf"])],
    }
    for tool in available:
        yield tool, [*path.server_prefix, *commands[tool]]


def compare(*, path_name: str, rate: float, duration_s: float, rounds: int) -> dict[str, object]:
    """Run the comparison and return the JSON report (see the module docstring)."""
    status: dict[str, str] = {}
    for tool in TOOLS:
        status[tool] = (
            "ok"
            if tool == "detnet" or shutil.which(tool)
            else (f"skipped: {tool} is not installed (`make bench-deps` installs it)")
        )
    available = [t for t in TOOLS if status[t] == "ok"]
    samples: dict[str, list[np.ndarray]] = {t: [] for t in available}
    cpu: dict[str, list[float]] = {t: [] for t in available}
    with ExitStack() as stack:
        path = stack.enter_context(veth_pair("cmp") if path_name == "veth" else loopback())
        for _tool, cmd in _servers(path, available):
            stack.enter_context(background(cmd, ready_after_s=0.3))
        time.sleep(0.7)  # the Python reflector imports more than the others
        for _ in range(rounds):
            for tool in available:
                run = RUNNERS[tool](path, rate=rate, duration_s=duration_s / rounds)
                samples[tool].append(run.rtt_ns)
                cpu[tool].append(run.cpu_ns_per_probe)
    tools: dict[str, object] = {}
    for tool in TOOLS:
        if status[tool] != "ok":
            tools[tool] = {"status": status[tool], "rtt_us": None, "cpu_us_per_probe": None}
            continue
        summary = Summary.of_ns(np.concatenate(samples[tool]))
        tools[tool] = {
            "status": "ok",
            "rtt_us": summary.as_json(),
            "cpu_us_per_probe": float(np.mean(cpu[tool])) / 1000.0,
            "samples": summary.n,
        }
    report: dict[str, object] = {
        "path": path_name,
        "rate_per_s": rate,
        "duration_s": duration_s,
        "rounds": rounds,
        "tools": tools,
    }
    report["_samples_ns"] = {t: np.concatenate(samples[t]) for t in available}
    return report


def render(report: dict[str, object]) -> str:
    """The terminal table of a comparison report."""
    rows = []
    tools = report["tools"]
    assert isinstance(tools, dict)
    for name, t in tools.items():
        if t["status"] != "ok":
            rows.append([name, t["status"], "", "", "", "", ""])
            continue
        r = t["rtt_us"]
        rows.append(
            [name, "ok", r["min"], r["p50"], r["p99"], r["p99"] - r["p50"], t["cpu_us_per_probe"]]
        )
    head = (
        f"compare on {report['path']}: {report['rate_per_s']:g} probes/s, "
        f"{report['duration_s']:g} s per tool in {report['rounds']} alternating rounds"
    )
    cols = ["tool", "status", "min us", "p50 us", "p99 us", "p99-p50 us", "CPU us/probe"]
    return head + "\n" + table(cols, rows)


def plot_cdf(report: dict[str, object], path: str) -> None:
    """A CDF of every tool's RTT on a log axis."""
    from detnet.bench.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    samples = report["_samples_ns"]
    assert isinstance(samples, dict)
    for tool, ns in samples.items():
        xs = np.sort(ns) / 1000.0
        ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=tool)
    ax.set_xscale("log")
    ax.set_xlabel("RTT (us)")
    ax.set_ylabel("CDF")
    ax.set_title(f"RTT on {report['path']} at {report['rate_per_s']:g} probes/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench compare``."""
    parser.add_argument("--path", choices=("veth", "loopback"), default="veth")
    parser.add_argument("--rate", type=float, default=1000.0, help="probes per second")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per tool")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")


def main(args: argparse.Namespace) -> dict[str, object]:
    """Run, print, and return the report (without raw samples)."""
    if not 1 <= args.rate <= 20000:
        raise BenchError("--rate must be between 1 and 20000 probes/s")
    if args.duration <= 0 or args.rounds < 1:
        raise BenchError("--duration must be positive and --rounds at least 1")
    report = compare(
        path_name=args.path, rate=args.rate, duration_s=args.duration, rounds=args.rounds
    )
    print(render(report))
    if getattr(args, "plot", None):
        plot_cdf(report, args.plot)
    report.pop("_samples_ns")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    ns = parser.parse_args()
    result = main(ns)
    if ns.json:
        write_json(ns.json, result)
