"""The probe packet codec in pure Python (fallback of ``_codec.pxi``; docs/protocol.md).

Validation runs in one fixed order and yields a numeric code, so that this fallback and
the Cython core reject the same datagram for the same reason with the same message
(the parity suite compares them). Requests are always version 1 on the wire; a request
that asks for two-step stamps carries a capability block in its fill, which version-1
reflectors ignore. Replies to such requests are version 2.
"""

from __future__ import annotations

import hmac
import struct

MAGIC = 0x44544E54
VERSION = 1  # requests and one-step replies
VERSION_TWO_STEP = 2  # replies that carry two-step stamps, and follow-ups
HEADER_SIZE = 48
HMAC_SIZE = 16
MIN_SIZE = HEADER_SIZE
MAX_SIZE = 9000
EXT_SIZE = 16  # the two-step block after the header
TWO_STEP_MIN_SIZE = HEADER_SIZE + EXT_SIZE  # + HMAC_SIZE with an HMAC
FLAG_REPLY = 0x01
FLAG_HMAC = 0x02
FLAG_FOLLOWUP = 0x04  # version 2 only: a follow-up packet, not an answer to a request
CAP_MAGIC = 0x44545332  # b"DTS2": a request's fill asks for two-step stamps
CAP_TWO_STEP = 0x0001
WAIT_UNIT_NS = 100_000  # followup_wait is carried in units of 100 us
MAX_WAIT_NS = 0xFFFF * WAIT_UNIT_NS

# Sources of a timestamp (REPLY_DTYPE "source", "refl_source"; SENT_DTYPE "tx_source").
TS_USER = 0
TS_KERNEL = 1
TS_HARDWARE = 2
TS_UNKNOWN = 0xFF  # a version-1 reflector does not say what its refl_rx_ns is
# The stamp a two-step packet carries (REPLY_DTYPE "followup_source").
FOLLOWUP_NONE = 0
FOLLOWUP_KERNEL = 1
FOLLOWUP_HARDWARE = 2
FOLLOWUP_LOST = 3  # the reflector got no kernel TX stamp for followup_seq: use one-step
# Row kinds (REPLY_DTYPE "kind").
KIND_REPLY = 0  # one-step reply (a version-1 reflector, or an untracked session)
KIND_REPLY_2STEP = 1  # version-2 reply: its kernel TX stamp follows later
KIND_FOLLOWUP = 2  # only followup_seq / refl_tx_kernel_ns / followup_source are set
KIND_ECHO = 3  # a verbatim echo of our request (plain echo server, ICMP echo)

_KNOWN_FLAGS = {VERSION: FLAG_REPLY | FLAG_HMAC, VERSION_TWO_STEP: 0x07}
_U64 = (1 << 64) - 1

HEADER = struct.Struct("!IBBHIIQQQQ")
V2_SOURCES = struct.Struct("!BBH")  # at offset 12 of a version-2 packet
EXT = struct.Struct("!QQ")  # at 48 of a version-2 packet: followup_seq, followup_tx_ns
CAPS = struct.Struct("!IHH")  # at 48 of a request: CAP_MAGIC, caps, followup_wait units

# Validation codes, in the order the checks run (the Cython core has the same enum).
OK = 0
E_SHORT = 1
E_LONG = 2
E_MAGIC = 3
E_VERSION = 4
E_FLAGS = 5
E_LENGTH = 6
E_RESERVED = 7
E_HMAC_SHORT = 8
E_V2_REQUEST = 9
E_V2_SHORT = 10
E_V2_SOURCE = 11
E_V2_NOSTAMP = 12
E_V2_LOST = 13
E_V2_FOLLOWUP = 14
E_HMAC_NOKEY = 15  # the first of the HMAC failures (counted as bad_hmac)
E_HMAC_MISSING = 16
E_HMAC_BAD = 17


class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""


class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""


class Fields:
    """The header fields of a datagram, as far as they could be read."""

    __slots__ = (
        "flags",
        "followup_seq",
        "followup_source",
        "followup_tx_ns",
        "length",
        "magic",
        "refl_rx_ns",
        "refl_tx_ns",
        "reserved",
        "rx_source",
        "seq",
        "session",
        "tx_ns",
        "version",
    )

    def __init__(self) -> None:
        self.magic = self.version = self.flags = self.length = self.session = 0
        self.reserved = self.seq = self.tx_ns = self.refl_rx_ns = self.refl_tx_ns = 0
        self.rx_source = self.followup_source = self.followup_seq = self.followup_tx_ns = 0


