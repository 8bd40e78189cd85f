"""The parsers for values that the config file, the command line and the lab all read.

One rule per kind of value, so a duration, an address or a key file means the same in
``detnet control``'s YAML, on ``detnet probe``'s and ``detnet reflect``'s flags, in a
probe target's URL (``engine.targets``) and in the lab's traffic tools. It lives in the
engine, which every other package may import, and imports nothing of ours:

- **durations**: a number with an optional unit, ``ns``, ``us`` (or ``µs``), ``ms``,
  ``s``, ``m``, ``h``; a bare number is seconds (``0.5``, ``"250ms"``, ``1.5s``, ``2m``);
- **addresses**: ``HOST:PORT``; ``:PORT`` is every interface (where one listens), IPv6
  goes in brackets (``[::1]:9108``); a bare IPv6 address without brackets is refused,
  being ambiguous; port 0 ("pick a free one") only where the caller allows it;
- **host names**: an IP address or a DNS name (letters, digits, ``-``, dot-separated);
- **HMAC key files**: the file's bytes with trailing CR/LF bytes removed (editors and
  ``echo`` add them; nothing else is stripped, so binary keys keep their other bytes);
  at most 4 KiB.

Each raises ParseError with a message that says what is wrong but not where: the caller
prefixes the file and line, or the flag. ``show()`` quotes a user's value for such a
message (a short, escaped prefix: a 10 MB value never makes a 10 MB line) and
``escape()`` makes user text safe for a one-line text log.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

SHOW_LIMIT = 80  # characters of a bad value that an error message quotes
KEY_FILE_MAX = 4096  # bytes; HMAC-SHA256 hashes longer keys down to 32 bytes anyway
MAX_DURATION_NS = 366 * 86_400 * 10**9  # a year: beyond that no value is meant

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 MICRO SIGN
    "μs": 1_000,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
# Bounded digit counts: a duration is never a thousand-digit number, and the exponent
# stays small enough that Decimal arithmetic on it is instant.
_DURATION = re.compile(
    r"\s*(?P<num>[-+]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][-+]?[0-9]{1,3})?)"
    r"\s*(?P<unit>ns|us|µs|μs|ms|s|m|h)?\s*"
)
_DURATION_MAX_CHARS = 80
_DURATION_HINT = "must be a duration like 250ms or 1.5s"
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class ParseError(ValueError):
    """A malformed value; the message says what is wrong, the caller says where."""


# ----------------------------------------------------------------------- user text


def escape(text: str) -> str:
    """``text`` with every non-printable character (controls, newlines, ANSI escapes,
    bidi overrides, odd spaces) written as a backslash escape: one line, as it reads."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def show(value: object, *, limit: int = SHOW_LIMIT) -> str:
    """A user's value for an error message: strings quoted, escaped and cut to ``limit``
    characters (saying how long they were), numbers and booleans as YAML writes them."""
    if isinstance(value, str):
        cut = value[:limit]
        quoted = '"' + escape(cut.replace("\\", "\\\\").replace('"', '\\"')) + '"'
        return quoted if len(cut) == len(value) else f"{quoted}... ({len(value)} characters)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 128:  # str() of a huge int is slow, and unreadable
            return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return escape(str(value)[:limit])


# ----------------------------------------------------------------------- durations


