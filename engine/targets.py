"""Probe targets: what to probe, how often, and how to spell it on the command line.

``NAME=udp://HOST:PORT`` probes a ``detnet reflect --udp`` reflector;
``NAME=tcp://HOST:PORT?mode=connect`` times TCP handshakes (kernel TCP_INFO RTT), the
default for TCP; ``NAME=tcp://HOST:PORT?mode=echo`` times framed probes over one
kept-open connection. HOST:PORT follows ``engine.parse``'s one rule (IPv6 in brackets).

``Target`` is where every field is checked, once: the config (``Config.targets()``) and
the command line build Targets and report its ``TargetError`` as their one-line error.
The probe size is checked against the native codec's own bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs

from detnet import native
from detnet.engine.errors import TargetError
from detnet.engine.parse import ParseError, parse_address, show

Protocol = Literal["udp", "tcp"]
TcpMode = Literal["connect", "echo"]

TCP_MODES: tuple[TcpMode, ...] = ("connect", "echo")
# What a TCP target measures unless told: the handshake, which needs only a listening
# port, not a detnet echo server. UDP targets ignore the mode.
DEFAULT_TCP_MODE: TcpMode = "connect"
DEFAULT_SIZE = 64  # bytes: a header, room for an HMAC trailer, no fragmentation anywhere
MAX_BATCH = 1024
MIN_INTERVAL_NS = 100_000  # 0.1 ms: below this the scheduler only measures itself
# A target's name: a metric label and a policy key, also the config's critical app name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME_RULE = "use letters, digits, '.', '_' or '-' (max 63)"
# A probe target is an app (NAME_PATTERN), or one endpoint of it: APP/POD or APP/ADDRESS
# (':' for IPv6). Apps can never contain '/', so an endpoint's name never collides with one.
TARGET_NAME_PATTERN = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(/[A-Za-z0-9][A-Za-z0-9_.:-]{0,252})?"
)
TARGET_NAME_RULE = f"{NAME_RULE}, or APP/POD, APP/ADDRESS for an endpoint"


class TargetFieldError(TargetError):
    """A Target field out of its range; ``field`` names it (the config points there)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def probe_size_range(*, keyed: bool) -> tuple[int, int]:
    """The probe sizes the native codec encodes: its header (and the HMAC trailer when
    ``keyed``) up to its maximum."""
    return native.MIN_SIZE + (native.HMAC_SIZE if keyed else 0), native.MAX_SIZE


@dataclass(frozen=True)
class Endpoint:
    """What a probe target stands for: an ``app``, and for one replica its ``pod`` and
    ``node`` (None when the target is the app's Service address). Kubernetes names: at
    most 253 characters each."""

    app: str
    node: str | None = None
    pod: str | None = None

    def __post_init__(self) -> None:
        for key, value in (("app", self.app), ("node", self.node), ("pod", self.pod)):
            if value is None and key != "app":
                continue
            if not isinstance(value, str) or not 0 < len(value) <= 253 or not value.isprintable():
                raise TargetFieldError(f"endpoint {key} {show(value)}: not a name", field=key)


@dataclass(frozen=True, kw_only=True)
class Target:
    """One critical service to probe."""

    name: str
    protocol: Protocol
    host: str
    port: int
    mode: TcpMode = DEFAULT_TCP_MODE
    interval_ns: int = 10_000_000
    timeout_ns: int = 1_000_000_000
    size: int = DEFAULT_SIZE
    key: bytes | None = field(default=None, repr=False)
    poisson: bool = False
    batch: int = 1  # probes sent per deadline (one sendmmsg), for high probe rates
    endpoint: Endpoint | None = None  # what it stands for; None: the app named like it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TARGET_NAME_PATTERN.fullmatch(self.name):
            raise TargetFieldError(
                f"target name {show(self.name)}: {TARGET_NAME_RULE}", field="name"
            )
        if self.protocol not in ("udp", "tcp"):
            raise TargetFieldError(
                f"target {self.name}: protocol must be udp or tcp", field="protocol"
            )
        if not 0 < self.port < 65536:
            raise TargetFieldError(
                f"target {self.name}: port {self.port} is not in 1..65535", field="port"
            )
        if self.mode not in TCP_MODES:
            raise TargetFieldError(
                f"target {self.name}: mode must be connect or echo", field="mode"
            )
        if self.interval_ns < MIN_INTERVAL_NS:
            raise TargetFieldError(
                f"target {self.name}: interval must be at least 0.1 ms", field="interval_ns"
            )
        if not 1 <= self.batch <= MAX_BATCH:
            raise TargetFieldError(
                f"target {self.name}: batch must be 1..{MAX_BATCH}", field="batch"
            )
        if self.batch > 1 and self.protocol == "tcp" and self.mode == "connect":
            raise TargetFieldError(
                f"target {self.name}: batch applies to udp and tcp echo only", field="batch"
            )
        low, high = probe_size_range(keyed=self.key is not None)
        if isinstance(self.size, bool) or not low <= self.size <= high:
            with_key = f" (an HMAC key adds {native.HMAC_SIZE})" if self.key is not None else ""
            raise TargetFieldError(
                f"target {self.name}: probe size {show(self.size)} is not in "
                f"{low}..{high} bytes{with_key}",
                field="size",
            )
        if self.timeout_ns <= 0:
            raise TargetFieldError(
                f"target {self.name}: timeout must be positive", field="timeout_ns"
            )

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
    where = f"target {show(spec)}"
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise TargetError(f"{where}: expected NAME=udp://HOST:PORT or NAME=tcp://HOST:PORT")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("udp", "tcp"):
        raise TargetError(f"{where}: scheme must be udp:// or tcp://")
    address, _, query = rest.partition("?")
    if "#" in rest or "/" in address.removesuffix("/"):
        raise TargetError(f"{where}: unexpected path or fragment in the URL")
    try:
        host, port = parse_address(address.removesuffix("/"), port_zero=False, host_required=True)
    except ParseError as exc:
        raise TargetError(f"{where}: {exc}") from exc
    options = parse_qs(query, keep_blank_values=True)
    unknown = set(options) - {"mode"}
    if unknown:
        raise TargetError(f"{where}: unknown option(s) {', '.join(sorted(map(show, unknown)))}")
    mode: object = DEFAULT_TCP_MODE
    if "mode" in options:
        if scheme == "udp":
            raise TargetError(f"{where}: mode= applies to tcp:// targets only")
        mode = options["mode"][-1]
        if mode not in TCP_MODES:
            raise TargetError(f"{where}: mode must be connect or echo, not {show(mode)}")
    return Target(
        name=name,
        protocol=scheme,  # type: ignore[arg-type]
        host=host,
        port=port,
        mode=mode,  # type: ignore[arg-type]
        **defaults,  # type: ignore[arg-type]
    )