def check_header(data: bytes | bytearray | memoryview, n: int, f: Fields) -> int:
    """Structural validation (everything but the HMAC value); fills ``f``, returns a code."""
    if n < HEADER_SIZE:
        return E_SHORT
    if n > MAX_SIZE:
        return E_LONG
    (
        f.magic,
        f.version,
        f.flags,
        f.length,
        f.session,
        f.reserved,
        f.seq,
        f.tx_ns,
        f.refl_rx_ns,
        f.refl_tx_ns,
    ) = HEADER.unpack_from(data, 0)
    if f.magic != MAGIC:
        return E_MAGIC
    known = _KNOWN_FLAGS.get(f.version)
    if known is None:
        return E_VERSION
    if f.flags & ~known:
        return E_FLAGS
    if f.length != n:
        return E_LENGTH
    v2 = f.version == VERSION_TWO_STEP
    if f.reserved & (0xFFFF if v2 else 0xFFFFFFFF):
        return E_RESERVED
    hmac_len = HMAC_SIZE if f.flags & FLAG_HMAC else 0
    if hmac_len and n < HEADER_SIZE + HMAC_SIZE:
        return E_HMAC_SHORT
    if not v2:
        return OK
    if not f.flags & FLAG_REPLY:
        return E_V2_REQUEST
    if n < TWO_STEP_MIN_SIZE + hmac_len:
        return E_V2_SHORT
    f.rx_source, f.followup_source = f.reserved >> 24, (f.reserved >> 16) & 0xFF
    f.followup_seq, f.followup_tx_ns = EXT.unpack_from(data, HEADER_SIZE)
    if f.rx_source > TS_HARDWARE or f.followup_source > FOLLOWUP_LOST:
        return E_V2_SOURCE
    if f.followup_source == FOLLOWUP_NONE and (f.followup_seq or f.followup_tx_ns):
        return E_V2_NOSTAMP
    if f.followup_source == FOLLOWUP_LOST and f.followup_tx_ns:
        return E_V2_LOST
    if f.flags & FLAG_FOLLOWUP and (
        f.followup_source == FOLLOWUP_NONE
        or f.seq != f.followup_seq
        or f.tx_ns
        or f.refl_rx_ns
        or f.refl_tx_ns
    ):
        return E_V2_FOLLOWUP
    return OK


def mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """HMAC-SHA256 truncated to HMAC_SIZE bytes."""
    return hmac.digest(key, data, "sha256")[:HMAC_SIZE]


def check_hmac(key: bytes | None, flags: int, data: bytes | bytearray | memoryview, n: int) -> int:
    """The HMAC verdict of a structurally valid datagram (constant-time compare)."""
    if not flags & FLAG_HMAC:
        return E_HMAC_MISSING if key is not None else OK
    if key is None:
        return E_HMAC_NOKEY
    view = memoryview(data)
    ok = hmac.compare_digest(mac(key, view[: n - HMAC_SIZE]), view[n - HMAC_SIZE : n])
    return OK if ok else E_HMAC_BAD


def asks_two_step(data: bytes | bytearray | memoryview, n: int, flags: int) -> int:
    """A request's followup_wait units (>= 0) when it asks for two-step stamps, else -1."""
    if flags & FLAG_REPLY or n < TWO_STEP_MIN_SIZE + (HMAC_SIZE if flags & FLAG_HMAC else 0):
        return -1
    magic, caps, wait = CAPS.unpack_from(data, HEADER_SIZE)
    return wait if magic == CAP_MAGIC and caps & CAP_TWO_STEP else -1


def error(code: int, f: Fields, n: int) -> PacketError:
    """The exception (with its reason) for a failed check."""
    messages = {
        E_SHORT: f"datagram of {n} bytes is shorter than the {HEADER_SIZE}-byte header",
        E_LONG: f"datagram of {n} bytes is longer than the maximum {MAX_SIZE}",
        E_MAGIC: f"bad magic {f.magic:#010x} (expected {MAGIC:#010x})",
        E_VERSION: f"unsupported version {f.version} (expected 1 or 2)",
        E_FLAGS: f"unknown flag bits {f.flags & ~_KNOWN_FLAGS.get(f.version, 0):#04x}",
        E_LENGTH: f"length field {f.length} does not match the datagram's {n} bytes",
        E_RESERVED: "reserved field is not zero",
        E_HMAC_SHORT: f"HMAC packet of {n} bytes is shorter than {HEADER_SIZE + HMAC_SIZE}",
        E_V2_REQUEST: "version 2 packet without the REPLY flag (requests are version 1)",
        E_V2_SHORT: f"version 2 packet of {n} bytes is shorter than its two-step block",
        E_V2_SOURCE: (
            f"unknown stamp source (reflector RX {f.rx_source}, follow-up {f.followup_source})"
        ),
        E_V2_NOSTAMP: "follow-up fields set without a stamp source",
        E_V2_LOST: "a lost stamp carries a timestamp",
        E_V2_FOLLOWUP: "follow-up packet without a stamp, with another seq, or with reply stamps",
    }
    if code == E_HMAC_NOKEY:
        return HmacError("packet carries an HMAC but no key is configured")
    if code == E_HMAC_MISSING:
        return HmacError("packet has no HMAC but a key is configured")
    if code == E_HMAC_BAD:
        return HmacError("HMAC does not match (wrong key or altered packet)")
    return PacketError(messages[code])


