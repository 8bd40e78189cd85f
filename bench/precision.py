"""``detnet bench precision``: how precise the network RTT is, and what user space adds.

For the same probes, detnet records the network RTT from kernel timestamps (kernel RX
minus kernel TX minus the reflector's turnaround) and the RTT seen from user space (clock
reads next to the syscalls). Their difference is the user-space overhead: the wake-up and
syscall time that user-space probers (irtt, sockperf) cannot separate from the network.

The precision figure is the network RTT's spread, p99 - p50, side by side for a
reflector that answers one-step (its turnaround ends at a clock read before sendmmsg, so
its own scheduling stays in the RTT) and two-step (its kernel TX stamp, sent later: the
RTT is kernel to kernel on both hosts). ``--load`` measures each again while a CPU-bound
process and a bulk TCP flow over the same path compete on the machine. Measured on
loopback and across a veth pair, with the Cython core and with the fallback.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack

import numpy as np

from detnet.bench.common import (
    BenchError,
    Summary,
    background,
    competing_load,
    detnet_command,
    loopback,
    table,
    veth_pair,
    write_json,
)
from detnet.bench.compare import PORTS, detnet_stream

BACKENDS = {"cython": {}, "python": {"DETNET_NO_EXTENSIONS": "1"}}


STEPS = ("one-step", "two-step")


def measure(
    *,
    path_name: str,
    backend: str,
    rate: float,
    duration_s: float,
    step: str = "two-step",
    load: bool = False,
) -> dict[str, object]:
    """One path, backend, reflector step and load: network RTT, user-space RTT and their
    difference (us)."""
    env = {**os.environ, **BACKENDS[backend]}
    with ExitStack() as stack:
        path = stack.enter_context(veth_pair("prc") if path_name == "veth" else loopback())
        reflect = [*detnet_command(), "reflect", "--udp", f"{path.server_addr}:{PORTS['detnet']}"]
        if step == "one-step":
            reflect.append("--one-step")
        stack.enter_context(background([*path.server_prefix, *reflect], ready_after_s=1.0))
        if load:
            stack.enter_context(competing_load(path))
        records, _cpu = detnet_stream(path, rate=rate, duration_s=duration_s, env=env)
    pairs = [
        (r["rtt_ns"], r["user_rtt_ns"])
        for r in records
        if r["rtt_ns"] is not None and r["user_rtt_ns"] is not None
    ]
    if not pairs:
        raise BenchError(f"no RTT samples from detnet on {path_name} ({backend})")
    sources = {r["timestamp_source"] for r in records if not r["lost"]}
    net, user = (np.asarray(col, dtype=np.float64) for col in zip(*pairs, strict=True))
    return {
        "path": path_name,
        "backend": backend,
        "step": step,
        "load": load,
        "timestamp_source": ",".join(sorted(sources)),
        "spread_us": float(np.percentile(net, 99) - np.percentile(net, 50)) / 1000.0,
        "network_rtt_us": Summary.of_ns(net).as_json(),
        "user_rtt_us": Summary.of_ns(user).as_json(),
        "overhead_us": {
            "p50": float(np.percentile(user - net, 50)) / 1000.0,
            "p99": float(np.percentile(user - net, 99)) / 1000.0,
        },
        "samples": len(pairs),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``detnet bench precision``."""
    parser.add_argument("--rate", type=float, default=1000.0, help="probes per second")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument(
        "--paths", default="loopback,veth", help="comma-separated: loopback, veth (needs root)"
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="measure again beside a CPU-bound process and a bulk TCP flow",
    )


def main(args: argparse.Namespace) -> dict[str, object]:
    """Measure every path x backend x reflector step (x load), print tables, return the
    report."""
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - {"loopback", "veth"}:
        raise BenchError("--paths takes loopback and/or veth")
    loads = (False, True) if args.load else (False,)
    results = []
    for path_name in paths:
        for backend in BACKENDS:
            for load in loads:
                for step in STEPS:
                    results.append(
                        measure(
                            path_name=path_name,
                            backend=backend,
                            rate=args.rate,
                            duration_s=args.duration,
                            step=step,
                            load=load,
                        )
                    )
                    time.sleep(0.2)
    print(f"precision: {args.rate:g} probes/s, {args.duration:g} s each")
    print(table(*_spread_table(results, loads)))
    print("(network RTT p99 - p50, microseconds: the probe's own noise on a quiet path)")
    rows = [
        [
            r["path"], r["backend"], r["step"], "yes" if r["load"] else "no",
            r["timestamp_source"],
            r["network_rtt_us"]["p50"], r["network_rtt_us"]["p99"],  # type: ignore[index]
            r["user_rtt_us"]["p50"], r["user_rtt_us"]["p99"],  # type: ignore[index]
            r["overhead_us"]["p50"], r["overhead_us"]["p99"],  # type: ignore[index]
        ]
        for r in results
    ]  # fmt: skip
    cols = ["path", "backend", "reflector", "load", "stamps", "net p50", "net p99"]
    print(table([*cols, "user p50", "user p99", "overhead p50", "overhead p99"], rows))
    print("(microseconds; overhead = user-space RTT minus kernel-timestamp network RTT)")
    return {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "load": args.load,
        "results": results,
    }


def _spread_table(
    results: list[dict[str, object]], loads: tuple[bool, ...]
) -> tuple[list[str], list[list[object]]]:
    """One row per path and backend: the spread one-step and two-step, idle (and loaded),
    and the ratio one-step / two-step."""
    by = {(r["path"], r["backend"], r["step"], r["load"]): r["spread_us"] for r in results}
    headers = ["path", "backend"]
    for load in loads:
        what = "load" if load else "idle"
        headers += [f"{what} one-step", f"{what} two-step", f"{what} ratio"]
    rows = []
    for path, backend in dict.fromkeys((r["path"], r["backend"]) for r in results):
        row: list[object] = [path, backend]
        for load in loads:
            one = float(by[(path, backend, "one-step", load)])  # type: ignore[arg-type]
            two = float(by[(path, backend, "two-step", load)])  # type: ignore[arg-type]
            row += [one, two, f"{one / two:.2f}x" if two > 0 else "-"]
        rows.append(row)
    return headers, rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json")
    ns = parser.parse_args()
    report = main(ns)
    if ns.json:
        write_json(ns.json, report)
