"""Ring statistics versus the prototype's sorted()-based IQR, and the engine's CPU cost.

Run as a script (``python bench/stats.py [--json FILE] [--seconds S]``) or call
``run_stats()``. Two figures:

- window statistics: the time of numpy's IQR (np.partition) against the prototype's
  ``sorted()`` IQR over windows of 20, 1,000 and 10,000 RTT samples (ratio), plus the
  cost of a full ``WindowStats`` over the same window;
- the engine's CPU per probe at 100 probes/s over two targets (50/s each) and at 100/s
  per target (200/s), against a reflector in a separate process (``detnet reflect``), so
  only the engine's own CPU (time.process_time) is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from typing import Any

import numpy as np

from detnet.bench.common import (
    BenchError,
    background,
    detnet_command,
    free_udp_port,
    write_json,
)
from detnet.engine.ring import FLAG_RECEIVED, RttRing
from detnet.engine.stats import iqr, window_stats

WINDOWS = (20, 1_000, 10_000)


def prototype_iqr(samples: list[float]) -> float:
    """The prototype's jitter: sort everything, take the quartile elements."""
    s = sorted(samples)
    n = len(s)
    return s[(3 * n) // 4] - s[n // 4]


def bench_iqr(windows: tuple[int, ...] = WINDOWS) -> list[dict[str, Any]]:
    """Per window size: us per IQR with sorted() and with numpy, and their ratio."""
    rng = np.random.default_rng(1)
    rows = []
    for n in windows:
        arr = rng.gamma(2.0, 50_000.0, n)
        as_list = arr.tolist()
        ring = RttRing(max(n, 2))
        ring.append(
            t_ns=np.arange(n, dtype=np.int64),
            sent_ns=np.arange(n, dtype=np.int64),
            seq=np.arange(n, dtype=np.int64),
            rtt_ns=arr,
            user_rtt_ns=arr,
            fwd_ns=arr / 2,
            back_ns=arr / 2,
            flags=FLAG_RECEIVED,
        )
        reps = max(20, 200_000 // n)
        t_sorted = min(
            timeit.repeat(lambda a=as_list: prototype_iqr(a), number=reps, repeat=5)  # type: ignore[misc]
        )
        t_numpy = min(timeit.repeat(lambda a=arr: iqr(a), number=reps, repeat=5))  # type: ignore[misc]
        t_full = min(
            timeit.repeat(
                lambda r=ring: window_stats(  # type: ignore[misc]
                    r.snapshot(), target="t", protocol="udp", base_rtt_ns=None
                ),
                number=max(reps // 10, 5),
                repeat=3,
            )
        )
        rows.append(
            {
                "window": n,
                "sorted_us": t_sorted / reps * 1e6,
                "numpy_us": t_numpy / reps * 1e6,
                "speedup": t_sorted / t_numpy,
                "window_stats_us": t_full / max(reps // 10, 5) * 1e6,
            }
        )
    return rows


async def _engine_cpu(port: int, *, interval_ns: int, seconds: float) -> dict[str, Any]:
    from detnet.engine.core import ProbeEngine
    from detnet.engine.targets import parse_target

    targets = [
        parse_target(f"t{i}=udp://127.0.0.1:{port}", interval_ns=interval_ns) for i in range(2)
    ]
    engine = ProbeEngine(targets, window_ns=10 * 10**9)
    await engine.start()
    try:
        await asyncio.sleep(0.5)  # warm up: first sends, allocations
        sent0 = sum(t.sent for t in engine.totals().values())
        c0, w0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, w1 = time.process_time(), time.monotonic()
        totals = engine.totals()
        sent1 = sum(t.sent for t in totals.values())
        received = sum(t.received for t in totals.values())
    finally:
        await engine.aclose()
    probes = max(sent1 - sent0, 1)
    return {
        "probes_per_s": probes / (w1 - w0),
        "cpu_percent_of_core": 100 * (c1 - c0) / (w1 - w0),
        "cpu_us_per_probe": (c1 - c0) / probes * 1e6,
        "received": received,
    }


def bench_engine_cpu(seconds: float = 5.0) -> list[dict[str, Any]]:
    """Engine CPU at 100 probes/s over two targets, and at 100/s per target."""
    from detnet.engine import runloop

    port = free_udp_port()
    reflect = [*detnet_command(), "reflect", "--udp", f"127.0.0.1:{port}", "--stats-interval", "0"]
    with background(reflect, ready_after_s=1.0):
        rows = []
        for label, interval in (("100/s over 2 targets", 20_000_000), ("100/s per target", 10**7)):
            row = runloop.run(_engine_cpu(port, interval_ns=interval, seconds=seconds))
            rows.append({"load": label, **row})
        return rows


def run_stats(seconds: float = 5.0) -> dict[str, Any]:
    """Both benchmarks; a JSON-ready dict."""
    return {"iqr": bench_iqr(), "engine_cpu": bench_engine_cpu(seconds)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench stats``."""
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU measurement per load")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables; return the report."""
    if args.seconds <= 0:
        raise BenchError("--seconds must be positive")
    res = run_stats(args.seconds)
    print(
        f"{'window':>7} {'sorted() us':>12} {'numpy us':>10} {'speedup':>8} {'WindowStats us':>15}"
    )
    for r in res["iqr"]:
        print(
            f"{r['window']:>7} {r['sorted_us']:>12.1f} {r['numpy_us']:>10.1f} "
            f"{r['speedup']:>7.1f}x {r['window_stats_us']:>15.1f}"
        )
    print()
    print(f"{'engine load':<22} {'probes/s':>9} {'% of a core':>12} {'us/probe':>9}")
    for r in res["engine_cpu"]:
        print(
            f"{r['load']:<22} {r['probes_per_s']:>9.1f} {r['cpu_percent_of_core']:>12.2f} "
            f"{r['cpu_us_per_probe']:>9.1f}"
        )
    return res


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__)
    add_arguments(cli)
    cli.add_argument("--json", metavar="FILE")
    ns = cli.parse_args()
    report = main(ns)
    if ns.json:
        write_json(ns.json, report)