class Probe:
    """A decoded probe packet (request, reply or follow-up)."""

    __slots__ = (
        "flags",
        "followup_seq",
        "followup_source",
        "followup_tx_ns",
        "followup_wait_ns",
        "refl_rx_ns",
        "refl_tx_ns",
        "rx_source",
        "seq",
        "session",
        "size",
        "two_step",
        "tx_ns",
        "version",
    )

    def __init__(self, f: Fields, wait: int) -> None:
        self.version = f.version
        self.flags = f.flags
        self.size = f.length
        self.session = f.session
        self.seq = f.seq
        self.tx_ns = f.tx_ns
        self.refl_rx_ns = f.refl_rx_ns
        self.refl_tx_ns = f.refl_tx_ns
        self.rx_source = f.rx_source
        self.followup_source = f.followup_source
        self.followup_seq = f.followup_seq
        self.followup_tx_ns = f.followup_tx_ns
        self.two_step = wait >= 0
        self.followup_wait_ns = max(wait, 0) * WAIT_UNIT_NS

    @property
    def is_reply(self) -> bool:
        """True when the REPLY flag is set (the packet came from a reflector)."""
        return bool(self.flags & FLAG_REPLY)

    @property
    def is_followup(self) -> bool:
        """True for a version-2 follow-up packet (a late two-step stamp)."""
        return bool(self.flags & FLAG_FOLLOWUP)

    def __repr__(self) -> str:
        return (
            f"Probe(version={self.version}, flags={self.flags:#x}, size={self.size}, "
            f"session={self.session}, seq={self.seq}, tx_ns={self.tx_ns}, "
            f"refl_rx_ns={self.refl_rx_ns}, refl_tx_ns={self.refl_tx_ns}, "
            f"rx_source={self.rx_source}, followup_source={self.followup_source}, "
            f"followup_seq={self.followup_seq}, followup_tx_ns={self.followup_tx_ns}, "
            f"two_step={self.two_step}, followup_wait_ns={self.followup_wait_ns})"
        )


def checked_key(key: bytes | None) -> bytes | None:
    """The HMAC key, validated (bytes, not empty) or None."""
    if key is None:
        return None
    if not isinstance(key, bytes):
        raise TypeError("HMAC key must be bytes")
    if not key:
        raise ValueError("HMAC key must not be empty")
    return key


