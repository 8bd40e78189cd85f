"""``detnet bench throughput``: how many probes one core can drive.

The engine: a ``ProbeEngine`` in its own process, pinned to one CPU, probes one UDP target
with ``batch`` probes per 1 ms deadline (far more than it can keep up with), against a
Cython reflector pinned to the other CPU. Throughput is probes completed (replies joined
to their sends and recorded in the ring) per CPU-second of the engine process, so a
loaded machine lowers the wall-clock rate but not the figure. The reflector: packets
replied per CPU-second, from the native benchmark. Both backends, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from detnet.bench.common import BenchError, background, detnet_command, free_udp_port, table

BACKENDS = {"cython": {}, "python": {"DETNET_NO_EXTENSIONS": "1"}}


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


async def _drive_engine(port: int, *, seconds: float, batch: int) -> dict[str, Any]:
    from detnet.engine import runloop  # noqa: F401  (uvloop policy, as in production)
    from detnet.engine.core import ProbeEngine
    from detnet.engine.targets import Target

    target = Target(
        name="tput",
        protocol="udp",
        host="127.0.0.1",
        port=port,
        interval_ns=1_000_000,
        timeout_ns=200_000_000,
        batch=batch,
    )
    engine = ProbeEngine([target], window_samples=10_000)
    await engine.start()
    await asyncio.sleep(0.3)  # warm-up: caches, first batches
    before, cpu0 = engine.totals()["tput"], time.process_time()
    await asyncio.sleep(seconds)
    after, cpu1 = engine.totals()["tput"], time.process_time()
    await engine.aclose()
    return {
        "sent": after.sent - before.sent,
        "received": after.received - before.received,
        "cpu_s": cpu1 - cpu0,
        "backend": engine.backend,
    }


def _child_engine(port: int, seconds: float, batch: int) -> None:
    """Runs in the pinned child process; prints one JSON line."""
    _pin(0)
    from detnet.engine import runloop

    result = runloop.run(_drive_engine(port, seconds=seconds, batch=batch))
    print(json.dumps(result), flush=True)


def engine_throughput(
    backend: str, *, seconds: float, batch: int, one_step: bool = False
) -> dict[str, Any]:
    """Probes completed per CPU-second of an engine process on one core (against a
    two-step reflector, or a ``one_step`` one)."""
    port = free_udp_port()
    env = {**os.environ, **BACKENDS[backend]}
    reflector = [
        "taskset", "-c", "1", *detnet_command(), "reflect", "--udp", f"127.0.0.1:{port}",
        "--rate-limit", "0", *(["--one-step"] if one_step else []),
    ]  # fmt: skip
    if (os.cpu_count() or 1) < 2:
        reflector = reflector[3:]
    code = (
        "import sys; from detnet.bench.throughput import _child_engine; "
        f"_child_engine({port}, {seconds}, {batch})"
    )
    with background(reflector, ready_after_s=1.0):  # the Cython reflector, whatever we test
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    if out.returncode != 0:
        raise BenchError(f"engine child failed: {out.stderr.strip()[-400:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = max(r["cpu_s"], 1e-9)
    return {
        "backend": r["backend"],
        "probes_per_s": r["received"] / cpu,
        "sent_per_cpu_s": r["sent"] / cpu,
        "received": r["received"],
        "cpu_s": r["cpu_s"],
        "completed_share": r["received"] / max(r["sent"], 1),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench throughput``."""
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per backend")
    parser.add_argument("--batch", type=int, default=256, help="probes per 1 ms deadline")


def main(args: argparse.Namespace) -> dict[str, object]:
    """Engine probes/s and reflector packets/s per core, both backends."""
    from detnet.bench.native import reflector_throughput

    if args.seconds <= 0 or not 1 <= args.batch <= 1024:
        raise BenchError("--seconds must be positive and --batch within 1..1024")
    backends: dict[str, dict[str, float]] = {}
    for backend in BACKENDS:
        eng = engine_throughput(backend, seconds=args.seconds, batch=args.batch)
        if eng["backend"] != backend:
            raise BenchError(f"asked for the {backend} backend, the engine ran {eng['backend']}")
        one = engine_throughput(backend, seconds=args.seconds, batch=args.batch, one_step=True)
        refl = reflector_throughput(backend)
        backends[backend] = {
            "probes_per_s": eng["probes_per_s"],
            "probes_per_s_one_step": one["probes_per_s"],
            "reflector_pps": refl,
            "engine_completed_share": eng["completed_share"],
        }
    rows = [
        [
            name, b["probes_per_s"], b["probes_per_s_one_step"], b["reflector_pps"],
            f"{b['engine_completed_share']:.1%}",
        ]
        for name, b in backends.items()
    ]  # fmt: skip
    print(f"throughput per CPU-second (one core each; batch {args.batch} per 1 ms deadline)")
    cols = ["backend", "engine probes/s", "… one-step reflector", "reflector pps"]
    print(table([*cols, "replies joined"], rows))
    cy, py = backends["cython"], backends["python"]
    print(
        f"cython/python: engine {cy['probes_per_s'] / max(py['probes_per_s'], 1):.1f}x, "
        f"reflector {cy['reflector_pps'] / max(py['reflector_pps'], 1):.1f}x"
    )
    return {"backends": backends}
