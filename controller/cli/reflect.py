"""`detnet reflect`: serve the UDP reflector and the TCP echo/connect endpoint.

Runs ``detnet.engine.reflector.ReflectorServer`` on uvloop (the default loop when uvloop
is missing), logs one stats line every ``--stats-interval`` seconds to stderr, and stops
cleanly on SIGTERM (exit status 0) or SIGINT (130). The TCP port is bounded: at most
``--max-connections`` connections (the stalest idle one is closed to admit a newcomer),
each closed after ``--tcp-idle-timeout`` without a frame or when a frame takes longer
than ``--tcp-frame-timeout`` to arrive.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

from detnet.controller.cli import COMMANDS
from detnet.controller.errors import CommandError
from detnet.engine.parse import ParseError, parse_address, parse_duration_ns, read_key_file, show

if TYPE_CHECKING:
    from detnet.engine.reflector import ReflectorConfig, ReflectorServer


def _address(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a listening flag (engine.parse's rule; 0 picks a free port)."""
    try:
        return parse_address(text, port_zero=True)
    except ParseError as exc:
        raise CommandError(f"{flag} {show(text)}: {exc}") from exc


def _seconds(flag: str, text: str) -> float:
    """A duration flag (engine.parse's rule: ``2s``, ``500ms``; a bare number is seconds)."""
    try:
        return parse_duration_ns(text) / 1e9
    except ParseError as exc:
        raise CommandError(f"{flag} {show(text)}: {exc}") from exc


def _key(path: str) -> bytes:
    """The shared HMAC secret, read as ``detnet probe`` reads it."""
    try:
        return read_key_file(path)
    except ParseError as exc:
        raise CommandError(f"--hmac-key-file {show(path)}: {exc}") from exc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `reflect` subcommand."""
    p = sub.add_parser(
        "reflect",
        description=f"{COMMANDS['reflect'].help}: never more bytes than received, nothing "
        "that does not parse, per-source token bucket, a bounded TCP port.",
    )
    p.add_argument("--udp", metavar="HOST:PORT", help="UDP reflector address")
    p.add_argument("--tcp", metavar="HOST:PORT", help="TCP connect/echo address")
    p.add_argument("--hmac-key-file", metavar="FILE", help="shared secret; probes must carry HMACs")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        metavar="PPS",
        help="per-source packets (UDP) / frames (TCP) per second; 0 = unlimited (default)",
    )
    p.add_argument("--burst", type=int, default=32, metavar="N", help="token bucket depth (32)")
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="TCP connections held at once; the stalest idle one makes room for a new one "
        "(default: 1024, fewer when the file-descriptor limit leaves less room)",
    )
    p.add_argument(
        "--tcp-idle-timeout",
        default="60s",
        metavar="TIME",
        help="close a TCP connection that sends no frame for this long (60s)",
    )
    p.add_argument(
        "--tcp-frame-timeout",
        default="2s",
        metavar="TIME",
        help="close a TCP connection whose frame takes longer than this to arrive (2s)",
    )
    p.add_argument(
        "--one-step",
        action="store_true",
        help="answer every probe one-step (no kernel TX stamps sent later): the old "
        "behaviour, for comparisons",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="with -v: seconds between stats lines on stderr; 0 = none (default 10)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="counter lines on stderr: every --stats-interval and on exit",
    )
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> tuple[ReflectorConfig, float]:
    """The reflector's config and the stats interval the flags ask for (0 without -v;
    CommandError)."""
    from detnet.engine.reflector import ReflectorConfig, ReflectorError

    if args.udp is None and args.tcp is None:
        raise CommandError("give --udp HOST:PORT and/or --tcp HOST:PORT")
    if not math.isfinite(args.rate_limit) or args.rate_limit < 0:
        raise CommandError(f"--rate-limit {args.rate_limit}: must be a number >= 0")
    if args.burst < 1:
        raise CommandError(f"--burst {args.burst}: must be at least 1")
    if not math.isfinite(args.stats_interval) or args.stats_interval < 0:
        raise CommandError(f"--stats-interval {args.stats_interval}: must be >= 0")
    udp = _address("--udp", args.udp) if args.udp else None
    tcp = _address("--tcp", args.tcp) if args.tcp else None
    key = _key(args.hmac_key_file) if args.hmac_key_file else None
    idle = _seconds("--tcp-idle-timeout", args.tcp_idle_timeout)
    frame = _seconds("--tcp-frame-timeout", args.tcp_frame_timeout)
    try:  # the reflector checks its own bounds (connections, timeouts)
        config = ReflectorConfig(
            udp=udp,
            tcp=tcp,
            key=key,
            rate_pps=args.rate_limit,
            burst=args.burst,
            tcp_max_connections=args.max_connections,
            tcp_idle_timeout=idle,
            tcp_frame_timeout=frame,
            two_step=not args.one_step,
        )
    except ReflectorError as exc:
        raise CommandError(str(exc)) from exc
    return config, args.stats_interval if args.verbose else 0.0


def _stats_line(server: ReflectorServer) -> str:
    return "detnet reflect: " + " ".join(f"{k}={v}" for k, v in server.stats().items())


async def serve(config: ReflectorConfig, *, stats_interval: float, verbose: bool = True) -> int:
    """Serve until SIGTERM (0) or SIGINT (130); ReflectorError -> CommandError (nothing
    left open). ``verbose``: a counter line every ``stats_interval`` (0: none) and on exit."""
    import asyncio

    from detnet.controller.cli.process import StopSignals
    from detnet.engine.reflector import ReflectorError, ReflectorServer

    server = ReflectorServer(config)
    try:
        await server.start()
    except ReflectorError as exc:
        raise CommandError(str(exc)) from exc
    stop = asyncio.Event()
    try:
        with StopSignals(stop.set) as signals:
            parts = []
            if server.udp_address:
                parts.append(f"udp {server.udp_address[0]}:{server.udp_address[1]}")
            if server.tcp_address:
                parts.append(f"tcp {server.tcp_address[0]}:{server.tcp_address[1]}")
            print(f"detnet reflect: serving {', '.join(parts)}", file=sys.stderr, flush=True)
            while not stop.is_set():
                timeout = stats_interval if stats_interval > 0 else None
                try:
                    await asyncio.wait_for(stop.wait(), timeout)
                except TimeoutError:
                    print(_stats_line(server), file=sys.stderr, flush=True)
    finally:
        await server.close()
    if verbose:
        print(_stats_line(server), file=sys.stderr, flush=True)
    return signals.status


def run(args: argparse.Namespace) -> int:
    """Entry point of `detnet reflect`."""
    from detnet.engine import runloop

    config, interval = build_config(args)
    return runloop.run(serve(config, stats_interval=interval, verbose=args.verbose))