def wait_units(followup_wait_ns: int) -> int:
    """followup_wait_ns as carried in a request (100 us units, rounded up; 0 = default)."""
    if not 0 <= followup_wait_ns <= MAX_WAIT_NS:
        raise ValueError(f"followup_wait_ns {followup_wait_ns} is not in 0..{MAX_WAIT_NS}")
    return -(-followup_wait_ns // WAIT_UNIT_NS)


def two_step_min_size(keyed: bool) -> int:
    """The smallest probe that has room for the two-step block."""
    return TWO_STEP_MIN_SIZE + (HMAC_SIZE if keyed else 0)


def encode_probe(
    *,
    session: int,
    seq: int,
    tx_ns: int,
    size: int = 64,
    key: bytes | None = None,
    flags: int = 0,
    refl_rx_ns: int = 0,
    refl_tx_ns: int = 0,
    version: int = VERSION,
    two_step: bool = False,
    followup_wait_ns: int = 0,
    rx_source: int = 0,
    followup_source: int = 0,
    followup_seq: int = 0,
    followup_tx_ns: int = 0,
) -> bytes:
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed).

    Version 1: a request (``flags`` 0, ``two_step`` adds the capability block) or a
    one-step reply (FLAG_REPLY). Version 2: a two-step reply (FLAG_REPLY) or follow-up
    (FLAG_REPLY | FLAG_FOLLOWUP) with the stamp fields. The result always decodes.
    """
    k = checked_key(key)
    if version not in _KNOWN_FLAGS:
        raise ValueError(f"version {version} is not 1 or 2")
    allowed = FLAG_REPLY if version == VERSION else FLAG_REPLY | FLAG_FOLLOWUP
    if flags & ~allowed:
        raise ValueError(f"flags {flags:#x}: only {allowed:#x} may be given (HMAC follows key)")
    if k is not None:
        flags |= FLAG_HMAC
    min_size = MIN_SIZE + (HMAC_SIZE if k is not None else 0)
    if two_step or version == VERSION_TWO_STEP:
        min_size = two_step_min_size(k is not None)
    if not min_size <= size <= MAX_SIZE:
        raise ValueError(f"probe size {size} is not in {min_size}..{MAX_SIZE}")
    if two_step and (flags & FLAG_REPLY or version != VERSION):
        raise ValueError("two_step is asked for by a request (version 1, no FLAG_REPLY)")
    if not 0 <= session <= 0xFFFFFFFF:
        raise ValueError(f"session {session} does not fit in 32 bits")
    for name, value in (
        ("seq", seq),
        ("tx_ns", tx_ns),
        ("refl_rx_ns", refl_rx_ns),
        ("refl_tx_ns", refl_tx_ns),
        ("followup_seq", followup_seq),
        ("followup_tx_ns", followup_tx_ns),
    ):
        if not 0 <= value <= _U64:
            raise ValueError(f"{name} {value} does not fit in unsigned 64 bits")
    if not (0 <= rx_source <= 0xFF and 0 <= followup_source <= 0xFF):
        raise ValueError("rx_source and followup_source are single bytes")
    wait = wait_units(followup_wait_ns)
    buf = bytearray(size)
    reserved = 0
    if version == VERSION_TWO_STEP:
        reserved = rx_source << 24 | followup_source << 16
        EXT.pack_into(buf, HEADER_SIZE, followup_seq, followup_tx_ns)
    elif rx_source or followup_source or followup_seq or followup_tx_ns:
        raise ValueError("stamp fields need version 2")
    HEADER.pack_into(
        buf, 0, MAGIC, version, flags, size, session, reserved, seq, tx_ns, refl_rx_ns, refl_tx_ns
    )
    if two_step:
        CAPS.pack_into(buf, HEADER_SIZE, CAP_MAGIC, CAP_TWO_STEP, wait)
    elif wait:
        raise ValueError("followup_wait_ns needs two_step")
    if k is not None:
        buf[size - HMAC_SIZE :] = mac(k, memoryview(buf)[: size - HMAC_SIZE])
    f = Fields()
    code = check_header(buf, size, f)
    if code != OK:
        raise ValueError(f"these fields do not make a valid packet: {error(code, f, size)}")
    return bytes(buf)


def parse(data: bytes | bytearray | memoryview, key: bytes | None) -> Probe:
    """Decode and validate (structure, then HMAC); raise PacketError with the reason."""
    n = len(data)
    f = Fields()
    code = check_header(data, n, f)
    if code == OK:
        code = check_hmac(key, f.flags, data, n)
    if code != OK:
        raise error(code, f, n)
    return Probe(f, asks_two_step(data, n, f.flags))


def decode_probe(data: bytes | bytearray | memoryview, *, key: bytes | None = None) -> Probe:
    """Decode and strictly validate a probe; raise PacketError with the reason."""
    return parse(data, checked_key(key))


def make_reply(
    data: bytes | bytearray | memoryview, *, rx_ns: int, tx_ns: int, key: bytes | None = None
) -> bytes:
    """Validate a request and return its one-step reply: same size, REPLY, reflector stamps.

    The reply is built afresh (zero fill), never an echo of the request's payload. It is
    version 1 even when the request asked for two-step stamps (the TCP echo server has
    no per-frame kernel TX stamp to send later).
    """
    k = checked_key(key)
    n = len(data)
    f = Fields()
    code = check_header(data, n, f)
    if code == OK and (f.flags & FLAG_REPLY or f.refl_rx_ns or f.refl_tx_ns):
        raise PacketError(
            "packet is a reply, not a request (reflection loop refused)"
            if f.flags & FLAG_REPLY
            else "request carries reflector timestamps"
        )
    if code == OK:
        code = check_hmac(k, f.flags, data, n)
    if code != OK:
        raise error(code, f, n)
    return encode_probe(
        session=f.session,
        seq=f.seq,
        tx_ns=f.tx_ns,
        size=n,
        key=k,
        flags=FLAG_REPLY,
        refl_rx_ns=rx_ns,
        refl_tx_ns=tx_ns,
    )
