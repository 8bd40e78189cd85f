"""What both native backends share: values, errors and the timestamping plan.

The Cython core and the pure-Python fallback each implement the packet codec and the
sockets (``_core.pyi`` is their contract); the things here are not on the per-packet path
and exist once: the first-foreign-datagram report, the ICMP permission error, and the
choice of kernel timestamping flags (a pure function of the device's ethtool
capabilities, tested with bitmasks) with the two look-ups that feed it: the device a
destination routes through (netlink ``RTM_GETROUTE``) and that device's timestamping
capabilities (``SIOCETHTOOL`` / ``ETHTOOL_GET_TS_INFO``).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

import numpy as np

# SO_TIMESTAMPING flags (linux/net_tstamp.h, stable UAPI).
SOF_TX_HARDWARE = 1 << 0
SOF_TX_SOFTWARE = 1 << 1
SOF_RX_HARDWARE = 1 << 2
SOF_RX_SOFTWARE = 1 << 3
SOF_SOFTWARE = 1 << 4
SOF_RAW_HARDWARE = 1 << 6
SOF_OPT_ID = 1 << 7
SOF_OPT_TSONLY = 1 << 11
SOF_OPT_TX_SWHW = 1 << 14  # both a software and a hardware TX stamp, as two messages

HARDWARE_MODES = ("off", "auto", "on")

# Records the probe sockets write (unaligned, so the Cython core writes C structs).
SENT_DTYPE = np.dtype(
    [("seq", "u8"), ("user_tx_ns", "i8"), ("kernel_tx_ns", "i8"), ("hw_tx_ns", "i8")]
)
REPLY_DTYPE = np.dtype(
    [
        ("seq", "u8"),
        ("session", "u4"),
        ("size", "u4"),
        ("tx_ns", "i8"),
        ("refl_rx_ns", "i8"),
        ("refl_tx_ns", "i8"),
        ("kernel_rx_ns", "i8"),
        ("user_rx_ns", "i8"),
        ("source", "u1"),
        ("kind", "u1"),
        ("refl_source", "u1"),
        ("followup_source", "u1"),
        ("followup_seq", "u8"),
        ("refl_tx_kernel_ns", "i8"),
        ("hw_rx_ns", "i8"),
    ]
)
_HW_RX = SOF_RX_HARDWARE | SOF_RAW_HARDWARE
_HW_TX = SOF_TX_HARDWARE | SOF_RAW_HARDWARE

# The reflector's follow-up wait: its default (a request may ask for another) and bounds.
DEFAULT_WAIT_NS = 20_000_000
MIN_WAIT_NS = 100_000
MAX_WAIT_NS = 1_000_000_000

_SIOCETHTOOL = 0x8946
_ETHTOOL_GET_TS_INFO = 0x41
_TS_INFO = struct.Struct("=IIiI3II3I")  # struct ethtool_ts_info
_IFREQ_SIZE = 40


ICMP_HEADER = 8
ICMP_KINDS = ("auto", "ping", "raw")
ICMP_ECHO: dict[int, tuple[int, int]] = {socket.AF_INET: (8, 0), socket.AF_INET6: (128, 129)}
_ICMP_PROTO: dict[int, int] = {
    socket.AF_INET: socket.IPPROTO_ICMP,
    socket.AF_INET6: socket.IPPROTO_ICMPV6,
}
_SOL_RAW = 255
_ICMP_FILTER = 1
_ICMP6_FILTER = 1
_REFUSED = (errno.EACCES, errno.EPERM)


class IcmpNotPermitted(PermissionError):
    """Neither an unprivileged ping socket nor a raw ICMP socket may be opened."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the one line, without "[Errno 1]"


def icmp_not_permitted_message(*, family: int, tried: str) -> str:
    """The one line that says what to set when ICMP sockets are refused."""
    gid = os.getegid()
    which = "ping socket" if tried == "ping" else "ping or raw socket"
    proto = "ICMPv6" if family == socket.AF_INET6 else "ICMP"
    return (
        f"icmp: not permitted ({proto} {which} refused): set net.ipv4.ping_group_range to "
        f"include gid {gid} (sysctl -w net.ipv4.ping_group_range='{gid} {gid}'; it is per "
        "network namespace and also governs ICMPv6), or grant CAP_NET_RAW"
    )


