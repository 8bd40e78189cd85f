"""Probe targets: what to probe, how often, and how to spell it on the command line.

``NAME=udp://HOST:PORT`` probes a ``detnet reflect --udp`` reflector;
``NAME=tcp://HOST:PORT?mode=connect`` times TCP handshakes (kernel TCP_INFO RTT);
``NAME=tcp://HOST:PORT?mode=echo`` times framed probes over one kept-open connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from detnet.engine.errors import TargetError

Protocol = Literal["udp", "tcp"]
TcpMode = Literal["connect", "echo"]

MAX_BATCH = 1024
MIN_INTERVAL_NS = 100_000  # 0.1 ms: below this the scheduler only measures itself
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class Target:
    """One critical service to probe."""

    name: str
    protocol: Protocol
    host: str
    port: int
    mode: TcpMode = "echo"
    interval_ns: int = 10_000_000
    timeout_ns: int = 1_000_000_000
    size: int = 64
    key: bytes | None = field(default=None, repr=False)
    poisson: bool = False
    batch: int = 1  # probes sent per deadline (one sendmmsg), for high probe rates

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise TargetError(
                f"target name {self.name!r}: use letters, digits, '.', '_' or '-' (max 63)"
            )
        if self.protocol not in ("udp", "tcp"):
            raise TargetError(f"target {self.name}: protocol must be udp or tcp")
        if not 0 < self.port < 65536:
            raise TargetError(f"target {self.name}: port {self.port} is not in 1..65535")
        if self.mode not in ("connect", "echo"):
            raise TargetError(f"target {self.name}: mode must be connect or echo")
        if self.interval_ns < MIN_INTERVAL_NS:
            raise TargetError(f"target {self.name}: interval must be at least 0.1 ms")
        if not 1 <= self.batch <= MAX_BATCH:
            raise TargetError(f"target {self.name}: batch must be 1..{MAX_BATCH}")
        if self.batch > 1 and self.protocol == "tcp" and self.mode == "connect":
            raise TargetError(f"target {self.name}: batch applies to udp and tcp echo only")
        if not 0 < self.size <= 9000:
            raise TargetError(f"target {self.name}: size {self.size} is not in 1..9000 bytes")
        if self.timeout_ns <= 0:
            raise TargetError(f"target {self.name}: timeout must be positive")

    @property
    def url(self) -> str:
        """The target spelled as on the command line (without the name)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = f"?mode={self.mode}" if self.protocol == "tcp" else ""
        return f"{self.protocol}://{host}:{self.port}{suffix}"


def parse_target(spec: str, **defaults: object) -> Target:
    """Parse ``NAME=udp://HOST:PORT`` or ``NAME=tcp://HOST:PORT[?mode=connect|echo]``.

    ``defaults`` fill the remaining Target fields (interval_ns, timeout_ns, size, key...).
    """
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise TargetError(f"target {spec!r}: expected NAME=udp://HOST:PORT or NAME=tcp://HOST:PORT")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetError(f"target {spec!r}: {exc}") from exc
    if parts.scheme not in ("udp", "tcp"):
        raise TargetError(f"target {spec!r}: scheme must be udp:// or tcp://")
    if not parts.hostname or port is None:
        raise TargetError(f"target {spec!r}: needs both a host and a port")
    if parts.path not in ("", "/") or parts.fragment or parts.username:
        raise TargetError(f"target {spec!r}: unexpected path, fragment or user in the URL")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - {"mode"}
    if unknown:
        raise TargetError(f"target {spec!r}: unknown option(s) {', '.join(sorted(unknown))}")
    mode = query.get("mode", ["connect" if parts.scheme == "tcp" else "echo"])[-1]
    if parts.scheme == "udp" and "mode" in query:
        raise TargetError(f"target {spec!r}: mode= applies to tcp:// targets only")
    if mode not in ("connect", "echo"):
        raise TargetError(f"target {spec!r}: mode must be connect or echo, not {mode!r}")
    return Target(
        name=name,
        protocol=parts.scheme,  # type: ignore[arg-type]
        host=parts.hostname,
        port=port,
        mode=mode,  # type: ignore[arg-type]
        **defaults,  # type: ignore[arg-type]
    )
