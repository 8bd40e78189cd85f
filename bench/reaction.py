"""``detnet bench reaction``: how fast a decision reaches the workloads.

Lab part (needs root): shortened one-node ``detnet lab`` runs; from each, the time to
protect (from congestion start until the critical traffic is back within its SLO) and the
tc enforcer's latency, the control loop's own timing of each ``apply()`` (netlink tbf
changes on every best-effort pod's interface). Then one ``--step load`` and one ``--step
knee`` run: whether the SLO broke after the step, and how soon it came back.

Kubernetes part: the Kubernetes enforcer's time to patch N pods
(10, 100, 1000 by default) against the API server emulation (``detnet.lab.kubeapi``,
real REST over HTTP on 127.0.0.1). For each N, a fresh emulator holds two best-effort
Deployments sharing the N Running pods, already annotated with the start limit; the real
``detnet control --enforcer kubernetes`` runs as a subprocess (bench/ does not import the
controller) with a jitter SLO no path meets, so its first decision cuts both workloads
by 20 %; the decision cooldown is an hour, so there is exactly one cut. We read:

- ``seconds``: the control loop's own measure of ``apply()`` for that cut (the decision's
  ``enforce_s``), which returns when every pod is patched; ``pods_per_s`` = N / seconds;
- ``server_span_s``: from the first to the last pod PATCH of the cut as the emulator
  received them, a cross-check that every pod was patched.

Each N runs twice: with the config's default client-side limits (``qps`` 100, burst 50,
``concurrency`` 8), and with the QPS limit lifted (``qps`` 1e9, same concurrency), so the
token bucket's share of the time is visible. The emulator runs in this process, so on a
small machine it competes with the controller for CPU: read the unlimited figures as
"the client and emulator together", not as a real API server's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detnet.bench.common import BenchError, detnet_command, table, write_json
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.lab.kubeapi import ApiServerEmulator

NAMESPACE = "best-effort"
WORKLOADS = ("telemetry-upload", "erp-dashboard")
EGRESS = "kubernetes.io/egress-bandwidth"
START_MBPS = 100
CUT_MBPS = 80  # the default decrease_factor 0.2 applied to START_MBPS
DEFAULT_COUNTS = (10, 100, 1000)
# (label, qps, concurrency): the config defaults, and the same without the QPS limit.
LIMITS: tuple[tuple[str, float, int], ...] = (("default", 100.0, 8), ("unlimited", 1e9, 8))


@dataclass(frozen=True, kw_only=True)
class PatchRun:
    """One timed cut: ``pods`` pods patched under one client-side limit."""

    pods: int
    limit: str
    qps: float
    concurrency: int
    seconds: float
    server_span_s: float

    @property
    def pods_per_s(self) -> float:
        """Pods patched per second of ``apply()``."""
        return self.pods / self.seconds if self.seconds > 0 else float("inf")

    def as_json(self) -> dict[str, Any]:
        """The JSON form of one run."""
        return {
            "pods": self.pods,
            "limit": self.limit,
            "qps": self.qps,
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "pods_per_s": self.pods_per_s,
            "server_span_s": self.server_span_s,
        }


def kubernetes_patch_times(counts: tuple[int, ...] = DEFAULT_COUNTS) -> dict[str, Any]:
    """Time the Kubernetes enforcer's cut over N pods for each N in ``counts``, with the
    default and an unlimited client-side QPS; the JSON-ready report.

    Raises BenchError when a run cannot complete (the controller exits, or not every
    pod is patched)."""
    if not counts or any(n < 2 for n in counts):
        raise BenchError("pod counts must be at least 2 (the pods are split over two workloads)")
    runs: list[PatchRun] = []
    for n in counts:
        for label, qps, concurrency in LIMITS:
            runs.append(asyncio.run(_patch_run(n, label=label, qps=qps, concurrency=concurrency)))
    return {
        "api_server": "detnet.lab.kubeapi emulation on 127.0.0.1 (in the bench process)",
        "workloads": len(WORKLOADS),
        "cut": f"{START_MBPS}M -> {CUT_MBPS}M",
        "runs": [r.as_json() for r in runs],
    }


def _config(*, udp_port: int, qps: float, concurrency: int) -> str:
    targets = "".join(
        f"  - {{deployment: {w}, namespace: {NAMESPACE}, initial_bandwidth: {START_MBPS}}}\n"
        for w in WORKLOADS
    )
    return (
        textwrap.dedent(
            f"""\
            critical_apps:
              - name: robot-control
                host: 127.0.0.1
                port: {udp_port}
                protocol: UDP
                interval: 10ms
                max_jitter_ms: 0.000001
            control:
              control_interval: 100ms
              window: 1s
            policy:
              decrease_cooldown: 1h
            kubernetes:
              qps: {qps:g}
              concurrency: {concurrency}
              lease_namespace: {NAMESPACE}
            best_effort_targets:
            """
        )
        + targets
    )


def _populate(api: ApiServerEmulator, n: int) -> None:
    """Two Deployments sharing ``n`` Running pods that already carry the start limit, so
    the controller's start patches nothing and the cut is the only pod write."""
    for i, workload in enumerate(WORKLOADS):
        api.add_deployment(NAMESPACE, workload, replicas=0)
        share = n // len(WORKLOADS) + (1 if i < n % len(WORKLOADS) else 0)
        for j in range(share):
            api.add_pod(
                NAMESPACE,
                f"{workload}-{j:05d}",
                labels={"app": workload},
                annotations={EGRESS: f"{START_MBPS}M"},
            )


