"""Interface byte counters from ``/proc/PID/net/dev`` text, and the step between two
readings of one counter (wraps, resets), sans-I/O.

``/proc/PID/net/dev`` lists the interfaces of the network namespace that process lives
in: two header lines, then ``<name>: <16 numbers>`` per interface, receive bytes first
and transmit bytes ninth. Interface names cannot contain ``:`` or whitespace (the kernel
refuses them), so the first ``:`` ends the name (old kernels wrote no space after it).
A pod's egress is what its interfaces transmit, its ingress what they receive; ``lo``
never leaves the pod and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_NET_DEV_BYTES = 64 * 1024  # ~130 bytes per interface: hundreds of interfaces
MAX_INTERFACES = 256
LOOPBACK = "lo"
COUNTER_MODULUS = 1 << 64
# A 64-bit counter is read as wrapped only from its upper half: a reset (the counter
# restarted from 0 when the interface was recreated) of a counter below 2**63 (8 EB)
# can never be taken for a wrap.
_WRAP_FROM = 1 << 63


class NetDevError(ValueError):
    """A ``/proc/PID/net/dev`` text that does not parse; the message says why."""


def parse_net_dev(data: bytes) -> dict[str, tuple[int, int]]:
    """``{interface: (rx_bytes, tx_bytes)}`` of every interface, ``lo`` included."""
    if len(data) >= MAX_NET_DEV_BYTES:
        raise NetDevError(f"larger than {MAX_NET_DEV_BYTES} bytes: may be cut short")
    lines = data.split(b"\n")
    if len(lines) < 2 or b"|" not in lines[0] or b"|" not in lines[1]:
        raise NetDevError("no /proc/net/dev header")
    out: dict[str, tuple[int, int]] = {}
    for line in lines[2:]:
        if not line.strip():
            continue
        name, sep, rest = line.partition(b":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            raise NetDevError(f"line {line[:60]!r}: expected 'name: 16 counters'")
        try:
            rx, tx = int(fields[0]), int(fields[8])
        except ValueError as exc:
            raise NetDevError(f"line {line[:60]!r}: counters are not integers") from exc
        if rx < 0 or tx < 0 or rx >= COUNTER_MODULUS or tx >= COUNTER_MODULUS:
            raise NetDevError(f"line {line[:60]!r}: counters out of range")
        key = name.strip().decode("ascii", "replace")
        if not key or key in out:
            raise NetDevError(f"line {line[:60]!r}: missing or repeated interface name")
        out[key] = (rx, tx)
        if len(out) > MAX_INTERFACES:
            raise NetDevError(f"more than {MAX_INTERFACES} interfaces")
    return out


def pod_interfaces(counters: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The interfaces whose traffic leaves or enters the pod: all but ``lo``."""
    return {name: c for name, c in counters.items() if name != LOOPBACK}


def counter_delta(prev: int, cur: int, *, limit: float) -> int | None:
    """Bytes counted between two readings of one 64-bit counter, at most ``limit``;
    None when the step cannot be known: the counter went down (a reset: the interface
    was recreated), or it moved by more than ``limit`` (no link is that fast: a reading
    from something else)."""
    if cur >= prev:
        step = cur - prev
    elif prev >= _WRAP_FROM:
        step = cur + COUNTER_MODULUS - prev
    else:
        return None
    return step if step <= limit else None
