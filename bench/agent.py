"""``detnet bench agent``: what ``detnet agent`` costs on a node, and how soon it shows a
rate change. Needs root.

The node: ``--pods`` pods (100) in kubelet-shaped cgroups (``lab/kubepods.py``: half the
systemd driver on the cgroup v1 named hierarchy, half cgroupfs on cgroup v2), each a
network namespace with a veth and a sandbox process; the API server emulation (in this
process) holds them on the agent's node. The real ``detnet agent`` runs as a subprocess
(bench/ does not import the controller), sampling every ``--interval`` (100 ms).

- CPU: the agent process's CPU time (every thread, from schedstat) per second of wall
  time over ``--seconds``, once every pod is measured, in three cases: every pod idle;
  every pod receiving a trickle (20 small packets a second each, sent from the node
  namespace, so every counter moves between samples); and that with one client asking
  ``/v1/usage`` every 250 ms (the controller's cadence). Beside it the CPU of one tick
  with busy pods (the agent's ``detnet_agent_sample_cpu_seconds`` over that window) and
  its RSS. No bulk traffic runs meanwhile: its softirq work would be charged to
  whichever task it interrupts. Goal: at most 1 % of a core.
- Reaction: pod 0 also carries bulk TCP through a tbf, and the rate alternates between
  20 and 50 Mbit/s ``--changes`` times. For each change, from ``tc`` returning: when the
  kernel's counters (read here every 5 ms, over 50 ms) cross the midpoint of the two
  rates (the traffic itself changed), and when ``/v1/usage``'s ``egress_bps`` (polled
  every 10 ms) does (what the controller sees); the difference is the agent's own lag.
  Goal: at most 0.3 s from the change to ``/v1/usage``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from detnet.bench.common import BenchError, cpu_ns, detnet_command, table
from detnet.lab.errors import LabError
from detnet.lab.kubeapi import ApiServerEmulator
from detnet.lab.kubepods import KubePod, KubePods

NODE = "bench-node"
TOKEN = "bench-controller-token"
CONTROLLER = "system:serviceaccount:detnet-system:detnet-controller"
SINK_PORT = 5401
RATES_MBPS = (20.0, 50.0)
MBIT = 1e6 / 8
GOAL_CORE_FRACTION = 0.01
GOAL_REACTION_S = 0.3
TRICKLE_PPS = 20
# Sends TRICKLE_PPS small UDP datagrams a second to each address given (to the discard
# port: the pod answers with ICMP, so both of its counters move).
_TRICKLE = """
import socket, sys, time
pps, addrs = float(sys.argv[1]), sys.argv[2:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
gap, t = 1.0 / pps, time.monotonic()
while True:
    for a in addrs:
        try:
            s.sendto(b"x" * 32, (a, 9))
        except OSError:
            pass
    t += gap
    time.sleep(max(0.0, t - time.monotonic()))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench agent``."""
    parser.add_argument("--pods", type=int, default=100, help="pods on the node (100)")
    parser.add_argument("--interval", default="100ms", help="the agent's sampling interval")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="CPU measurement window, each case (10)"
    )
    parser.add_argument("--changes", type=int, default=6, help="rate changes timed (6)")


def agent_command() -> list[str]:
    """``detnet agent`` of this installation."""
    return [*detnet_command(), "agent"]


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run, print, and return the report."""
    if os.geteuid() != 0:
        raise BenchError("bench agent needs root (network namespaces, cgroups, tc)")
    if not 1 <= args.pods <= 1000:
        raise BenchError("--pods must be within 1..1000")
    if args.seconds <= 0 or args.changes < 1:
        raise BenchError("--seconds must be positive and --changes at least 1")
    started = time.monotonic()
    try:
        report = asyncio.run(_run(args))
    except LabError as exc:
        raise BenchError(str(exc)) from exc
    print(render(report))
    print(f"(ran {time.monotonic() - started:.0f} s)")
    return report


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with KubePods(tag="bench-agent") as node:
        pods = [
            node.add_pod(driver="systemd" if i % 2 == 0 else "cgroupfs", qos="besteffort")
            for i in range(args.pods)
        ]
        for pod in pods:
            node.spawn(pod, ["sleep", "3600"])
        shaped = pods[0]
        node.set_rate(shaped, RATES_MBPS[0])
        node.spawn_on_node(
            [sys.executable, "-m", "detnet.lab.traffic", "sink", "--listen", f"0.0.0.0:{SINK_PORT}"]
        )
        async with ApiServerEmulator(bookmark_interval_s=1.0) as api:
            api.add_node(NODE)
            for pod in pods:
                api.add_pod("bench", f"pod-{pod.index}", node_name=NODE, uid=pod.uid)
            api.add_token(TOKEN, username=CONTROLLER, audiences=["detnet-agent"])
            async with (
                _agent(api, interval=args.interval) as (pid, url),
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            ):
                await _all_measured(http, url, len(pods))
                metrics_url = url.replace("/v1/usage", "/metrics")
                # Nothing else moves on the node while the CPU is measured: the traffic's
                # own softirq work would be charged to whichever task it interrupts.
                idle = await _cpu(pid, seconds=args.seconds, http=http, metrics_url=metrics_url)
                node.spawn_on_node(
                    [sys.executable, "-c", _TRICKLE, str(TRICKLE_PPS)] + [p.address for p in pods]
                )
                await asyncio.sleep(1.0)
                busy = await _cpu(pid, seconds=args.seconds, http=http, metrics_url=metrics_url)
                asked = await _cpu(
                    pid, seconds=args.seconds, http=http, metrics_url=metrics_url, ask=url
                )
                cpu = {
                    "idle_pods": idle[0],
                    "busy_pods": busy[0],
                    "busy_pods_asked_every_250ms": asked[0],
                }
                tick_us = busy[1]
                rss_kb = _rss_kb(pid)
                sender = node.spawn(
                    shaped,
                    [sys.executable, "-m", "detnet.lab.traffic", "send", "--to",
                     f"{shaped.node_address}:{SINK_PORT}", "--mode", "steady", "--flows", "2"],
                )  # fmt: skip
                reaction = [
                    await _one_change(node, shaped, sender.pid, http, url, k)
                    for k in range(args.changes)
                ]
    agent_s = [r["agent_s"] for r in reaction if r["agent_s"] is not None]
    lags = [r["lag_s"] for r in reaction if r["lag_s"] is not None]
    return {
        "pods": args.pods,
        "interval": args.interval,
        "cpu": {
            **{f"{k}_core_fraction": v for k, v in cpu.items()},
            "tick_cpu_us_mean_busy": tick_us,
            "rss_mb": rss_kb / 1024 if rss_kb else None,
            "goal_core_fraction": GOAL_CORE_FRACTION,
        },
        "reaction": {
            "changes": reaction,
            "agent_s_median": statistics.median(agent_s) if agent_s else None,
            "agent_s_max": max(agent_s) if agent_s else None,
            "lag_s_median": statistics.median(lags) if lags else None,
            "missed": len(reaction) - len(agent_s),
            "goal_s": GOAL_REACTION_S,
        },
    }


@contextlib.asynccontextmanager
async def _agent(api: ApiServerEmulator, *, interval: str) -> AsyncIterator[tuple[int, str]]:
    with tempfile.TemporaryDirectory(prefix="detnet-bench-agent-") as home:
        kubeconfig = Path(home) / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        child = await asyncio.create_subprocess_exec(
            *agent_command(), "--node", NODE, "--listen", "127.0.0.1:0",
            "--kubeconfig", str(kubeconfig), "--interval", interval,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert child.stderr is not None
            line = ""
            while "serving http://" not in line:
                line = (await child.stderr.readline()).decode()
                if not line:
                    raise BenchError("detnet agent exited before serving")
            address = line.split("serving http://", 1)[1].split("/", 1)[0]
            yield child.pid, f"http://{address}/v1/usage"
        finally:
            if child.returncode is None:
                child.terminate()
                try:
                    async with asyncio.timeout(10):
                        await child.wait()
                except TimeoutError:
                    child.kill()
                    await child.wait()


async def _usage(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with http.get(url) as resp:
        if resp.status != 200:
            return []
        doc = await resp.json()
    pods: list[dict[str, Any]] = doc["pods"]
    return pods


async def _all_measured(http: aiohttp.ClientSession, url: str, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pods = await _usage(http, url)
        if len(pods) == n and all(p["egress_bps"] is not None for p in pods):
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"the agent did not measure all {n} pods within 120 s")


async def _cpu(
    pid: int,
    *,
    seconds: float,
    http: aiohttp.ClientSession,
    metrics_url: str,
    ask: str | None = None,
) -> tuple[float, float | None]:
    """The agent's CPU per second of wall time over ``seconds`` (asking ``ask`` every
    250 ms when given), and its mean tick cost (µs) over that window."""
    before = await _metrics(http, metrics_url)
    t0, c0 = time.monotonic(), cpu_ns(pid)
    end = t0 + seconds
    while time.monotonic() < end:
        if ask is not None:
            await _usage(http, ask)
        await asyncio.sleep(0.25)
    fraction = (cpu_ns(pid) - c0) / 1e9 / (time.monotonic() - t0)
    after = await _metrics(http, metrics_url)
    ticks = after.get("count", 0.0) - before.get("count", 0.0)
    cost = after.get("sum", 0.0) - before.get("sum", 0.0)
    return fraction, (cost / ticks * 1e6 if ticks else None)


async def _metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url) as resp:
        text = await resp.text()
    out = {}
    for key in ("sum", "count"):
        m = re.search(rf"^detnet_agent_sample_cpu_seconds_{key}\{{[^}}]*\}} (\S+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _tx_bytes(fd: int) -> int:
    data = os.pread(fd, 65536, 0).decode()
    for line in data.splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            return int(rest.split()[8])
    raise BenchError("the shaped pod has no eth0")


async def _one_change(
    node: KubePods, pod: KubePod, sender_pid: int, http: aiohttp.ClientSession, url: str, k: int
) -> dict[str, Any]:
    """Change pod's rate once; time the kernel's and the agent's view of it."""
    old, new = (RATES_MBPS[k % 2], RATES_MBPS[(k + 1) % 2])
    midpoint = (old + new) / 2 * MBIT
    rising = new > old
    await asyncio.sleep(2.0)  # settle at the old rate (and a full 1 s mean behind it)
    fd = os.open(f"/proc/{sender_pid}/net/dev", os.O_RDONLY)
    try:
        window: list[tuple[float, int]] = []
        node.set_rate(pod, new)
        t0 = time.monotonic()
        kernel_s = agent_s = None
        next_agent = t0
        while time.monotonic() - t0 < 3.0 and (kernel_s is None or agent_s is None):
            now = time.monotonic()
            window.append((now, _tx_bytes(fd)))
            while window and now - window[0][0] > 0.05:
                window.pop(0)
            if kernel_s is None and len(window) >= 2 and window[-1][0] - window[0][0] >= 0.04:
                (ta, ba), (tb, bb) = window[0], window[-1]
                rate = (bb - ba) / (tb - ta)
                if (rate > midpoint) == rising:
                    kernel_s = now - t0
            if agent_s is None and now >= next_agent:
                next_agent = now + 0.01
                pods = await _usage(http, url)
                value = next(
                    (p["egress_bps"] for p in pods if p["name"] == f"pod-{pod.index}"), None
                )
                if value is not None and (value > midpoint) == rising:
                    agent_s = time.monotonic() - t0
            await asyncio.sleep(0.005)
    finally:
        os.close(fd)
    return {
        "from_mbps": old,
        "to_mbps": new,
        "kernel_s": kernel_s,
        "agent_s": agent_s,
        "lag_s": agent_s - kernel_s if agent_s is not None and kernel_s is not None else None,
    }


def render(report: dict[str, Any]) -> str:
    """The report as two plain tables."""
    cpu = report["cpu"]
    rows_cpu = [
        ("pods idle, nobody asks", f"{cpu['idle_pods_core_fraction'] * 100:.2f} %"),
        ("pods busy, nobody asks", f"{cpu['busy_pods_core_fraction'] * 100:.2f} %"),
        (
            "pods busy, asked every 250 ms",
            f"{cpu['busy_pods_asked_every_250ms_core_fraction'] * 100:.2f} %",
        ),
        (
            "one tick, pods busy",
            f"{cpu['tick_cpu_us_mean_busy']:.0f} µs" if cpu["tick_cpu_us_mean_busy"] else "-",
        ),
        ("agent RSS", f"{cpu['rss_mb']:.0f} MB" if cpu["rss_mb"] else "-"),
        ("goal", f"<= {GOAL_CORE_FRACTION * 100:.0f} % of a core"),
    ]
    r = report["reaction"]
    rows_react = [
        (
            f"{c['from_mbps']:.0f} -> {c['to_mbps']:.0f} Mbit/s",
            "-" if c["kernel_s"] is None else f"{c['kernel_s']:.3f}",
            "-" if c["agent_s"] is None else f"{c['agent_s']:.3f}",
            "-" if c["lag_s"] is None else f"{c['lag_s']:.3f}",
        )
        for c in r["changes"]
    ]
    return "\n".join(
        [
            f"detnet agent, {report['pods']} pods sampled every {report['interval']}:",
            table(("CPU of the agent", "share of one core"), rows_cpu),
            "",
            "rate change -> seen (s): kernel counters, /v1/usage, agent's own lag; goal "
            f"<= {GOAL_REACTION_S} s",
            table(("change", "kernel", "/v1/usage", "lag"), rows_react),
        ]
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    main(parser.parse_args())
