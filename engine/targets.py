"""Probe targets: what to probe, how often, and how to spell it on the command line.

``NAME=udp://HOST:PORT`` probes a ``detnet reflect --udp`` reflector, or any UDP echo
server (recognised by itself; ``?mode=echo`` says so up front and asks for no two-step
stamps); ``NAME=tcp://HOST:PORT?mode=connect`` times TCP handshakes (kernel TCP_INFO
RTT), the default for TCP; ``NAME=tcp://HOST:PORT?mode=echo`` times framed probes over
one kept-open connection; ``NAME=icmp://HOST`` pings (ICMP echo, the target's kernel
answers). HOST:PORT follows ``engine.parse``'s one rule (IPv6 in brackets).

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
from detnet.engine.parse import ParseError, parse_address, parse_host, show

Protocol = Literal["udp", "tcp", "icmp"]
Mode = Literal["auto", "connect", "echo"]

PROTOCOLS: tuple[Protocol, ...] = ("udp", "tcp", "icmp")
# The modes of each protocol, the first its default. UDP: a detnet reflector (two-step
# stamps) or, recognised by itself, a plain echo server; TCP: the handshake, which needs
# only a listening port, or framed probes to a detnet echo server; ICMP: echo only.
MODES: dict[str, tuple[Mode, ...]] = {
    "udp": ("auto", "echo"),
    "tcp": ("connect", "echo"),
    "icmp": ("echo",),
}
TCP_MODES: tuple[Mode, ...] = MODES["tcp"]
DEFAULT_TCP_MODE: Mode = "connect"
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
    port: int = 0  # none for ICMP
    mode: Mode | None = None  # None: the protocol's default (MODES)
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
        if self.protocol not in PROTOCOLS:
            raise TargetFieldError(
                f"target {self.name}: protocol must be udp, tcp or icmp", field="protocol"
            )
        if self.protocol == "icmp":
            if self.port != 0:
                raise TargetFieldError(f"target {self.name}: icmp has no port", field="port")
        elif isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise TargetFieldError(
                f"target {self.name}: port {show(self.port)} is not in 1..65535", field="port"
            )
        modes = MODES[self.protocol]
        if self.mode is None:
            object.__setattr__(self, "mode", modes[0])
        elif self.mode not in modes:
            raise TargetFieldError(
                f"target {self.name}: {self.protocol} mode must be {' or '.join(modes)}",
                field="mode",
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
        if self.protocol == "icmp" and self.key is not None:
            raise TargetFieldError(
                f"target {self.name}: icmp probes carry no HMAC (the target's kernel answers them)",
                field="key",
            )
        low, high = probe_size_range(keyed=self.key is not None)
        if self.protocol == "icmp":
            low = native.ICMP_MIN_SIZE
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
        if self.protocol == "icmp":
            return f"icmp://{host}"
        shown = self.protocol == "tcp" or self.mode != MODES[self.protocol][0]
        suffix = f"?mode={self.mode}" if shown else ""
        return f"{self.protocol}://{host}:{self.port}{suffix}"


def parse_target(spec: str, **defaults: object) -> Target:
    """Parse ``NAME=udp://HOST:PORT[?mode=auto|echo]``,
    ``NAME=tcp://HOST:PORT[?mode=connect|echo]`` or ``NAME=icmp://HOST``.

    ``defaults`` fill the remaining Target fields (interval_ns, timeout_ns, size, key...).
    """
    where = f"target {show(spec)}"
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise TargetError(
            f"{where}: expected NAME=udp://HOST:PORT, NAME=tcp://HOST:PORT or NAME=icmp://HOST"
        )
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in PROTOCOLS:
        raise TargetError(f"{where}: scheme must be udp://, tcp:// or icmp://")
    address, _, query = rest.partition("?")
    address = address.removesuffix("/")
    if "#" in rest or "/" in address:
        raise TargetError(f"{where}: unexpected path or fragment in the URL")
    port = 0
    try:
        if scheme == "icmp":
            host = _icmp_host(address)
        else:
            host, port = parse_address(address, port_zero=False, host_required=True)
    except ParseError as exc:
        raise TargetError(f"{where}: {exc}") from exc
    options = parse_qs(query, keep_blank_values=True)
    unknown = set(options) - {"mode"}
    if unknown:
        raise TargetError(f"{where}: unknown option(s) {', '.join(sorted(map(show, unknown)))}")
    mode: object = None
    if "mode" in options:
        modes = MODES[scheme]
        mode = options["mode"][-1]
        if mode not in modes:
            raise TargetError(
                f"{where}: {scheme} mode must be {' or '.join(modes)}, not {show(mode)}"
            )
    return Target(
        name=name,
        protocol=scheme,
        host=host,
        port=port,
        mode=mode,  # type: ignore[arg-type]
        **defaults,  # type: ignore[arg-type]
    )


def _icmp_host(address: str) -> str:
    """An ICMP target's host (``engine.parse``'s host rule): no port; IPv6 bare or in
    brackets."""
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    elif address.count(":") == 1:
        raise ParseError(f"icmp:// takes a host without a port, got {show(address)}")
    return parse_host(address)
