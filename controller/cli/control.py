"""`detnet control`: the engine, the policy and an enforcer in one process, on uvloop.

This module parses the flags, validates everything (config, flags, unresolvable
services, a tc enforcer without devices) into a ``daemon.Plan`` before the first socket
opens or the first limit is written (a bad config exits 2 and touches nothing), and
hands the plan to ``detnet.controller.daemon.Daemon``, which runs until SIGTERM (exit 0),
SIGINT (exit 130) or ``--duration``. The daemon and everything it needs are imported only
when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, TextIO, cast

from detnet.controller.cli import COMMANDS
from detnet.controller.errors import CommandError
from detnet.engine.parse import ParseError, parse_address, parse_duration_ns, show

if TYPE_CHECKING:
    from detnet.controller.cli.process import PipeOutput
    from detnet.controller.daemon import Plan


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `control` subcommand."""
    p = sub.add_parser("control", description=COMMANDS["control"].help)
    p.add_argument("--config", required=True, metavar="FILE", help="controller config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="decide and log, but enforce nothing")
    p.add_argument(
        "--enforcer",
        choices=("kubernetes", "tc"),
        default="kubernetes",
        help="where limits go: pod annotations (default) or tc on local interfaces",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /metrics here (default: config metrics.listen)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument(
        "--duration", metavar="TIME", help="stop after this long (30s, 2m; a bare number: seconds)"
    )
    p.add_argument(
        "--stream",
        metavar="FILE",
        help="write one JSON line per finished probe to FILE ('-' for stdout)",
    )
    p.set_defaults(func=run)


def plan(args: argparse.Namespace) -> Plan:
    """The validated plan the flags and the config describe (CommandError, ConfigError)."""
    from detnet.controller.config import load_config
    from detnet.controller.daemon import make_plan

    duration_s = None
    if args.duration is not None:
        try:
            duration_s = parse_duration_ns(args.duration) / 1e9
        except ParseError as exc:
            raise CommandError(f"--duration {show(args.duration)}: {exc}") from exc
    config = load_config(args.config)  # ConfigError: exit 2, nothing touched
    for warning in config.warnings:
        print(f"detnet control: warning: {warning}", file=sys.stderr)
    try:
        listen = parse_address(args.metrics or config.metrics_listen, port_zero=True)
    except ParseError as exc:
        raise CommandError(f"--metrics {show(args.metrics)}: {exc}") from exc
    return make_plan(
        config,
        enforcer="dry-run" if args.dry_run else args.enforcer,
        listen=listen,
        pod_namespace=os.environ.get("POD_NAMESPACE"),
        duration_s=duration_s,
        log_format=args.log_format,
    )


def run(args: argparse.Namespace) -> int:
    """Validate everything, then run the daemon; 0 after SIGTERM or --duration."""
    the_plan = plan(args)
    import logging

    from detnet.controller.cli.process import PipeOutput
    from detnet.engine import runloop

    file: TextIO | None = None
    if args.stream not in (None, "-"):
        try:
            file = open(args.stream, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CommandError(f"--stream {show(args.stream)}: {exc.strerror}") from exc
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # A reader that goes away (`detnet control --stream - | head`) stops the run quietly.
    stdout = PipeOutput(sys.stdout)
    fd = stdout.fileno() if args.stream == "-" else None if file is None else file.fileno()
    try:
        return runloop.run(_serve(the_plan, stdout=stdout, stream_fd=fd))
    finally:
        if file is not None:
            file.close()


async def _serve(plan: Plan, *, stdout: PipeOutput, stream_fd: int | None) -> int:
    from detnet.controller.cli.process import StopSignals
    from detnet.controller.daemon import Daemon
    from detnet.engine.stream import SampleStream

    # Probe records own stdout when streamed there; decisions then go to stderr.
    # PipeOutput has what the daemon's writers use (write, flush), not all of TextIO.
    on_stdout = stream_fd is not None and stream_fd == stdout.fileno()
    log_stream = sys.stderr if on_stdout else cast(TextIO, stdout)
    stream = None
    if stream_fd is not None:
        stdout.flush()
        stream = SampleStream(stream_fd)
    daemon = Daemon(plan, stream=stream, log_stream=log_stream)
    stdout.on_closed = daemon.stop
    if stream is not None:
        # The thread writes the descriptor: EPIPE on stdout is the reader going away.
        stream.on_closed = stdout.reader_gone if on_stdout else daemon.stop
    with StopSignals(daemon.stop) as signals:
        await daemon.run()
    stdout.flush()
    return signals.status