async def _patch_run(n: int, *, label: str, qps: float, concurrency: int) -> PatchRun:
    reflector = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0)))
    await reflector.start()
    assert reflector.udp_address is not None  # bound by start()
    try:
        async with ApiServerEmulator() as api:
            _populate(api, n)
            with tempfile.TemporaryDirectory(prefix="detnet-bench-") as tmp:
                cfg, kubeconfig = Path(tmp) / "config.yaml", Path(tmp) / "kubeconfig"
                cfg.write_text(
                    _config(udp_port=reflector.udp_address[1], qps=qps, concurrency=concurrency)
                )
                kubeconfig.write_text(api.kubeconfig(user="bench"))
                # The QPS bucket allows a burst of 50, then qps per second; give it room.
                limit_s = 60.0 + 2 * n / min(qps, 1000.0)
                cut = await _run_controller(cfg, kubeconfig, limit_s=limit_s)
            value = f"{CUT_MBPS}M"
            not_cut = [
                p["metadata"]["name"]
                for p in api.pods(NAMESPACE)
                if (p["metadata"].get("annotations") or {}).get(EGRESS) != value
            ]
            if not_cut:
                raise BenchError(f"{len(not_cut)} of {n} pods were not patched to {value}")
            body = {"metadata": {"annotations": {EGRESS: value}}}
            times = [
                r.at
                for r in api.requests
                if r.verb == "patch" and "/pods/" in r.path and r.body == body
            ]
    finally:
        await reflector.close()
    return PatchRun(
        pods=n,
        limit=label,
        qps=qps,
        concurrency=concurrency,
        seconds=float(cut["enforce_s"]),
        server_span_s=max(times) - min(times),
    )


