"""``detnet bench precision``: what user-space timestamps add to an RTT.

For the same probes, detnet records the network RTT from kernel timestamps (kernel RX
minus kernel TX minus the reflector's turnaround) and the RTT seen from user space (clock
reads next to the syscalls). Their difference is the user-space overhead: the wake-up and
syscall time that user-space probers (irtt, sockperf) cannot separate from the network.
Measured on loopback and across a veth pair, with the Cython core and with the fallback.
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
    detnet_command,
    loopback,
    table,
    veth_pair,
    write_json,
)
from detnet.bench.compare import PORTS, detnet_stream

BACKENDS = {"cython": {}, "python": {"DETNET_NO_EXTENSIONS": "1"}}


def measure(*, path_name: str, backend: str, rate: float, duration_s: float) -> dict[str, object]:
    """One path and backend: network RTT, user-space RTT and their difference (us)."""
    env = {**os.environ, **BACKENDS[backend]}
    with ExitStack() as stack:
        path = stack.enter_context(veth_pair("prc") if path_name == "veth" else loopback())
        reflect = [*detnet_command(), "reflect", "--udp", f"{path.server_addr}:{PORTS['detnet']}"]
        stack.enter_context(background([*path.server_prefix, *reflect], ready_after_s=1.0))
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
        "timestamp_source": ",".join(sorted(sources)),
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


def main(args: argparse.Namespace) -> dict[str, object]:
    """Measure every path x backend, print a table, return the report."""
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths or set(paths) - {"loopback", "veth"}:
        raise BenchError("--paths takes loopback and/or veth")
    results = []
    for path_name in paths:
        for backend in BACKENDS:
            results.append(
                measure(
                    path_name=path_name, backend=backend, rate=args.rate, duration_s=args.duration
                )
            )
            time.sleep(0.2)
    rows = [
        [
            r["path"], r["backend"], r["timestamp_source"],
            r["network_rtt_us"]["p50"], r["network_rtt_us"]["p99"],  # type: ignore[index]
            r["user_rtt_us"]["p50"], r["user_rtt_us"]["p99"],  # type: ignore[index]
            r["overhead_us"]["p50"], r["overhead_us"]["p99"],  # type: ignore[index]
        ]
        for r in results
    ]  # fmt: skip
    print(f"precision: {args.rate:g} probes/s, {args.duration:g} s each")
    cols = ["path", "backend", "stamps", "net p50", "net p99", "user p50", "user p99"]
    print(table([*cols, "overhead p50", "overhead p99"], rows))
    print("(microseconds; overhead = user-space RTT minus kernel-timestamp network RTT)")
    return {"rate_per_s": args.rate, "duration_s": args.duration, "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--json")
    ns = parser.parse_args()
    report = main(ns)
    if ns.json:
        write_json(ns.json, report)
