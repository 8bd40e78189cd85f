"""``detnet bench``: the benchmark harness (code in ``detnet.bench``).

Each benchmark module exposes ``add_arguments(parser)`` and ``main(args) -> report``;
``main`` prints its table and returns a JSON-ready report, which ``--json FILE`` writes.
``detnet bench all`` runs every benchmark with its defaults and writes one combined file.
"""

from __future__ import annotations

import argparse
import importlib
import time
from types import ModuleType

from detnet.controller.cli import COMMANDS
from detnet.controller.errors import CommandError

BENCHMARKS = {
    "native": "the native core: reflector packets/s, CPU per probe, kernel vs user RTT",
    "precision": "user-space overhead over kernel-timestamp RTT, loopback and veth",
    "compare": "detnet against irtt and sockperf on the same path",
    "throughput": "maximum probes/s of the engine and packets/s of the reflector",
    "stats": "ring statistics against the prototype's sorted() IQR",
    "reaction": "time to protect, tc enforcement latency, Kubernetes patch time",
    "agent": "what `detnet agent` costs on a node of 100 pods, and how soon it sees a rate",
    "endpoints": "the engine with many endpoint targets; a new endpoint's first probe",
    "endpoints_watch": "an EndpointSlice change to the controller's endpoint callback",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"detnet.bench.{name}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand and one sub-subcommand per benchmark."""
    parser = sub.add_parser("bench", description=COMMANDS["bench"].help)
    benches = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, text in BENCHMARKS.items():
        p = benches.add_parser(name, help=text, description=text)
        _module(name).add_arguments(p)
        _common(p)
        p.set_defaults(func=run)
    p = benches.add_parser("all", help="run every benchmark with its defaults")
    _common(p)
    p.set_defaults(func=run_all)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot where the benchmark has one")


def run(args: argparse.Namespace) -> int:
    """Run one benchmark."""
    from detnet.bench.common import BenchError, write_json

    try:
        report = _module(args.benchmark).main(args)
    except BenchError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        write_json(args.json, report)
    return 0


def run_all(args: argparse.Namespace) -> int:
    """Run every benchmark in turn with default flags; one JSON file for all."""
    from detnet.bench.common import BenchError, write_json

    reports: dict[str, object] = {}
    for name in BENCHMARKS:
        parser = argparse.ArgumentParser()
        _module(name).add_arguments(parser)
        _common(parser)
        sub_args = parser.parse_args([])
        sub_args.benchmark = name
        print(f"\n=== {name}: {BENCHMARKS[name]}")
        started = time.monotonic()
        try:
            reports[name] = _module(name).main(sub_args)
        except BenchError as exc:
            print(f"skipped: {exc}")
            reports[name] = {"status": f"skipped: {exc}"}
        print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        write_json(args.json, reports)
    return 0