def open_icmp(family: int, kind: str) -> tuple[socket.socket, str]:
    """Open a ping socket or a raw ICMP socket (``kind`` auto: ping first); say which."""
    if kind not in ICMP_KINDS:
        raise ValueError(f"icmp socket kind {kind!r}: expected one of {', '.join(ICMP_KINDS)}")
    refused: OSError | None = None
    for which, type_ in (("ping", socket.SOCK_DGRAM), ("raw", socket.SOCK_RAW)):
        if kind not in ("auto", which):
            continue
        try:
            return socket.socket(family, type_, _ICMP_PROTO[family]), which
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            refused = exc
    message = icmp_not_permitted_message(family=family, tried=kind)
    raise IcmpNotPermitted(errno.EPERM, message) from refused


def icmp_filter(family: int) -> tuple[int, int, bytes]:
    """The raw socket's kernel filter that passes only echo replies (level, name, value)."""
    reply = ICMP_ECHO[family][1]
    if family == socket.AF_INET:
        return _SOL_RAW, _ICMP_FILTER, struct.pack("=I", ~(1 << reply) & 0xFFFFFFFF)
    words = [0xFFFFFFFF] * 8  # ICMPv6: a set bit blocks the type
    words[reply >> 5] &= ~(1 << (reply & 31)) & 0xFFFFFFFF
    return socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("=8I", *words)


def check_reflector_args(
    *, rate_pps: float, burst: int, batch: int, followup_wait_ns: int, sessions: int
) -> None:
    """The reflector's settings, validated (ValueError says which is wrong)."""
    if rate_pps < 0:
        raise ValueError(f"rate_pps {rate_pps} must be >= 0 (0 = unlimited)")
    if rate_pps > 0 and burst < 1:
        raise ValueError(f"burst {burst} must be >= 1 when rate limiting")
    if not 1 <= batch <= 1024:
        raise ValueError(f"batch {batch} is not in 1..1024")
    if not MIN_WAIT_NS <= followup_wait_ns <= MAX_WAIT_NS:
        raise ValueError(
            f"followup_wait_ns {followup_wait_ns} is not in {MIN_WAIT_NS}..{MAX_WAIT_NS}"
        )
    if not 1 <= sessions <= 65536:
        raise ValueError(f"sessions {sessions} is not in 1..65536")


@dataclass(frozen=True)
class ForeignDatagram:
    """The first datagram a probe socket received that was neither ours nor an echo."""

    size: int  # its real length in bytes (also when longer than the probe)
    source: tuple[str, int] | None  # (host, port) it came from; port 0 for ICMP
    prefix: bytes  # its first bytes (at most 16)

    def describe(self) -> str:
        """``"1400 bytes from 198.18.0.2:7000, starting 48656c6c6f"``."""
        where = f"{self.source[0]}:{self.source[1]}" if self.source else "an unknown source"
        return f"{self.size} bytes from {where}, starting {self.prefix.hex() or '(empty)'}"


def foreign_datagram(*, data: bytes, size: int, address: object) -> ForeignDatagram:
    """Build the report from what recvmsg gave (called once per socket)."""
    source = None
    if isinstance(address, tuple) and len(address) >= 2:
        source = (str(address[0]), int(address[1]))
    return ForeignDatagram(size=size, source=source, prefix=bytes(data[:16]))


@dataclass(frozen=True)
class TimestampPlan:
    """Which kernel timestamps a socket asks for, and why."""

    flags: int  # the SO_TIMESTAMPING value
    hardware: bool  # hardware stamps requested (each packet falls back to software)
    device: str | None  # the device the plan was made for, when known
    reason: str  # one line for logs