def parse_duration_ns(
    value: str | int | float, *, min_ns: int = 1, max_ns: int = MAX_DURATION_NS
) -> int:
    """Whole nanoseconds from ``"250ms"``, ``"1.5s"``, ``"2m"``, ``100us`` or a bare
    number of seconds (str, int or float), within ``min_ns..max_ns``."""
    if isinstance(value, bool):
        raise ParseError(_DURATION_HINT)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParseError(_DURATION_HINT)
        number, unit = Decimal(repr(value)), "s"
    elif isinstance(value, int):
        number, unit = Decimal(value), "s"
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value) if len(value) <= _DURATION_MAX_CHARS else None
        if m is None:
            raise ParseError(_DURATION_HINT)
        try:
            number = Decimal(m.group("num"))
        except InvalidOperation as exc:  # the pattern admits only decimals; be sure
            raise ParseError(_DURATION_HINT) from exc
        unit = m.group("unit") or "s"
    else:
        raise ParseError(_DURATION_HINT)
    ns = number * _UNIT_NS[unit]
    if ns <= 0:
        raise ParseError("must be a positive duration")
    # Compare before converting: int() of 1e300 s in ns would be a 300-digit number.
    if ns > max_ns:
        raise ParseError(f"must be at most {format_duration_ns(max_ns)}")
    if ns < min_ns:
        raise ParseError(f"must be at least {format_duration_ns(min_ns)}")
    return int(ns.to_integral_value(rounding=ROUND_HALF_EVEN))


def format_duration_ns(ns: int) -> str:
    """A duration that ``parse_duration_ns`` reads back exactly: ``2m``, ``1.5s``,
    ``250ms``, ``0.1ms``, ``500ns``."""
    for unit in ("h", "m", "s"):
        if ns % _UNIT_NS[unit] == 0:
            return f"{ns // _UNIT_NS[unit]}{unit}"
    for unit in ("s", "ms", "us"):
        if ns >= _UNIT_NS[unit]:
            exact = (Decimal(ns) / _UNIT_NS[unit]).normalize()
            return f"{exact:f}{unit}"
    return f"{ns}ns"


# ----------------------------------------------------------------------- addresses


def parse_host(text: str) -> str:
    """An IP address (IPv6 without brackets here) or a DNS name, as given."""
    if not text:
        raise ParseError("must be an IP address or a DNS name")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return text
    name = text[:-1] if text.endswith(".") else text
    if (
        len(name) > 253
        or not name
        or not all(_DNS_LABEL.fullmatch(label) for label in name.split("."))
    ):
        raise ParseError("must be an IP address or a DNS name")
    return text


def parse_address(text: str, *, port_zero: bool, host_required: bool = False) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) -> (host, port).

    ``port_zero`` allows port 0 (a listener's "pick a free port"); ``host_required``
    refuses ``:PORT`` (a destination: "every interface" is not a place to send to)."""
    low = 0 if port_zero else 1
    form = "expected HOST:PORT (IPv6 as [ADDR]:PORT)"
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ParseError(form)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ParseError("brackets hold an IPv6 address: [ADDR]:PORT") from exc
    elif ":" in host:
        raise ParseError("write IPv6 addresses in brackets: [ADDR]:PORT")
    elif not host:
        if host_required:
            raise ParseError(f"{form}; the host is missing")
        host = "0.0.0.0"
    else:
        try:
            parse_host(host)
        except ParseError as exc:
            raise ParseError(f"{form}; the host {exc}") from exc
    if not _PORT.fullmatch(port_text) or not low <= int(port_text) <= 65535:
        raise ParseError(f"{form} with a port from {low} to 65535")
    return host, int(port_text)


# ------------------------------------------------------------------------ key files


def read_key_file(path: str | Path) -> bytes:
    """The shared HMAC secret: the file's bytes without trailing CR/LF, 1..4096 bytes."""
    try:
        # Non-blocking: a FIFO with no writer reads as empty instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            # A key plus a trailing CR/LF, and one byte more to see that there is more.
            data = f.read(KEY_FILE_MAX + 3)
    except OSError as exc:
        raise ParseError(f"cannot read: {exc.strerror or exc}") from exc
    key = data.rstrip(b"\r\n")
    if len(data) > KEY_FILE_MAX + 2 or len(key) > KEY_FILE_MAX:
        raise ParseError(f"larger than {KEY_FILE_MAX} bytes; a key is 32 random bytes")
    if not key:
        raise ParseError("the file is empty")
    return key
