"""`detnet reflect`: serve the UDP reflector and the TCP echo/connect endpoint.

Runs ``detnet.engine.reflector.ReflectorServer`` on uvloop (the default loop when uvloop
is missing), logs one stats line every ``--stats-interval`` seconds to stderr, and stops
cleanly on SIGTERM/SIGINT with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys

from detnet.controller.errors import CommandError
from detnet.engine.parse import ParseError, parse_address, read_key_file, show
from detnet.engine.reflector import ReflectorConfig, ReflectorError, ReflectorServer


def _address(flag: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a listening flag (engine.parse's rule; 0 picks a free port)."""
    try:
        return parse_address(text, port_zero=True)
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
        help="answer UDP probes (fast path) and TCP connect/echo probes",
        description="Reflect detnet probes: never more bytes than received, nothing that "
        "does not parse, per-source token bucket.",
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
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between stats lines on stderr; 0 = none (default 10)",
    )
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> tuple[ReflectorConfig, float]:
    if args.udp is None and args.tcp is None:
        raise CommandError("give --udp HOST:PORT and/or --tcp HOST:PORT")
    if not math.isfinite(args.rate_limit) or args.rate_limit < 0:
        raise CommandError(f"--rate-limit {args.rate_limit}: must be a number >= 0")
    if args.burst < 1:
        raise CommandError(f"--burst {args.burst}: must be at least 1")
    if not math.isfinite(args.stats_interval) or args.stats_interval < 0:
        raise CommandError(f"--stats-interval {args.stats_interval}: must be >= 0")
    config = ReflectorConfig(
        udp=_address("--udp", args.udp) if args.udp else None,
        tcp=_address("--tcp", args.tcp) if args.tcp else None,
        key=_key(args.hmac_key_file) if args.hmac_key_file else None,
        rate_pps=args.rate_limit,
        burst=args.burst,
    )
    return config, args.stats_interval


def _stats_line(server: ReflectorServer) -> str:
    return "detnet reflect: " + " ".join(f"{k}={v}" for k, v in server.stats().items())


async def serve(config: ReflectorConfig, *, stats_interval: float) -> None:
    """Serve until SIGTERM/SIGINT; ReflectorError -> CommandError (nothing left open)."""
    server = ReflectorServer(config)
    try:
        await server.start()
    except ReflectorError as exc:
        raise CommandError(str(exc)) from exc
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parts = []
    if server.udp_address:
        parts.append(f"udp {server.udp_address[0]}:{server.udp_address[1]}")
    if server.tcp_address:
        parts.append(f"tcp {server.tcp_address[0]}:{server.tcp_address[1]}")
    print(f"detnet reflect: serving {', '.join(parts)}", file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            timeout = stats_interval if stats_interval > 0 else None
            try:
                await asyncio.wait_for(stop.wait(), timeout)
            except TimeoutError:
                print(_stats_line(server), file=sys.stderr, flush=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.close()
    print(_stats_line(server), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Entry point of `detnet reflect`."""
    config, interval = _config(args)
    try:
        import uvloop
    except ImportError:  # uvloop is optional at run time: the default loop still works
        asyncio.run(serve(config, stats_interval=interval))
    else:
        uvloop.run(serve(config, stats_interval=interval))
    return 0