async def _run_controller(cfg: Path, kubeconfig: Path, *, limit_s: float) -> dict[str, Any]:
    """Run ``detnet control`` until its first enforced cut; return that decision."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST",)}
    env |= {"KUBECONFIG": str(kubeconfig), "POD_NAME": "detnet-bench"}
    proc = await asyncio.create_subprocess_exec(
        *detnet_command(),
        "control",
        "--config",
        str(cfg),
        "--enforcer",
        "kubernetes",
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read())
    try:
        try:
            cut = await asyncio.wait_for(_first_cut(proc.stdout), limit_s)
        except TimeoutError as exc:
            raise BenchError(f"detnet control made no cut within {limit_s:.0f} s") from exc
        if cut is None:
            await proc.wait()
            err = (await stderr).decode(errors="replace").strip()
            raise BenchError(
                f"detnet control exited ({proc.returncode}) before a cut: {err[-300:]}"
            )
        if "error" in cut:
            raise BenchError(f"the cut failed: {cut['error']}")
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):  # killed below if it hangs
            await asyncio.wait_for(proc.wait(), 30)
        return cut
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await stderr


async def _first_cut(stdout: asyncio.StreamReader) -> dict[str, Any] | None:
    """The first enforced decrease decision on ``stdout`` (None at EOF)."""
    while line := await stdout.readline():
        record = json.loads(line)
        if record.get("action") == "decrease" and record.get("enforce_s") is not None:
            return dict(record)
    return None


def render(report: dict[str, Any]) -> str:
    """The terminal table of the Kubernetes patch times."""
    rows = [
        [
            r["pods"],
            f"{'no qps limit' if r['limit'] == 'unlimited' else 'qps ' + format(r['qps'], 'g')}"
            f", concurrency {r['concurrency']}",
            r["seconds"] * 1e3,
            r["pods_per_s"],
            r["server_span_s"] * 1e3,
        ]
        for r in report["runs"]
    ]
    head = (
        "reaction, Kubernetes part: time to patch "
        f"N pods ({report['cut']}) against the API server emulation"
    )
    cols = ["pods", "client limit", "apply ms", "pods/s", "server span ms"]
    return head + "\n" + table(cols, rows)


def _node_lab(*flags: str) -> dict[str, Any]:
    """One shortened one-node lab run; its ``with_controller`` run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lab.json"
        cmd = [*detnet_command(), "lab", "--topology", "node", "--quiet", "3",
               "--recovery", "2", *flags, "--json", str(out)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise BenchError(f"detnet lab failed: {done.stderr.strip()[-400:]}")
        run: dict[str, Any] = json.loads(out.read_text())["runs"]["with_controller"]
        return run


def lab_reaction(*, runs: int) -> dict[str, Any]:
    """Time to protect and tc enforcement latency over ``runs`` shortened lab runs, then
    one load-step and one knee-step run: how each step was weathered."""
    if os.geteuid() != 0:
        raise BenchError("the lab part needs root (network namespaces); run as root")
    protect: list[float | None] = []
    enforce_ms: list[float] = []
    for _ in range(runs):
        run = _node_lab("--congestion", "12")
        protect.append(run["time_to_protect_s"])
        enforce_ms += [
            d["enforce_s"] * 1000.0 for d in run["decisions"] if d.get("enforce_s") is not None
        ]
    if not enforce_ms:
        raise BenchError("the lab runs made no enforced decision")
    a = np.asarray(enforce_ms)
    steps = {
        step: _node_lab("--congestion", "20", "--step", step)["step"] for step in ("load", "knee")
    }
    return {
        "runs": runs,
        "time_to_protect_s": protect,
        "steps": steps,
        "tc_enforce_ms": {
            "n": int(a.size),
            "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)),
            "max": float(a.max()),
        },
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render_lab(report: dict[str, Any]) -> str:
    """The lab part's table."""
    tc = report["tc_enforce_ms"]
    protect = ", ".join("never" if t is None else f"{t:.1f}" for t in report["time_to_protect_s"])
    rows = [
        ["time to protect (s), per run", protect],
        [
            "tc enforcement p50 / p99 / max (ms)",
            f"{tc['p50']:.2f} / {tc['p99']:.2f} / {tc['max']:.2f}",
        ],
        ["enforced decisions", tc["n"]],
    ]
    for step, st in report.get("steps", {}).items():
        rec = st["recovery_s"]
        how = "SLO held" if not st["broke"] else "never" if rec is None else f"{rec:.1f} s"
        att = st["slo_attainment"]
        rows.append([f"{step} step: recovery, SLO attainment after", f"{how}, {_pct(att)}"])
    return f"reaction, lab part ({report['runs']} shortened lab runs)\n" + table(["", ""], rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench reaction``."""
    parser.add_argument(
        "--counts",
        default=",".join(map(str, DEFAULT_COUNTS)),
        help="pod counts to time, comma-separated (default %(default)s)",
    )
    parser.add_argument("--lab-runs", type=int, default=2, help="shortened lab runs (2)")
    parser.add_argument(
        "--parts", default="lab,kubernetes", help="lab and/or kubernetes (default both)"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run, print, and return the report."""
    try:
        counts = tuple(int(c) for c in str(args.counts).split(",") if c.strip())
    except ValueError as exc:
        raise BenchError(f"--counts must be comma-separated integers, got {args.counts!r}") from exc
    parts = {p.strip() for p in str(args.parts).split(",") if p.strip()}
    if not parts or parts - {"lab", "kubernetes"}:
        raise BenchError("--parts takes lab and/or kubernetes")
    if args.lab_runs < 1:
        raise BenchError("--lab-runs must be at least 1")
    started = time.monotonic()
    report: dict[str, Any] = {}
    if "lab" in parts:
        report["lab"] = lab_reaction(runs=args.lab_runs)
        print(render_lab(report["lab"]))
    if "kubernetes" in parts:
        report["kubernetes"] = kubernetes_patch_times(counts)
        print(render(report["kubernetes"]))
    print(f"(ran {time.monotonic() - started:.0f} s)")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json")
    ns = parser.parse_args()
    result = main(ns)
    if ns.json:
        write_json(ns.json, result)
