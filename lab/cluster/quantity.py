"""A Kubernetes quantity (``80M``, ``1.5Gi``, ``2e6``) as Cilium's bandwidth manager reads
``kubernetes.io/egress-bandwidth``: sans-I/O, for the stand-in (``cilium.py``).

Cilium (``pkg/datapath/linux/bandwidth``: ``GetBytesPerSec``) calls apimachinery's
``resource.ParseQuantity`` and takes ``Value() / 8``: the quantity is in bit/s, rounded
up to a whole number of bits (``Value()`` rounds up), then divided down to bytes. The
grammar is apimachinery's: an optional sign, a decimal number, and one suffix, either
binary (``Ki Mi Gi Ti Pi Ei``), decimal SI (``n u m "" k M G T P E``) or a decimal
exponent (``e3``, ``E-2``). Anything else does not parse, and then Cilium removes the
pod's limit (``pkg/endpoint/events.go``: a parse error leaves ``bwmUpdateNeeded`` false
and the endpoint's entry is deleted). A rate of 0 is no limit either: the datapath
(``bpf/lib/edt.h``) skips an entry whose ``bps`` is 0. A negative quantity parses, and
its ``Value() / 8`` turned into an unsigned 64-bit number is a rate no link reaches: no
limit in practice, which is what ``bytes_per_second`` says.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MAX_QUANTITY_CHARS = 64  # a bandwidth annotation is a few characters; bound the parser

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_EXPONENT = re.compile(r"[eE][+-]?[0-9]+")


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity."""


def parse_quantity(text: str) -> Decimal:
    """The exact value of a quantity (``"80M"`` -> 80000000); QuantityError if it is none."""
    if not text or len(text) > MAX_QUANTITY_CHARS:
        raise QuantityError("empty or too long")
    m = _NUMBER.match(text)
    if m is None:
        raise QuantityError("no number")
    number, suffix = m.group(0), text[m.end() :]
    try:
        value = Decimal(number)
    except InvalidOperation as exc:  # cannot happen after the regex; kept as a guard
        raise QuantityError("bad number") from exc
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    if suffix in _DECIMAL:
        return value.scaleb(_DECIMAL[suffix])
    if _EXPONENT.fullmatch(suffix):
        exponent = int(suffix[1:])
        if abs(exponent) > 1000:  # apimachinery caps the scale too; bound Decimal's work
            raise QuantityError("exponent out of range")
        return value.scaleb(exponent)
    raise QuantityError(f"unknown suffix {suffix!r}")


@dataclass(frozen=True)
class EgressLimit:
    """What Cilium makes of an annotation value: a rate in bytes/s, or None (no limit),
    and why (``limit``, ``absent``, ``unparsable``, ``zero``, ``negative``)."""

    bytes_per_s: int | None
    reason: str


def egress_limit(annotation: str | None) -> EgressLimit:
    """The egress rate Cilium enforces for an annotation value (module docstring)."""
    if not annotation:
        return EgressLimit(None, "absent")
    try:
        bits = parse_quantity(annotation)
    except QuantityError:
        return EgressLimit(None, "unparsable")
    if bits < 0:
        return EgressLimit(None, "negative")
    rate = math.ceil(bits) // 8
    return EgressLimit(rate, "limit") if rate > 0 else EgressLimit(None, "zero")
