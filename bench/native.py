"""Benchmark of the native core, both backends side by side (``python bench/native.py``).

For each backend (the Cython ``_core`` and the pure-Python ``_fallback``, imported
directly): reflector packets/s per CPU-second of the reflector process (a sender blasts
valid probes on loopback; the reflector runs in its own process and reports its CPU
time), CPU ns per probe, and for one-at-a-time probes the network RTT from kernel
timestamps (kernel RX - kernel TX - reflector turnaround) beside the RTT seen from user
space, p50 and p99. Runs in about 15 s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np

BACKENDS = {"cython": "detnet.native._core", "python": "detnet.native._fallback"}
BLAST_SECONDS = 3.0
RTT_PROBES = 2000


def _child_reflector(backend: str) -> int:
    """Serve on 127.0.0.1:0 until stdin closes; print the port, then the counters."""
    impl = importlib.import_module(BACKENDS[backend])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    refl = impl.Reflector(sock, batch=64)
    print(sock.getsockname()[1], flush=True)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(sys.stdin, select.POLLIN | select.POLLHUP)
    t0 = os.times()
    try:
        while True:
            events = dict(poller.poll(200))
            if sys.stdin.fileno() in events:
                break
            if sock.fileno() in events:
                refl.serve()
    finally:
        t1 = os.times()
        user, system = t1.user - t0.user, t1.system - t0.system
        print(json.dumps({**refl.stats(), "user_s": user, "sys_s": system}), flush=True)
        sock.close()
    return 0


class _Child:
    """A reflector process of one backend (ended by closing its stdin, by PID otherwise)."""

    def __init__(self, backend: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "detnet.bench.native", "--child-reflector", backend],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def finish(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        stats: dict[str, float] = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Result:
    backend: str
    pps_per_cpu: float
    cpu_ns_per_probe: float
    user_ns_per_probe: float  # our code (the rest of the CPU is the kernel's UDP path)
    replied: int
    net_p50_us: float
    net_p99_us: float
    user_p50_us: float
    user_p99_us: float
    kernel_share: float


def _throughput(backend: str, sender: ModuleType) -> tuple[float, float, float, int]:
    child = _Child(backend)
    try:
        probe = sender.ProbeSocket(
            "127.0.0.1", child.port, session=1, size=64, kernel_timestamps=False
        )
        sent = np.zeros(64, sender.SENT_DTYPE)
        seq = 0
        end = time.monotonic() + BLAST_SECONDS
        while time.monotonic() < end:
            # Blast, and never read the replies (the kernel drops them once the buffer is
            # full): a sender that also drains cannot outpace the Cython reflector, which
            # would then pay a wake-up per partial batch instead of its per-packet cost.
            seq += probe.send(seq, 64, sent)
        time.sleep(0.2)
        probe.close()
        stats = child.finish()
    finally:
        child.kill()
    cpu = max(stats["user_s"] + stats["sys_s"], 1e-9)
    replied = max(int(stats["replied"]), 1)
    return replied / cpu, cpu * 1e9 / replied, stats["user_s"] * 1e9 / replied, replied


def _rtt(backend: str, impl: ModuleType) -> tuple[np.ndarray, np.ndarray, float]:
    child = _Child(backend)
    net: list[int] = []
    user: list[int] = []
    kernel = 0
    try:
        probe = impl.ProbeSocket("127.0.0.1", child.port, session=2, size=64)
        sent = np.zeros(1, impl.SENT_DTYPE)
        got = np.zeros(4, impl.REPLY_DTYPE)
        for seq in range(RTT_PROBES):
            if probe.send(seq, 1, sent) != 1:
                continue
            if not select.select([probe.fileno()], [], [], 1.0)[0]:
                continue
            if probe.recv(got) != 1 or got[0]["seq"] != seq:
                continue
            r, s = got[0], sent[0]
            turnaround = int(r["refl_tx_ns"]) - int(r["refl_rx_ns"])
            user.append(int(r["user_rx_ns"]) - int(s["user_tx_ns"]))
            if r["kernel_rx_ns"] and s["kernel_tx_ns"]:
                kernel += 1
                net.append(int(r["kernel_rx_ns"]) - int(s["kernel_tx_ns"]) - turnaround)
            time.sleep(0.0002)
        probe.close()
        child.finish()
    finally:
        child.kill()
    return np.array(net, dtype=np.int64), np.array(user, dtype=np.int64), kernel / RTT_PROBES


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) / 1000 if len(values) else float("nan")


def run() -> list[Result]:
    """Measure every available backend; return the results."""
    modules: dict[str, ModuleType] = {}
    for name, module in BACKENDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ImportError:
            print(f"{name}: not available (extension not built)", file=sys.stderr)
    sender = modules.get("cython", modules["python"])  # the fastest blaster available
    results = []
    for name, impl in modules.items():
        pps, cpu_ns, user_ns, replied = _throughput(name, sender)
        net, user, share = _rtt(name, impl)
        results.append(
            Result(
                backend=name,
                pps_per_cpu=pps,
                cpu_ns_per_probe=cpu_ns,
                user_ns_per_probe=user_ns,
                replied=replied,
                net_p50_us=_pct(net, 50),
                net_p99_us=_pct(net, 99),
                user_p50_us=_pct(user, 50),
                user_p99_us=_pct(user, 99),
                kernel_share=share,
            )
        )
    return results


def reflector_throughput(backend: str) -> float:
    """Replies per CPU-second of a reflector process of ``backend``."""
    modules = {name: importlib.import_module(mod) for name, mod in BACKENDS.items()}
    return _throughput(backend, modules["cython"])[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench native`` (none beyond --json)."""


def main(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark, print the table, return the report."""
    results = run()
    head = (
        f"{'backend':8} {'refl pkt/s/CPU':>15} {'CPU ns/probe':>13} {'user ns':>8} "
        f"{'net p50 us':>11} {'net p99 us':>11} {'net spread':>11} {'user p50 us':>12} "
        f"{'user p99 us':>12} {'kernel ts':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.backend:8} {r.pps_per_cpu:15,.0f} {r.cpu_ns_per_probe:13,.0f} "
            f"{r.user_ns_per_probe:8,.0f} "
            f"{r.net_p50_us:11.1f} {r.net_p99_us:11.1f} {r.net_p99_us - r.net_p50_us:11.1f} "
            f"{r.user_p50_us:12.1f} {r.user_p99_us:12.1f} {r.kernel_share:9.0%}"
        )
    by = {r.backend: r for r in results}
    if "cython" in by and "python" in by:
        ratio = by["cython"].pps_per_cpu / max(by["python"].pps_per_cpu, 1e-9)
        print(f"\nCython reflector: {ratio:.1f}x the fallback's packets per CPU-second")
        print("(user ns: our code per packet; the rest of the CPU is the kernel's UDP path,")
        print(" which both backends pay alike and which bounds the ratio)")
    return {"backends": {r.backend: r.__dict__ for r in results}}


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--child-reflector", choices=sorted(BACKENDS), help=argparse.SUPPRESS)
    cli.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ns = cli.parse_args()
    if ns.child_reflector:
        sys.exit(_child_reflector(ns.child_reflector))
    report = main(ns)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
