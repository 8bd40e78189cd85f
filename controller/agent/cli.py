"""``detnet agent``: serve this node's per-pod network usage to the controller.

``register(subparsers)`` adds the subcommand (as the modules of ``controller/cli`` do);
``run(args)`` validates every flag before anything starts, then runs the agent until
SIGTERM/SIGINT, exit status 0 (``detnet`` lists it in ``controller/cli``'s COMMANDS).
The node comes from ``--node``, else ``NODE_NAME`` (the DaemonSet sets it from the
downward API). Heavy imports (aiohttp, kubernetes-asyncio) happen in ``run``, so
listing the CLI's commands stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import TYPE_CHECKING

from detnet.controller.agent.auth import AUDIENCE, CONTROLLER_ACCOUNT, parse_account
from detnet.controller.errors import CommandError
from detnet.engine.parse import ParseError, parse_address, parse_duration_ns, show

if TYPE_CHECKING:
    from detnet.controller.agent.service import AgentConfig

log = logging.getLogger("detnet.agent")

DEFAULT_LISTEN = "0.0.0.0:9109"
MIN_INTERVAL_NS = 10_000_000  # 10 ms: /proc reads of every pod, 100 times a second
MAX_INTERVAL_NS = 1_000_000_000  # the 1 s mean needs at least two readings a second
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_NOFILE_WANTED = 65536  # two descriptors per pod (a pidfd and its net/dev)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``agent`` subcommand."""
    p = sub.add_parser(
        "agent",
        help="serve per-pod egress/ingress of this node to the controller (a DaemonSet)",
        description="Measure every pod of this node from kernel counters (pods found by "
        "the UID in their cgroup) and serve GET /v1/usage to the allowed service accounts.",
    )
    p.add_argument("--node", metavar="NAME", help="this node's name (default: $NODE_NAME)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"serve /v1/usage, /metrics, /healthz, /readyz here (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="also serve /metrics, /healthz, /readyz (not /v1/usage) here, for Prometheus",
    )
    p.add_argument(
        "--allow",
        metavar="NS:SA",
        action="append",
        help="a service account that may read usage; repeatable (default "
        f"{CONTROLLER_ACCOUNT[0]}:{CONTROLLER_ACCOUNT[1]})",
    )
    p.add_argument(
        "--interval", metavar="TIME", default="100ms", help="sampling interval (default 100ms)"
    )
    p.add_argument(
        "--audience", default=AUDIENCE, help=f"token audience to require (default {AUDIENCE})"
    )
    p.add_argument(
        "--kubeconfig", metavar="FILE", help="outside a pod: the kubeconfig (default $KUBECONFIG)"
    )
    p.add_argument(
        "--proc", default="/proc", metavar="DIR", help="the host's /proc (default /proc)"
    )
    p.set_defaults(func=run)


def _node(args: argparse.Namespace) -> str:
    node = args.node or os.environ.get("NODE_NAME", "")
    where = "--node" if args.node else "NODE_NAME"
    if not node:
        raise CommandError("give --node NAME (or set NODE_NAME from the downward API)")
    if len(node) > 253 or not _NODE_NAME.fullmatch(node):
        raise CommandError(f"{where} {show(node)}: not a node name (a lower-case DNS name)")
    return node


def _config(args: argparse.Namespace) -> AgentConfig:
    from detnet.controller.agent.service import AgentConfig

    node = _node(args)
    try:
        listen = parse_address(args.listen, port_zero=True)
    except ParseError as exc:
        raise CommandError(f"--listen {show(args.listen)}: {exc}") from exc
    metrics = None
    if args.metrics is not None:
        try:
            metrics = parse_address(args.metrics, port_zero=True)
        except ParseError as exc:
            raise CommandError(f"--metrics {show(args.metrics)}: {exc}") from exc
    try:
        interval = parse_duration_ns(args.interval, min_ns=MIN_INTERVAL_NS, max_ns=MAX_INTERVAL_NS)
    except ParseError as exc:
        raise CommandError(f"--interval {show(args.interval)}: {exc}") from exc
    allow = set()
    for text in args.allow or [f"{CONTROLLER_ACCOUNT[0]}:{CONTROLLER_ACCOUNT[1]}"]:
        try:
            allow.add(parse_account(text))
        except ParseError as exc:
            raise CommandError(f"--allow {show(text)}: {exc}") from exc
    if not args.audience or len(args.audience) > 253 or not args.audience.isprintable():
        raise CommandError(f"--audience {show(args.audience)}: not an audience")
    if not os.path.isdir(args.proc):
        raise CommandError(f"--proc {show(args.proc)}: not a directory")
    return AgentConfig(
        node=node,
        listen=listen,
        metrics_listen=metrics,
        allow=frozenset(allow),
        interval_ns=interval,
        audience=args.audience,
        proc=args.proc,
    )


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, _NOFILE_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``detnet agent``."""
    config = _config(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _raise_fd_limit()
    from detnet.engine import runloop

    return runloop.run(_serve(config, kubeconfig=args.kubeconfig))


async def _serve(config: AgentConfig, *, kubeconfig: str | None) -> int:
    import asyncio

    from detnet.controller.agent.auth import describe_allow
    from detnet.controller.agent.service import Agent
    from detnet.controller.kube.api import load_client_configuration, new_api_client
    from detnet.engine import runloop
    from detnet.engine.httpserver import HttpServerError

    conf = await load_client_configuration(kubeconfig=kubeconfig)  # EnforcementError: exit 2
    api = new_api_client(conf, identity=f"agent-{config.node}")
    stop = asyncio.Event()
    try:
        agent = Agent(config, api_client=api)
        try:
            host, port = await agent.start()
        except HttpServerError as exc:
            raise CommandError(str(exc)) from exc
        runloop.stop_on_signals(stop)
        print(
            f"detnet agent: node {config.node}, serving http://{host}:{port}/v1/usage to "
            f"{describe_allow(config.allow)}, sampling every {config.interval_ns / 1e6:g} ms",
            file=sys.stderr,
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            runloop.clear_signals()
            await agent.close()
    finally:
        await api.close()
    return 0
