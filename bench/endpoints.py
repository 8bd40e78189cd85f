"""``detnet bench endpoints``: the engine with many endpoint targets, and how soon a new
one is probed (the engine's share of "an endpoint added to the slice is probed within
about a second"; ``bench endpoints_watch`` times the controller's share before it).

Reflectors: one ``ReflectorServer`` per endpoint, each on its own loopback address
(127.0.0.10, .11, ...: the whole of 127/8 is local on Linux), all in one process pinned
to the second CPU. The engine: a ``ProbeEngine`` on uvloop in its own process pinned to
the first CPU, as ``detnet control`` runs it, started empty (``allow_empty``) and given
its targets the way the endpoint watcher gives them. Three figures:

- ``initial``: ``replace_targets`` with every endpoint at once (the watcher's first list):
  from the call to each endpoint's first probe sent and first reply recorded;
- ``add``: ``--adds`` times, one more endpoint ``add_target``-ed into the running engine:
  from the call to its first probe sent (its deadline is the next point of its grid, so up
  to one interval) and to its first reply recorded; then it is removed again;
- ``cpu``: the engine process's CPU per second (a share of one core) and per probe while
  it probes every endpoint at ``--rate`` Hz for ``--seconds``; beside it what the control
  loop's reads cost over every target: ``stats()``, ``stats(window_ns=1 s, since_ns=...)``
  and one collector scrape.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from detnet.bench.common import BenchError, Summary, background, free_udp_port, table

FIRST_HOST = 10  # 127.0.0.10 is the first endpoint's address
SETTLE_S = 1.0  # after the initial list: every endpoint answered, rings warming up


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


def _host(i: int) -> str:
    return f"127.0.{(FIRST_HOST + i) // 256}.{(FIRST_HOST + i) % 256}"


def _child_reflectors(count: int, port: int) -> None:
    """Runs in the reflectors' process: ``count`` reflectors until terminated."""
    _pin(1)
    from detnet.engine import runloop
    from detnet.engine.reflector import ReflectorConfig, ReflectorServer

    async def serve() -> None:
        servers = [ReflectorServer(ReflectorConfig(udp=(_host(i), port))) for i in range(count)]
        for s in servers:
            await s.start()
        try:
            await asyncio.Event().wait()
        finally:
            for s in servers:
                await s.close()

    runloop.run(serve())


