"""``detnet bench endpoints_watch``: how soon an EndpointSlice change reaches the
controller's endpoint callback, the controller's share of "a new endpoint is probed
within about a second" (the engine's share, callback to first probe, is ``bench
endpoints``).

The API server emulation (in this process) serves a Service without a selector and its
hand-written EndpointSlices of 100 endpoints each (the real controller's default), for
each ``--endpoints`` size. The controller's ``EndpointWatch`` runs in a subprocess on
uvloop, as in ``detnet control`` (bench/ does not import the controller), and prints one
line per ``EndpointDiff`` with the ``CLOCK_MONOTONIC`` time its callback ran (one clock
for both processes on Linux). For each of ``--changes`` changes: one endpoint is added to
a slice (timed from just before the write to the callback that adds it), then marked not
ready (timed to the callback that withdraws it), then dropped. Beside them the watcher's
CPU per change, i.e. per those three slice writes (schedstat, every thread). Goal: 100 ms
from the write to the callback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from detnet.bench.common import BenchError, cpu_ns, table
from detnet.lab.kubeapi import ApiServerEmulator
from detnet.lab.kubeapi.builders import endpoint

NS = "bench"
SERVICE = "robot"
PER_SLICE = 100  # the EndpointSlice controller's default --max-endpoints-per-slice
GOAL_S = 0.1
TIMEOUT_S = 5.0  # a change not seen by then is counted as missed
# The controller side, run with this installation's Python: one EndpointWatch whose
# callback prints each diff as a JSON line (time first: taken on entry).
_WATCHER = """
import json, sys, time
from detnet.controller.endpoints.service import parse_service
from detnet.controller.endpoints.watch import EndpointWatch
from detnet.controller.kube.api import KubeClient, load_client_configuration, new_api_client
from detnet.engine.runloop import run

def on_change(diff):
    t = time.monotonic_ns()
    line = {"t": t, "n": len(diff.current), "initial": diff.initial,
            "added": [e.name for e in diff.added], "removed": [e.name for e in diff.removed]}
    print(json.dumps(line), flush=True)

async def main():
    conf = await load_client_configuration(kubeconfig=sys.argv[1])
    api = new_api_client(conf, identity="bench-endpoints")
    watch = EndpointWatch(kube=KubeClient(api), app="robot-control",
                          service=parse_service(sys.argv[2]), port=7000, protocol="udp",
                          on_change=on_change)
    try:
        await watch.run()
    finally:
        await api.close()

run(main())
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench endpoints_watch``."""
    parser.add_argument(
        "--endpoints",
        default="10,1000",
        help="comma-separated endpoint counts of the Service, one run each (10,1000)",
    )
    parser.add_argument("--changes", type=int, default=30, help="changes timed per size (30)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run, print, and return the report."""
    try:
        sizes = [int(s) for s in str(args.endpoints).split(",")]
    except ValueError as exc:
        raise BenchError(f"--endpoints must be comma-separated integers: {exc}") from exc
    if not sizes or not all(1 <= n <= 5000 for n in sizes):
        raise BenchError("--endpoints: each count must be within 1..5000")
    if not 1 <= args.changes <= 10_000:
        raise BenchError("--changes must be within 1..10000")
    started = time.monotonic()
    report = {
        "sizes": [asyncio.run(_run(n, changes=args.changes)) for n in sizes],
        "goal_s": GOAL_S,
    }
    print(render(report))
    print(f"(ran {time.monotonic() - started:.0f} s)")
    return report


def render(report: dict[str, Any]) -> str:
    """The report as a table."""
    rows = [
        [
            r["endpoints"],
            r["slices"],
            r["add_ms"]["p50"],
            r["add_ms"]["p99"],
            r["add_ms"]["max"],
            r["withdraw_ms"]["p50"],
            r["withdraw_ms"]["p99"],
            r["cpu_ms_per_change"],
            r["missed"],
        ]
        for r in report["sizes"]
    ]
    head = [
        "endpoints",
        "slices",
        "add p50 ms",
        "add p99 ms",
        "add max ms",
        "withdraw p50 ms",
        "withdraw p99 ms",
        "CPU ms/change",
        "missed",
    ]
    goal = f"goal: slice write -> callback within {GOAL_S * 1000:.0f} ms"
    return f"EndpointSlice change -> endpoint callback ({goal})\n" + table(head, rows)


