"""What every benchmark shares: sample summaries, tables, JSON output, per-process CPU
accounting, and the two paths we measure on (loopback, and a veth pair between two
network namespaces the benchmark creates and removes).

Benchmarks print their figures and compare side by side in one run; they never assert.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class BenchError(Exception):
    """A benchmark that cannot run here (missing privilege, tool or binary)."""


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Distribution of one set of samples, in microseconds."""

    n: int
    min: float
    p50: float
    p99: float
    max: float
    stddev: float

    @classmethod
    def of_ns(cls, samples_ns: Sequence[float] | np.ndarray) -> Summary:
        """Summarise nanosecond samples (numpy's linear percentiles)."""
        a = np.asarray(samples_ns, dtype=np.float64) / 1000.0
        if a.size == 0:
            raise BenchError("no samples to summarise")
        p50, p99 = np.percentile(a, [50, 99])
        return cls(
            n=int(a.size),
            min=float(a.min()),
            p50=float(p50),
            p99=float(p99),
            max=float(a.max()),
            stddev=float(a.std()),
        )

    def as_json(self) -> dict[str, float]:
        """The ``rtt_us`` object of the JSON reports."""
        return {"min": self.min, "p50": self.p50, "p99": self.p99, "stddev": self.stddev}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: str | os.PathLike[str], data: object) -> None:
    """Write a report as indented JSON."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def cpu_ns(pid: int) -> int:
    """CPU time used so far by every thread of ``pid``, in ns (from schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detnet_command() -> list[str]:
    """How to run the ``detnet`` CLI of this very installation."""
    return [sys.executable, "-m", "detnet.controller"]


@dataclass(frozen=True, kw_only=True)
class NetPath:
    """Where a client and a server run: ``prefix`` wraps commands for each side."""

    name: str
    server_addr: str
    client_prefix: tuple[str, ...] = ()
    server_prefix: tuple[str, ...] = ()


@contextlib.contextmanager
def loopback() -> Iterator[NetPath]:
    """Client and server on 127.0.0.1 in the current namespace."""
    yield NetPath(name="loopback", server_addr="127.0.0.1")


@contextlib.contextmanager
def veth_pair(tag: str = "bench") -> Iterator[NetPath]:
    """Two fresh network namespaces joined by a veth pair (198.18.0.1 <-> 198.18.0.2).

    Needs root; everything it creates is removed on exit, also on failure.
    """
    if os.geteuid() != 0:
        raise BenchError("the veth path needs root (network namespaces); run as root")
    if shutil.which("ip") is None:
        raise BenchError("the veth path needs `ip` (Debian package iproute2)")
    client, server = f"detnet-{tag}-{os.getpid()}-c", f"detnet-{tag}-{os.getpid()}-s"
    created: list[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for ns in (client, server):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", server)  # fmt: skip
        for ns, addr in ((client, "198.18.0.1/30"), (server, "198.18.0.2/30")):
            ip("-n", ns, "addr", "add", addr, "dev", "eth0")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield NetPath(
            name="veth",
            server_addr="198.18.0.2",
            client_prefix=("ip", "netns", "exec", client),
            server_prefix=("ip", "netns", "exec", server),
        )
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def background(
    cmd: Sequence[str], *, ready_after_s: float = 0.5
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server for the duration of the block; stop it by PID afterwards."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        time.sleep(ready_after_s)
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise BenchError(f"{cmd[0]} exited at start: {err.strip()[:300]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


_SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = server.accept()
while conn.recv(1 << 20):
    pass
"""
_BULK = """
import socket, sys, time
for _ in range(200):
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
        break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("bulk sender: no sink")
block = bytes(1 << 16)
while True:
    conn.sendall(block)
"""
BULK_PORT = 5301  # the bulk flow's sink: on veth in its own namespace, else a free port


@contextlib.contextmanager
def competing_load(path: NetPath, *, hogs: int = 1) -> Iterator[None]:
    """What a busy node runs beside the probes: ``hogs`` CPU-bound processes and one bulk
    TCP flow over the same path, client side to server side. All stopped on exit."""
    port = BULK_PORT if path.server_prefix else _free_tcp_port()
    with contextlib.ExitStack() as stack:
        for _ in range(hogs):
            stack.enter_context(
                background([sys.executable, "-c", "while True: pass"], ready_after_s=0)
            )
        sink = [*path.server_prefix, sys.executable, "-c", _SINK, path.server_addr, str(port)]
        stack.enter_context(background(sink, ready_after_s=0.3))
        bulk = [*path.client_prefix, sys.executable, "-c", _BULK, path.server_addr, str(port)]
        stack.enter_context(background(bulk, ready_after_s=0.5))
        yield


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
