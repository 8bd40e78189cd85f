"""`detnet lab`: the closed loop on network namespaces (see docs/lab.md).

As root it runs directly. Otherwise ``--unshare`` re-executes the command inside a new user,
network and mount namespace (``unshare -Urnm``) where it holds CAP_NET_ADMIN over its own
namespaces, and explains what is missing when the kernel forbids that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from detnet.controller.errors import CommandError

_REEXEC_ENV = "DETNET_LAB_UNSHARED"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `lab` subcommand."""
    p = sub.add_parser(
        "lab",
        description="Build a cluster of three nodes (or, with --topology node, one node) out of "
        "network namespaces, congest an uplink with best-effort TCP, and compare the critical "
        "traffic without and with the controller.",
    )
    p.add_argument(
        "--topology",
        choices=("cluster", "node"),
        default="cluster",
        help="cluster: the Kubernetes path (API server, agents, a Cilium stand-in; default); "
        "node: one node with the tc enforcer",
    )
    g = p.add_argument_group("timeline")
    g.add_argument("--quiet", type=float, default=5.0, metavar="S", help="quiet phase (5)")
    g.add_argument("--congestion", type=float, metavar="S", help="(cluster 30, node 20)")
    g.add_argument("--recovery", type=float, default=5.0, metavar="S", help="(5)")
    g.add_argument(
        "--step",
        choices=("none", "load", "knee"),
        default="none",
        help="halfway through the congestion: a second wave of bulk flows (load) or the "
        "bottleneck (the cluster: node-a's uplink) drops to 60%% (knee) (none)",
    )
    n = p.add_argument_group("network and traffic")
    n.add_argument("--rate", type=float, default=100.0, metavar="MBIT", help="uplinks (100)")
    n.add_argument("--buffer", type=float, default=30.0, metavar="MS", help="its queue (30)")
    n.add_argument("--steady-flows", type=int, default=2, metavar="N", help="erp-dashboard (2)")
    n.add_argument("--bursty-flows", type=int, default=4, metavar="N", help="telemetry (4)")
    s = p.add_argument_group("SLOs of the node topology (robot-control unless named)")
    s.add_argument("--max-jitter", type=float, default=1.0, metavar="MS", help="IQR (1.0)")
    s.add_argument("--max-latency", type=float, default=5.0, metavar="MS", help="p99 (5.0)")
    s.add_argument("--max-queue-delay", type=float, default=2.0, metavar="MS", help="(2.0)")
    s.add_argument("--scanner-max-jitter", type=float, default=2.0, metavar="MS", help="(2.0)")
    s.add_argument("--scanner-max-latency", type=float, default=10.0, metavar="MS", help="(10)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    o.add_argument("--plot", type=Path, metavar="FILE.png", help="timeline plot (matplotlib)")
    p.add_argument(
        "--unshare",
        action="store_true",
        help="when not root, re-run inside a new user+network namespace (unshare -Urnm)",
    )
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> Any:
    from detnet.lab.errors import LabError
    from detnet.lab.scenario import LabSettings

    try:
        return LabSettings(
            quiet_s=args.quiet,
            congestion_s=args.congestion,
            recovery_s=args.recovery,
            bottleneck_mbps=args.rate,
            buffer_ms=args.buffer,
            steady_flows=args.steady_flows,
            bursty_flows=args.bursty_flows,
            robot_jitter_ms=args.max_jitter,
            robot_latency_ms=args.max_latency,
            robot_queue_delay_ms=args.max_queue_delay,
            scanner_jitter_ms=args.scanner_max_jitter,
            scanner_latency_ms=args.scanner_max_latency,
            step=args.step,
        )
    except LabError as exc:
        raise CommandError(str(exc)) from exc


def _reexec_unshared() -> int:
    """Run this same command again inside new user, network and mount namespaces."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise CommandError("not root and `unshare` (util-linux) is not installed; run as root")
    limit = Path("/proc/sys/user/max_user_namespaces")
    if limit.exists() and limit.read_text().strip() == "0":
        raise CommandError(
            "not root and user namespaces are disabled (user.max_user_namespaces = 0); "
            "run as root or enable them"
        )
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if clone.exists() and clone.read_text().strip() == "0":
        raise CommandError(
            "not root and unprivileged user namespaces are disabled "
            "(kernel.unprivileged_userns_clone = 0); run as root or enable them"
        )
    # `ip netns` needs a writable /run/netns: give it a private tmpfs /run in the new
    # mount namespace (and /sys for `ip netns exec`).
    script = 'mount -t tmpfs tmpfs /run && exec "$@"'
    argv = [unshare, "-Urnm", "--propagation", "private", "sh", "-c", script, "sh"]
    argv += [sys.executable, "-m", "detnet.controller", *sys.argv[1:]]
    os.environ[_REEXEC_ENV] = "1"
    try:
        os.execv(unshare, argv)
    except OSError as exc:
        raise CommandError(f"cannot run unshare: {exc}") from exc
    return 1  # not reached


def _cluster_settings(args: argparse.Namespace) -> Any:
    from detnet.lab.cluster.scenario import ClusterSettings
    from detnet.lab.errors import LabError

    try:
        return ClusterSettings(
            quiet_s=args.quiet,
            congestion_s=args.congestion,
            recovery_s=args.recovery,
            uplink_mbps=args.rate,
            buffer_ms=args.buffer,
            step=args.step,
        )
    except LabError as exc:
        raise CommandError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    """Run the lab; print the report table; write --json/--plot."""
    if args.congestion is None:
        args.congestion = 30.0 if args.topology == "cluster" else 20.0
    settings = _cluster_settings(args) if args.topology == "cluster" else _settings(args)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CommandError(
                "--plot needs matplotlib: pip install 'detnet[plot]' (or drop --plot)"
            ) from exc
    if os.geteuid() != 0:
        if not args.unshare:
            raise CommandError(
                "the lab needs CAP_NET_ADMIN: run as root, or add --unshare to run in a new "
                "user and network namespace"
            )
        if os.environ.get(_REEXEC_ENV) != "1":
            return _reexec_unshared()
    missing = [tool for tool in ("ip", "tc", "ss") if shutil.which(tool) is None]
    if missing:
        raise CommandError(f"the lab needs {', '.join(missing)} (Debian package iproute2)")

    from detnet.lab.errors import LabError

    if args.topology == "cluster":
        from detnet.lab.cluster.command import run_command

        try:
            run_command(settings, json_path=args.json, plot_path=args.plot)
        except LabError as exc:
            raise CommandError(str(exc)) from exc
        return 0

    from detnet.lab.live import LiveView
    from detnet.lab.report import format_table
    from detnet.lab.scenario import run_lab

    view = LiveView(sys.stdout) if sys.stdout.isatty() else None
    try:
        report = run_lab(settings, view=view, log=lambda m: print(m, flush=True))
    except LabError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        if view is not None:
            view.close()
    data = {name: run.pop("_data") for name, run in report["runs"].items()}
    print()
    print(format_table(report), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    if args.plot is not None:
        from detnet.lab.plot import plot_timeline

        plot_timeline(data, settings.timeline, args.plot)
        print(f"plot written to {args.plot}")
    return 0