def _address(i: int) -> str:
    return f"198.18.{i // 250 + 1}.{i % 250 + 1}"  # test addresses only (198.18.0.0/15)


def _endpoint(i: int, *, ready: bool = True) -> dict[str, Any]:
    pod = {"metadata": {"name": f"robot-{i}", "namespace": NS, "uid": f"uid-{i}"}}
    return endpoint(_address(i), ready=ready, node_name=f"node-{i % 10}", target=pod)


async def _run(n: int, *, changes: int) -> dict[str, Any]:
    slices = [list(range(i, min(i + PER_SLICE, n))) for i in range(0, n, PER_SLICE)]
    async with ApiServerEmulator(bookmark_interval_s=1.0) as api:
        api.add_service(NS, SERVICE, ports=[7000])
        names = []
        for k, members in enumerate(slices):
            name = f"{SERVICE}-{k}"
            api.add_endpoint_slice(
                NS,
                SERVICE,
                name=name,
                endpoints=[_endpoint(i) for i in members],
                ports=[{"name": "", "port": 7000, "protocol": "UDP"}],
            )
            names.append(name)
        async with _watcher(api) as (pid, lines):
            first = await _next(lines)
            if first is None or first["n"] != n:
                raise BenchError(f"the watcher did not list the {n} endpoints")
            add_ns: list[int] = []
            withdraw_ns: list[int] = []
            missed = 0
            cpu_before = cpu_ns(pid)
            for c in range(changes):
                k = c % len(slices)
                base = [_endpoint(i) for i in slices[k]]
                extra = n + c
                target = f"robot-control/robot-{extra}"
                for ready, into, key in ((True, add_ns, "added"), (False, withdraw_ns, "removed")):
                    t0 = time.monotonic_ns()
                    api.patch(
                        "EndpointSlice",
                        names[k],
                        {"endpoints": [*base, _endpoint(extra, ready=ready)]},
                        namespace=NS,
                    )
                    seen = await _until(lines, key, target)
                    if seen is None:
                        missed += 1
                    else:
                        into.append(seen - t0)
                api.patch("EndpointSlice", names[k], {"endpoints": base}, namespace=NS)
            cpu_used = cpu_ns(pid) - cpu_before
    return {
        "endpoints": n,
        "slices": len(slices),
        "changes": changes,
        "add_ms": _ms(add_ns),
        "withdraw_ms": _ms(withdraw_ns),
        "cpu_ms_per_change": cpu_used / 1e6 / changes,
        "missed": missed,
    }


def _ms(samples_ns: list[int]) -> dict[str, float | None]:
    if not samples_ns:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(a.max())}


async def _next(lines: asyncio.Queue[dict[str, Any] | None]) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return await lines.get()
    except TimeoutError:
        return None


async def _until(lines: asyncio.Queue[dict[str, Any] | None], key: str, name: str) -> int | None:
    """The callback time of the next diff whose ``key`` lists ``name``; None if none
    comes within the timeout."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                line = await lines.get()
        except TimeoutError:
            return None
        if line is None:
            raise BenchError("the watcher exited")
        if name in line[key]:
            return int(line["t"])
    return None


@contextlib.asynccontextmanager
async def _watcher(
    api: ApiServerEmulator,
) -> AsyncIterator[tuple[int, asyncio.Queue[dict[str, Any] | None]]]:
    with tempfile.TemporaryDirectory(prefix="detnet-bench-endpoints-") as home:
        kubeconfig = Path(home) / "kubeconfig"
        kubeconfig.write_text(api.kubeconfig())
        errors = Path(home) / "stderr"
        with errors.open("wb") as stderr:  # a file: a pipe nobody reads could fill up
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _WATCHER, str(kubeconfig), f"{SERVICE}.{NS}.svc",
                stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def read() -> None:
            assert child.stdout is not None
            while raw := await child.stdout.readline():
                with contextlib.suppress(ValueError):
                    await lines.put(json.loads(raw))
            await lines.put(None)

        reader = asyncio.create_task(read())
        try:
            yield child.pid, lines
        except BenchError as exc:
            tail = errors.read_bytes()[-500:].decode(errors="replace").strip()
            raise BenchError(f"{exc}: {tail}" if tail else str(exc)) from None
        finally:
            if child.returncode is None:
                child.terminate()
                try:
                    async with asyncio.timeout(10):
                        await child.wait()
                except TimeoutError:
                    child.kill()
                    await child.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
