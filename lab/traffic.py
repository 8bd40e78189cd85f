"""Best-effort traffic for the lab: bulk TCP senders and a sink that counts what arrives.

Run as ``python -m detnet.lab.traffic``:

- ``sink --listen HOST:PORT``: accepts TCP connections, discards the data and prints one
  JSON line per second, ``{"ts": UNIX_S, "bytes": {"PEER_IP": N, ...}}``, so the lab knows
  each best-effort pod's goodput second by second.
- ``send --to HOST:PORT --mode steady --flows N [--rate MBIT]``: N parallel bulk flows,
  reconnecting if a connection drops (erp-dashboard); ``--rate`` paces each flow to
  MBIT Mbit/s with the kernel's TCP pacing (``SO_MAX_PACING_RATE``: TCP paces itself
  without the fq qdisc since Linux 4.13), so a steady sender stays below a link
  without bursts (the cluster lab's node-b).
- ``send --to HOST:PORT --mode bursty --flows N --upload-bytes B --period S``: every S
  seconds, N parallel uploads of B bytes each (telemetry-upload); a period whose uploads
  overrun simply starts late, it never piles uploads up.

``--start-at UNIX_S`` lets the lab launch senders ahead of time (Python start-up costs
hundreds of ms) and have traffic begin exactly at the congestion phase. Senders run until
SIGTERM/SIGINT. Only addresses the caller gives are contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from detnet.engine.parse import ParseError, parse_address, show

_CHUNK = b"\0" * 65536
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)  # asm-generic/socket.h


@dataclass(frozen=True)
class Endpoint:
    """An IPv4/IPv6 host and a TCP port."""

    host: str
    port: int


def parse_endpoint(text: str, *, listen: bool = False) -> Endpoint:
    """``HOST:PORT`` by ``engine.parse``'s rule (``[V6]:PORT``; ``:PORT`` is every
    interface, for a ``listen`` address only); ParseError (a ValueError) says why not."""
    host, port = parse_address(text, port_zero=False, host_required=not listen)
    return Endpoint(host, port)


def _endpoint_flag(*, listen: bool) -> Callable[[str], Endpoint]:
    def read(text: str) -> Endpoint:
        try:
            return parse_endpoint(text, listen=listen)
        except ParseError as exc:
            raise argparse.ArgumentTypeError(f"{show(text)}: {exc}") from exc

    return read


# ----------------------------------------------------------------------------- sink


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts
        self._peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"

    def data_received(self, data: bytes) -> None:
        self._counts[self._peer] += len(data)


async def run_sink(listen: Endpoint, *, interval_s: float = 1.0) -> None:
    """Count received bytes per peer address; print a JSON line every ``interval_s``."""
    counts: dict[str, int] = defaultdict(int)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _SinkProtocol(counts), listen.host, listen.port, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "listening", "ts": time.time()}), flush=True)
    async with server:
        next_report = time.monotonic() + interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_report - time.monotonic()))
            next_report += interval_s  # absolute deadlines: no drift in the 1 s buckets
            snapshot = dict(counts)
            counts.clear()
            print(json.dumps({"ts": time.time(), "bytes": snapshot}), flush=True)


# --------------------------------------------------------------------------- senders


def _upload(
    to: Endpoint, stop: threading.Event, limit: int | None, rate_bytes: int | None = None
) -> int:
    """Send ``limit`` bytes (None: until stopped) over one connection, paced to
    ``rate_bytes`` per second when given; return bytes sent."""
    sent = 0
    try:
        with socket.create_connection((to.host, to.port), timeout=5.0) as sock:
            if rate_bytes is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, rate_bytes)
            sock.settimeout(0.5)  # so a stop request is seen even when the cap stalls us
            while not stop.is_set() and (limit is None or sent < limit):
                chunk = _CHUNK if limit is None else _CHUNK[: min(len(_CHUNK), limit - sent)]
                try:
                    sent += sock.send(chunk)
                except TimeoutError:
                    continue
    except OSError:
        if not stop.is_set():
            time.sleep(0.2)  # sink not up yet or reset: the caller retries
    return sent


def run_steady(
    to: Endpoint, *, flows: int, stop: threading.Event, rate_mbps: float | None = None
) -> None:
    """``flows`` parallel bulk flows until ``stop`` is set, each paced to ``rate_mbps``."""
    rate = None if rate_mbps is None else max(1, int(rate_mbps * 1e6 / 8))

    def flow() -> None:
        while not stop.is_set():
            _upload(to, stop, None, rate)

    threads = [threading.Thread(target=flow, daemon=True) for _ in range(flows)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_bursty(
    to: Endpoint, *, flows: int, upload_bytes: int, period_s: float, stop: threading.Event
) -> None:
    """Every ``period_s``, ``flows`` parallel uploads of ``upload_bytes`` each."""
    next_burst = time.monotonic()
    while not stop.is_set():
        threads = [
            threading.Thread(target=_upload, args=(to, stop, upload_bytes), daemon=True)
            for _ in range(flows)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        next_burst += period_s
        stop.wait(max(0.0, next_burst - time.monotonic()))
        next_burst = max(next_burst, time.monotonic())  # overran: start late, never pile up


# ------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detnet.lab.traffic", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    sink = sub.add_parser("sink", help="count received bytes per peer, JSON line per second")
    sink.add_argument(
        "--listen", type=_endpoint_flag(listen=True), required=True, metavar="HOST:PORT"
    )
    sink.add_argument("--interval", type=float, default=1.0, metavar="S")
    send = sub.add_parser("send", help="bulk TCP sender")
    send.add_argument("--to", type=_endpoint_flag(listen=False), required=True, metavar="HOST:PORT")
    send.add_argument("--mode", choices=("steady", "bursty"), required=True)
    send.add_argument("--flows", type=int, default=4)
    send.add_argument("--upload-bytes", type=int, default=4_000_000, metavar="B")
    send.add_argument("--period", type=float, default=1.0, metavar="S")
    send.add_argument("--start-at", type=float, default=None, metavar="UNIX_S")
    send.add_argument("--rate", type=float, default=None, metavar="MBIT", help="per flow")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m detnet.lab.traffic``."""
    args = _parser().parse_args(argv)
    if args.role == "sink":
        if args.interval <= 0:
            print("traffic sink: --interval must be positive", file=sys.stderr)
            return 2
        asyncio.run(run_sink(args.listen, interval_s=args.interval))
        return 0
    if args.rate is not None and not 0 < args.rate <= 100_000:
        print("traffic send: --rate must be within (0, 100000] Mbit/s", file=sys.stderr)
        return 2
    if args.flows < 1 or args.upload_bytes < 1 or args.period <= 0:
        print(
            "traffic send: --flows, --upload-bytes and --period must be positive", file=sys.stderr
        )
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.start_at is not None:
        stop.wait(max(0.0, args.start_at - time.time()))
    if args.mode == "steady":
        worker = threading.Thread(
            target=run_steady,
            args=(args.to,),
            kwargs={"flows": args.flows, "stop": stop, "rate_mbps": args.rate},
        )
    else:
        worker = threading.Thread(
            target=run_bursty,
            args=(args.to,),
            kwargs={
                "flows": args.flows,
                "upload_bytes": args.upload_bytes,
                "period_s": args.period,
                "stop": stop,
            },
        )
    worker.start()
    while worker.is_alive():  # the main thread stays free to run the signal handler
        worker.join(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
