"""`detnet probe`: probe critical services and report latency, jitter and loss.

Targets come from ``--target NAME=udp://HOST:PORT`` / ``NAME=tcp://HOST:PORT?mode=...`` /
``NAME=icmp://HOST`` (repeatable) or from the controller's config (``--config``: its
critical apps). The engine
runs on uvloop until ``--duration`` passes or SIGINT/SIGTERM arrives; then probes in flight
finish (reply or timeout) and the summary is printed; the exit status is 0, or 130
after SIGINT. ``--stream`` writes one JSON line per finished probe as it happens, from a
thread with a bounded queue so that a slow reader never bends the probe schedule (records
it has no room for are dropped and counted: ``stream_dropped``); a reader that goes away,
``| head``, ends the run quietly; ``--json`` prints the summary
object at the end; on a terminal without either, a live table refreshes twice a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from detnet.controller.errors import CommandError
from detnet.engine.parse import (
    ParseError,
    parse_address,
    parse_duration_ns,
    read_key_file,
    show,
)

STREAM_BUFFER = 65_536  # engine.stream.DEFAULT_CAPACITY (not imported for --help)
MAX_STREAM_BUFFER = 1 << 22

if TYPE_CHECKING:  # imported when the command runs, not for --help
    from detnet.controller.cli.process import PipeOutput
    from detnet.controller.config import ControlSettings
    from detnet.engine.core import ProbeEngine
    from detnet.engine.stats import WindowStats
    from detnet.engine.targets import Target

_MAX_CAPACITY = 1 << 22


def _duration_ns(flag: str, text: str) -> int:
    """A duration flag (engine.parse's rule) in ns; CommandError naming the flag."""
    try:
        return parse_duration_ns(text)
    except ParseError as exc:
        raise CommandError(f"{flag} {show(text)}: {exc}") from exc


@dataclass(frozen=True)
class Window:
    """The statistics window: the last ``ns`` nanoseconds or the last ``samples`` probes."""

    ns: int | None
    samples: int | None


def parse_window(text: str) -> Window:
    """``10s`` (time) or ``1000`` (samples)."""
    if text.strip().isdigit():
        n = int(text)
        if n <= 0:
            raise CommandError(f"window {text!r}: needs at least one sample")
        return Window(None, n)
    return Window(_duration_ns("--window", text), None)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `probe` subcommand."""
    p = sub.add_parser(
        "probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="NAME=udp://HOST:PORT or NAME=tcp://HOST:PORT[?mode=connect|echo] (repeatable)",
    )
    p.add_argument("--config", metavar="FILE", help="probe the critical apps of this config")
    p.add_argument("--interval", help="time between probes of a target (default 10ms)")
    p.add_argument("--window", help="statistics window: a time (10s) or a sample count (1000)")
    p.add_argument("--duration", help="stop after this long (default: until SIGINT/SIGTERM)")
    p.add_argument("--timeout", help="a probe with no reply by then is lost (default 1s)")
    p.add_argument(
        "--size", type=int, help="probe packet size in bytes (default 64, or the config's)"
    )
    p.add_argument("--batch", type=int, default=1, help="probes per deadline (UDP, TCP echo)")
    p.add_argument("--poisson", action="store_true", help="Poisson spacing of the probes")
    p.add_argument("--hmac-key-file", metavar="FILE", help="shared secret for probe HMACs")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve /metrics on this address")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument("--stream", action="store_true", help="one JSON line per finished probe")
    p.add_argument(
        "--stream-buffer",
        type=int,
        default=STREAM_BUFFER,
        metavar="N",
        help=f"records --stream holds for a slow reader before dropping ({STREAM_BUFFER})",
    )
    p.set_defaults(func=run)


def _read_key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return read_key_file(path)
    except ParseError as exc:
        raise CommandError(f"--hmac-key-file {show(path)}: {exc}") from exc


def build_targets(args: argparse.Namespace) -> tuple[list[Target], Window]:
    """The targets and the window the flags (and --config) ask for."""
    from dataclasses import replace

    from detnet.engine.targets import parse_target

    if not args.target and not args.config:
        raise CommandError("give at least one --target NAME=URL, or --config FILE")
    interval = _duration_ns("--interval", args.interval) if args.interval else None
    timeout = _duration_ns("--timeout", args.timeout) if args.timeout else None
    window = parse_window(args.window) if args.window else None
    common: dict[str, Any] = {
        "key": _read_key(args.hmac_key_file),
        "poisson": args.poisson,
        "batch": args.batch,
    }
    if args.size is not None:  # checked once, by Target, against the codec's bounds
        common["size"] = args.size
    targets: list[Target] = []
    if args.config:
        from detnet.controller.config import load_config

        cfg = load_config(args.config)
        # The config's own targets, with what the flags set on top of them.
        flags: dict[str, Any] = dict(common)
        if interval:
            flags["interval_ns"] = interval
        if timeout:
            flags["timeout_ns"] = timeout
        targets += [replace(t, **flags) for t in cfg.targets()]
        if window is None:
            window = _config_window(cfg.control)
    for spec in args.target:
        targets.append(
            parse_target(
                spec,
                interval_ns=interval or 10_000_000,
                timeout_ns=timeout or 1_000_000_000,
                **common,
            )
        )
    return targets, window or Window(10 * 10**9, None)


def _config_window(control: ControlSettings) -> Window | None:
    if control.window_samples:
        return Window(None, control.window_samples)
    if control.window_s:
        return Window(round(control.window_s * 1e9), None)
    return None


def _capacity(targets: list[Target], window: Window) -> int:
    # Enough ring slots for the window at the fastest target's rate (plus slack), bounded.
    if window.samples is not None:
        need = window.samples
    else:
        assert window.ns is not None
        need = max(window.ns // t.interval_ns * t.batch for t in targets)
    size = 1 << max(int(need * 1.25) + 64, 1024).bit_length()
    return min(size, _MAX_CAPACITY)


def _ns(v: float | None) -> float | None:
    return v  # unrounded: equal to numpy.percentile on the streamed samples


def summary(engine: ProbeEngine, stats: dict[str, WindowStats]) -> dict[str, Any]:
    """The ``--json`` summary object."""
    out: dict[str, Any] = {}
    totals = engine.totals()
    for name, s in stats.items():
        t = totals.get(name)
        out[name] = {
            "protocol": s.protocol,
            "sent": s.sent,
            "received": s.received,
            "lost": s.lost,
            "duplicates": s.duplicates,
            "reordered": s.reordered,
            "skipped": 0 if t is None else t.skipped,  # send slots the loop missed
            "foreign_replies": 0 if t is None else t.foreign,
            "rtt_ns": {
                "min": _ns(s.rtt_min_ns),
                "p50": _ns(s.rtt_p50_ns),
                "p90": _ns(s.rtt_p90_ns),
                "p99": _ns(s.rtt_p99_ns),
                "max": _ns(s.rtt_max_ns),
            },
            "jitter_iqr_ns": _ns(s.jitter_iqr_ns),
            "jitter_rfc3550_ns": _ns(s.jitter_rfc3550_ns),
            "queue_delay_ns": _ns(s.queue_delay_ns),
            "ipdv_ns": {
                "forward": {"p50": _ns(s.ipdv_fwd_p50_ns), "p99": _ns(s.ipdv_fwd_p99_ns)},
                "backward": {"p50": _ns(s.ipdv_back_p50_ns), "p99": _ns(s.ipdv_back_p99_ns)},
            },
            "timestamp_source": s.timestamp_source,
        }
    return {
        "backend": engine.backend,
        "targets": out,
        "stream_dropped": engine.stream_dropped or 0,  # records --stream had no room for
    }


def silent_targets(engine: ProbeEngine) -> list[str]:
    """One line per target that sent probes and got no reply at all, saying what was seen
    (so that 100 % loss always comes with a reason)."""
    out = []
    for name, t in engine.totals().items():
        if t.sent == 0 or t.received or t.late or t.duplicates:
            continue
        target = engine.targets.get(name)
        url = target.url if target is not None else name
        why = (
            f"{t.foreign} replies that were neither ours nor an echo (see the warning above)"
            if t.foreign
            else "nothing came back: is a detnet reflector or an echo server listening, "
            "and does the path let the probes through?"
        )
        if not t.foreign and target is not None and target.key is not None:
            why += " (a reflector drops probes whose HMAC does not match its key)"
        out.append(f"target {name} ({url}): no reply to {t.sent} probes; {why}")
    return out


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:9.1f}"


def render_table(stats: dict[str, WindowStats]) -> str:
    """The live/final table (times in microseconds)."""
    head = (
        f"{'target':<16} {'proto':<5} {'sent':>7} {'lost':>6} {'p50 us':>9} {'p99 us':>9} "
        f"{'iqr us':>9} {'queue us':>9} {'src':<6}"
    )
    rows = [head]
    for name, s in stats.items():
        rows.append(
            f"{name:<16} {s.protocol:<5} {s.sent:>7} {s.lost:>6} {_us(s.rtt_p50_ns):>9} "
            f"{_us(s.rtt_p99_ns):>9} {_us(s.jitter_iqr_ns):>9} {_us(s.queue_delay_ns):>9} "
            f"{s.timestamp_source:<6}"
        )
    return "\n".join(rows)


async def _probe(args: argparse.Namespace, out: PipeOutput) -> int:
    import asyncio
    import contextlib

    from detnet.controller.cli.process import StopSignals
    from detnet.engine.core import ProbeEngine
    from detnet.engine.httpserver import MetricsServer
    from detnet.engine.stream import SampleStream

    targets, window = build_targets(args)
    duration = _duration_ns("--duration", args.duration) if args.duration else None
    listen = None
    if args.metrics:
        try:
            listen = parse_address(args.metrics, port_zero=True)
        except ParseError as exc:
            raise CommandError(f"--metrics {show(args.metrics)}: {exc}") from exc
    stop = asyncio.Event()
    out.on_closed = stop.set  # the reader has gone: stop, print nothing more, exit 0
    if not 1 <= args.stream_buffer <= MAX_STREAM_BUFFER:
        raise CommandError(f"--stream-buffer {args.stream_buffer}: not in 1..{MAX_STREAM_BUFFER}")
    stream = None
    if args.stream:
        out.flush()  # the thread writes to the descriptor, after what is buffered
        stream = SampleStream(out.fileno(), capacity=args.stream_buffer, on_closed=out.reader_gone)
    engine = ProbeEngine(
        targets,
        window_ns=window.ns,
        window_samples=window.samples,
        capacity=_capacity(targets, window),
        on_sample=stream,
    )
    server: MetricsServer | None = None
    if listen is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(engine.collector())
        server = MetricsServer(listen[0], listen[1], registry=registry)
    live = out.isatty() and not args.json and not args.stream
    with StopSignals(stop.set) as signals:
        try:
            if stream is not None:
                stream.start()
            await engine.start()
            if server is not None:
                host, port = server.start()
                print(f"detnet probe: metrics on http://{host}:{port}/metrics", file=sys.stderr)
            if duration is not None:
                asyncio.get_running_loop().call_later(duration / 1e9, stop.set)
            while not stop.is_set():
                if live:
                    out.write("\x1b[H\x1b[2J" + render_table(engine.stats()) + "\n")
                    out.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            await engine.aclose()
            if stream is not None:
                stream.close()
            if server is not None:
                server.stop()
    stats = engine.stats()
    for line in silent_targets(engine):
        print(f"detnet probe: {line}", file=sys.stderr)
    if args.json:
        out.write(json.dumps(summary(engine, stats)) + "\n")
    elif not args.stream or out.isatty():
        out.write(render_table(stats) + "\n")
    out.flush()
    return signals.status


def run(args: argparse.Namespace) -> int:
    """Entry point of `detnet probe`: 0 when done, 130 after SIGINT."""
    from detnet.controller.cli.process import PipeOutput
    from detnet.engine import runloop

    return runloop.run(_probe(args, PipeOutput(sys.stdout)))