async def _drive(cfg: dict[str, Any]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from detnet import native
    from detnet.engine.core import ProbeEngine
    from detnet.engine.recorder import Sample
    from detnet.engine.targets import Endpoint, Target

    n, port, interval = cfg["endpoints"], cfg["port"], round(1e9 / cfg["rate"])
    answered: dict[str, tuple[int, int]] = {}  # name -> (first sent, first answered) realtime

    def on_sample(s: Sample) -> None:
        if not s.lost and s.target not in answered:
            answered[s.target] = (s.sent_ns, native.realtime_ns())

    def target(name: str, i: int) -> Target:
        return Target(
            name=name,
            protocol="udp",
            host=_host(i),
            port=port,
            interval_ns=interval,
            endpoint=Endpoint("robot", node=f"node-{i % 10}", pod=name),
        )

    async def until(pred: Any, limit_s: float) -> bool:
        end = time.monotonic() + limit_s
        while not pred():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.001)
        return True

    engine = ProbeEngine(
        allow_empty=True,
        window_ns=10_000_000_000,
        on_sample=on_sample,
        max_total_rate_pps=cfg["cap"],
    )
    await engine.start()
    try:
        # The watcher's first list: every endpoint at once.
        names = [f"robot-{i}" for i in range(n)]
        t0 = native.realtime_ns()
        changes = await engine.replace_targets([target(name, i) for i, name in enumerate(names)])
        call_ns = native.realtime_ns() - t0
        if changes.failed:
            raise BenchError(f"endpoints not added: {dict(changes.failed)}")
        if not await until(lambda: all(x in answered for x in names), 10.0):
            missing = [x for x in names if x not in answered]
            raise BenchError(f"{len(missing)} endpoints never answered (first: {missing[0]})")
        initial = {
            "call_ms": call_ns / 1e6,
            "first_sent_ns": [answered[x][0] - t0 for x in names],
            "first_answer_ns": [answered[x][1] - t0 for x in names],
        }
        await asyncio.sleep(SETTLE_S)

        # One endpoint at a time into the running engine.
        add_sent, add_answer, add_call = [], [], []
        for k in range(cfg["adds"]):
            name = f"new-{k}"
            t0 = native.realtime_ns()
            await engine.add_target(target(name, k % n))
            add_call.append(native.realtime_ns() - t0)
            if not await until(functools.partial(operator.contains, answered, name), 10.0):
                raise BenchError(f"the added endpoint {name} never answered")
            add_sent.append(answered[name][0] - t0)
            add_answer.append(answered[name][1] - t0)
            await engine.remove_target(name)
            await asyncio.sleep(0.013 * (1 + k % 7))  # land at different grid phases

        # Steady state: CPU while probing every endpoint.
        before, t0s, wall0 = engine.totals(), os.times(), time.monotonic()
        await asyncio.sleep(cfg["seconds"])
        after, t1s, wall1 = engine.totals(), os.times(), time.monotonic()
        sent = sum(after[x].sent - before[x].sent for x in names)
        received = sum(after[x].received - before[x].received for x in names)

        registry = CollectorRegistry()
        registry.register(engine.collector())
        since = {x: native.monotonic_ns() - 5_000_000_000 for x in names}
        reads = {
            "stats_ms": _time_ms(engine.stats),
            "stats_recent_since_ms": _time_ms(
                lambda: engine.stats(window_ns=1_000_000_000, since_ns=since)
            ),
            "scrape_ms": _time_ms(lambda: generate_latest(registry)),
        }
        series = sum(
            1 for line in generate_latest(registry).decode().splitlines() if 'target="' in line
        )
        rate = engine.rate()
        rss_kb = _rss_kb()
    finally:
        await engine.aclose()
    user, system, wall = t1s.user - t0s.user, t1s.system - t0s.system, wall1 - wall0
    cpu = user + system
    return {
        "backend": engine.backend,
        "initial": initial,
        "add": {"call_ns": add_call, "first_sent_ns": add_sent, "first_answer_ns": add_answer},
        "cpu": {
            "cpu_per_s": cpu / wall,
            "user_share": user / max(cpu, 1e-9),
            "cpu_us_per_probe": cpu / max(sent, 1) * 1e6,
            "probes_per_s": sent / wall,
            "replied_share": received / max(sent, 1),
        },
        "reads": reads,
        "series": series,
        "rss_mb": rss_kb / 1024,
        "rate": {"demand_pps": rate.demand_pps, "planned_pps": rate.planned_pps},
    }


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _time_ms(fn: Any, repeat: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def _child_engine(cfg_json: str) -> None:
    """Runs in the engine's process; prints one JSON line."""
    _pin(0)
    from detnet.engine import runloop

    print(json.dumps(runloop.run(_drive(json.loads(cfg_json)))), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench endpoints``."""
    parser.add_argument("--endpoints", type=int, default=100, help="endpoint targets (100)")
    parser.add_argument("--rate", type=float, default=10.0, help="probes/s per endpoint (10)")
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU measuring time (5)")
    parser.add_argument("--adds", type=int, default=30, help="single additions timed (30)")
    parser.add_argument(
        "--max-total-rate", type=float, default=None, help="the engine's total-rate cap (none)"
    )


def main(args: argparse.Namespace) -> dict[str, object]:
    """CPU of the engine with many endpoints, and add_target to first probe."""
    if not 1 <= args.endpoints <= 4000:
        raise BenchError("--endpoints must be within 1..4000")
    if not 0.1 <= args.rate <= 10_000 or args.seconds <= 0 or args.adds < 1:
        raise BenchError("--rate within 0.1..10000, --seconds > 0 and --adds >= 1, please")
    cfg = {
        "endpoints": args.endpoints,
        "rate": args.rate,
        "seconds": args.seconds,
        "adds": args.adds,
        "cap": args.max_total_rate,
        "port": free_udp_port(),
    }
    reflectors = [
        sys.executable,
        "-c",
        "from detnet.bench.endpoints import _child_reflectors; "
        f"_child_reflectors({args.endpoints}, {cfg['port']})",
    ]
    code = (
        "from detnet.bench.endpoints import _child_engine; "
        f"_child_engine({json.dumps(json.dumps(cfg))})"
    )
    with background(reflectors, ready_after_s=1.0 + args.endpoints / 200):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120 + args.seconds + args.adds,
        )
    if out.returncode != 0:
        raise BenchError(f"engine child failed: {out.stderr.strip()[-600:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ms = 1e-3  # Summary is in microseconds
    rows = []
    for label, values in (
        ("initial: call to first probe sent", r["initial"]["first_sent_ns"]),
        ("initial: call to first reply", r["initial"]["first_answer_ns"]),
        ("add_target: the call itself", r["add"]["call_ns"]),
        ("add_target: call to first probe sent", r["add"]["first_sent_ns"]),
        ("add_target: call to first reply", r["add"]["first_answer_ns"]),
    ):
        s = Summary.of_ns(values)
        rows.append([label, s.n, s.p50 * ms, s.p99 * ms, s.max * ms])
    print(
        f"endpoints: {args.endpoints} targets at {args.rate:g} Hz ({r['backend']} backend), "
        f"interval {1e3 / args.rate:g} ms"
    )
    print(table(["ms", "n", "p50", "p99", "max"], rows))
    c, reads = r["cpu"], r["reads"]
    print(
        f"engine CPU {c['cpu_per_s']:.1%} of a core at {c['probes_per_s']:,.0f} probes/s "
        f"({c['cpu_us_per_probe']:.1f} us per probe, {c['user_share']:.0%} of it in user "
        f"space; {c['replied_share']:.2%} replied); engine RSS {r['rss_mb']:.0f} MB"
    )
    print(
        f"reads over {args.endpoints} targets: stats() {reads['stats_ms']:.2f} ms, "
        f"stats(1 s, since) {reads['stats_recent_since_ms']:.2f} ms, "
        f"scrape {reads['scrape_ms']:.1f} ms ({r['series']} series)"
    )
    summarise = {
        key: Summary.of_ns(np.asarray(vals)).as_json()
        for key, vals in (
            ("initial_first_sent_us", r["initial"]["first_sent_ns"]),
            ("initial_first_reply_us", r["initial"]["first_answer_ns"]),
            ("add_call_us", r["add"]["call_ns"]),
            ("add_first_sent_us", r["add"]["first_sent_ns"]),
            ("add_first_reply_us", r["add"]["first_answer_ns"]),
        )
    }
    return {
        "endpoints": args.endpoints,
        "rate_hz": args.rate,
        "backend": r["backend"],
        "latency": summarise,
        "replace_call_ms": r["initial"]["call_ms"],
        "cpu": c,
        "reads_ms": reads,
        "series": r["series"],
        "rss_mb": r["rss_mb"],
        "rate": r["rate"],
    }