def plan_timestamping(
    *, want: str, caps: int | None, device: str | None, tx: bool
) -> TimestampPlan:
    """Choose SO_TIMESTAMPING flags from the device's capabilities (pure).

    ``want``: "off" (software only), "auto" (hardware when ``caps`` from ethtool report
    hardware TX (if ``tx``) and RX stamps with the raw hardware clock) or "on" (ask for
    hardware stamps whatever the device says; packets without one fall back to
    software). ``caps`` is ethtool's ``so_timestamping`` mask, None when unknown.
    """
    if want not in HARDWARE_MODES:
        raise ValueError(
            f"hardware timestamps {want!r}: expected one of {', '.join(HARDWARE_MODES)}"
        )
    flags = SOF_RX_SOFTWARE | SOF_SOFTWARE
    if tx:
        flags |= SOF_TX_SOFTWARE | SOF_OPT_ID | SOF_OPT_TSONLY
    need = _HW_RX | (_HW_TX if tx else 0)
    where = device or "the route's device (unknown)"
    capable = caps is not None and caps & need == need
    if want == "off":
        return TimestampPlan(flags, False, device, "software timestamps (hardware off)")
    if want == "auto" and not capable:
        said = "is unknown" if caps is None else "reports no hardware timestamping"
        return TimestampPlan(flags, False, device, f"software timestamps: {where} {said}")
    flags |= _HW_RX
    if tx:
        flags |= _HW_TX | SOF_OPT_TX_SWHW
    if capable:
        reason = f"hardware timestamps on {where} (software for packets without one)"
    else:
        reason = f"hardware timestamps requested, but {where} reports none: software per packet"
    return TimestampPlan(flags, True, device, reason)


def device_caps(device: str) -> int | None:
    """ethtool's ``so_timestamping`` mask of ``device`` (ETHTOOL_GET_TS_INFO), None on error."""
    name = device.encode()
    if not name or len(name) >= 16:
        return None
    info = array.array("B", _TS_INFO.pack(_ETHTOOL_GET_TS_INFO, *([0] * 10)))
    address, _ = info.buffer_info()
    ifreq = struct.pack("16sP", name, address).ljust(_IFREQ_SIZE, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
    except OSError:
        return None
    caps: int = _TS_INFO.unpack(info.tobytes())[1]
    return caps


_RTM_GETROUTE = 26
_NLMSG_ERROR = 2
_RTA_DST = 1
_RTA_OIF = 4
_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")


def route_device(host: str) -> str | None:
    """The device the kernel routes ``host`` (an IP address) through, None when unknown."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        dst = socket.inet_pton(family, host.split("%")[0])
        body = _RTMSG.pack(family, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0)
        body += _RTA.pack(_RTA.size + len(dst), _RTA_DST) + dst
        request = _NLMSG.pack(_NLMSG.size + len(body), _RTM_GETROUTE, 1, 1, 0) + body
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(1.0)
            sock.send(request)
            reply = sock.recv(65536)
        length, kind = _NLMSG.unpack_from(reply)[:2]
        if kind == _NLMSG_ERROR or length > len(reply):
            return None
        offset = _NLMSG.size + _RTMSG.size
        while offset + _RTA.size <= length:
            rta_len, rta_type = _RTA.unpack_from(reply, offset)
            if rta_len < _RTA.size:
                return None
            if rta_type == _RTA_OIF:
                return socket.if_indextoname(struct.unpack_from("=I", reply, offset + 4)[0])
            offset += (rta_len + 3) & ~3
    except (OSError, ValueError, struct.error):
        return None
    return None


def timestamp_plan(*, want: str, host: str | None, device: str | None, tx: bool) -> TimestampPlan:
    """Look up the device (given, or the route to ``host``) and plan its timestamps."""
    if want not in HARDWARE_MODES:
        return plan_timestamping(want=want, caps=None, device=device, tx=tx)  # raises
    if want == "off":
        return plan_timestamping(want=want, caps=None, device=device, tx=tx)
    if device is None and host is not None:
        device = route_device(host)
    caps = device_caps(device) if device is not None else None
    return plan_timestamping(want=want, caps=caps, device=device, tx=tx)
