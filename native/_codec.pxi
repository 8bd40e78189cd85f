# Included by _core.pyx: the probe packet codec (docs/protocol.md). Mirrors _py_codec.py:
# the same checks in the same order, the same codes and messages.

cdef enum:
    C_MAGIC = 0x44544E54
    C_VERSION = 1
    C_VERSION2 = 2
    C_HEADER = 48
    C_HMAC = 16
    C_EXT = 16
    C_TWO_STEP_MIN = 64  # C_HEADER + C_EXT
    C_MAX = 9000
    C_REPLY = 0x01
    C_HMACF = 0x02
    C_FOLLOWUP = 0x04
    C_CAP_MAGIC = 0x44545332
    C_CAP_TWO_STEP = 0x0001
    C_WAIT_UNIT = 100000
    TS_USER_C = 0
    TS_KERNEL_C = 1
    TS_HARDWARE_C = 2
    TS_UNKNOWN_C = 0xFF
    FU_NONE = 0
    FU_KERNEL = 1
    FU_HARDWARE = 2
    FU_LOST = 3
    K_REPLY = 0
    K_REPLY2 = 1
    K_FOLLOWUP = 2
    K_ECHO = 3


# Validation results, in the order the checks run (_py_codec.py has the same numbers).
cdef enum Check:
    OK = 0
    E_SHORT
    E_LONG
    E_MAGIC
    E_VERSION
    E_FLAGS
    E_LENGTH
    E_RESERVED
    E_HMAC_SHORT
    E_V2_REQUEST
    E_V2_SHORT
    E_V2_SOURCE
    E_V2_NOSTAMP
    E_V2_LOST
    E_V2_FOLLOWUP
    E_HMAC_NOKEY       # first of the HMAC failures (counted as bad_hmac)
    E_HMAC_MISSING
    E_HMAC_BAD


class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""


class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""


cdef inline int64_t _clock(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uint64_t _ld64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef inline uint32_t _ld32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)


cdef inline uint16_t _ld16(const uint8_t* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)


cdef inline void _st64(uint8_t* p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline void _st32(uint8_t* p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)


cdef inline void _st16(uint8_t* p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)


cdef inline uint8_t _known_flags(uint8_t version) noexcept nogil:
    return C_REPLY | C_HMACF | (C_FOLLOWUP if version == C_VERSION2 else 0)


cdef inline Check _check_header(const uint8_t* p, Py_ssize_t n, header_t* h) noexcept nogil:
    """Structural validation (everything but the HMAC value)."""
    cdef Py_ssize_t hmac_len
    h.rx_source = 0
    h.followup_source = 0
    h.followup_seq = 0
    h.followup_tx_ns = 0
    if n < C_HEADER:
        return E_SHORT
    if n > C_MAX:
        return E_LONG
    h.magic = _ld32(p)
    h.version = p[4]
    h.flags = p[5]
    h.length = _ld16(p + 6)
    h.session = _ld32(p + 8)
    h.reserved = _ld32(p + 12)
    h.seq = _ld64(p + 16)
    h.tx_ns = _ld64(p + 24)
    h.refl_rx_ns = _ld64(p + 32)
    h.refl_tx_ns = _ld64(p + 40)
    if h.magic != C_MAGIC:
        return E_MAGIC
    if h.version != C_VERSION and h.version != C_VERSION2:
        return E_VERSION
    if h.flags & ~_known_flags(h.version):
        return E_FLAGS
    if h.length != n:
        return E_LENGTH
    if h.reserved & (<uint32_t>0xFFFF if h.version == C_VERSION2 else <uint32_t>0xFFFFFFFF):
        return E_RESERVED
    hmac_len = C_HMAC if h.flags & C_HMACF else 0
    if hmac_len and n < C_HEADER + C_HMAC:
        return E_HMAC_SHORT
    if h.version == C_VERSION:
        return OK
    if not h.flags & C_REPLY:
        return E_V2_REQUEST
    if n < C_TWO_STEP_MIN + hmac_len:
        return E_V2_SHORT
    h.rx_source = p[12]
    h.followup_source = p[13]
    h.followup_seq = _ld64(p + 48)
    h.followup_tx_ns = _ld64(p + 56)
    if h.rx_source > TS_HARDWARE_C or h.followup_source > FU_LOST:
        return E_V2_SOURCE
    if h.followup_source == FU_NONE and (h.followup_seq or h.followup_tx_ns):
        return E_V2_NOSTAMP
    if h.followup_source == FU_LOST and h.followup_tx_ns:
        return E_V2_LOST
    if h.flags & C_FOLLOWUP and (
        h.followup_source == FU_NONE or h.seq != h.followup_seq
        or h.tx_ns or h.refl_rx_ns or h.refl_tx_ns
    ):
        return E_V2_FOLLOWUP
    return OK


cdef inline int _asks_two_step(const uint8_t* p, Py_ssize_t n, uint8_t flags) noexcept nogil:
    """A request's followup_wait units (>= 0) when it asks for two-step stamps, else -1."""
    if flags & C_REPLY or n < C_TWO_STEP_MIN + (C_HMAC if flags & C_HMACF else 0):
        return -1
    if _ld32(p + C_HEADER) != C_CAP_MAGIC or not _ld16(p + C_HEADER + 4) & C_CAP_TWO_STEP:
        return -1
    return _ld16(p + C_HEADER + 6)


cdef bytes _mac(bytes key, const uint8_t* p, Py_ssize_t n):
    """HMAC-SHA256(key, p[:n]) truncated to 16 bytes (hmac.digest is C-implemented)."""
    return _hmac.digest(key, PyBytes_FromStringAndSize(<const char*>p, n), "sha256")[:C_HMAC]


cdef Check _check_hmac(object key, uint8_t flags, const uint8_t* p, Py_ssize_t n) except *:
    cdef bytes mac
    cdef const uint8_t* m
    cdef uint8_t diff = 0
    cdef int i
    if not flags & C_HMACF:
        return E_HMAC_MISSING if key is not None else OK
    if key is None:
        return E_HMAC_NOKEY
    mac = _mac(key, p, n - C_HMAC)
    m = <const uint8_t*>PyBytes_AS_STRING(mac)
    for i in range(C_HMAC):  # constant time: no early exit on the first differing byte
        diff |= m[i] ^ p[n - C_HMAC + i]
    return E_HMAC_BAD if diff else OK


cdef void _sign(bytes key, uint8_t* p, Py_ssize_t n) except *:
    cdef bytes mac = _mac(key, p, n - C_HMAC)
    memcpy(p + n - C_HMAC, PyBytes_AS_STRING(mac), C_HMAC)


cdef object _error(Check code, const header_t* h, Py_ssize_t n):
    """The exception (with reason) for a failed check."""
    if code == E_SHORT:
        return PacketError(f"datagram of {n} bytes is shorter than the {C_HEADER}-byte header")
    if code == E_LONG:
        return PacketError(f"datagram of {n} bytes is longer than the maximum {C_MAX}")
    if code == E_MAGIC:
        return PacketError(f"bad magic {h.magic:#010x} (expected {C_MAGIC:#010x})")
    if code == E_VERSION:
        return PacketError(f"unsupported version {h.version} (expected 1 or 2)")
    if code == E_FLAGS:
        known = _known_flags(h.version) if h.version in (C_VERSION, C_VERSION2) else 0
        return PacketError(f"unknown flag bits {h.flags & ~known:#04x}")
    if code == E_LENGTH:
        return PacketError(f"length field {h.length} does not match the datagram's {n} bytes")
    if code == E_RESERVED:
        return PacketError("reserved field is not zero")
    if code == E_HMAC_SHORT:
        return PacketError(f"HMAC packet of {n} bytes is shorter than {C_HEADER + C_HMAC}")
    if code == E_V2_REQUEST:
        return PacketError("version 2 packet without the REPLY flag (requests are version 1)")
    if code == E_V2_SHORT:
        return PacketError(f"version 2 packet of {n} bytes is shorter than its two-step block")
    if code == E_V2_SOURCE:
        return PacketError(
            f"unknown stamp source (reflector RX {h.rx_source}, follow-up {h.followup_source})"
        )
    if code == E_V2_NOSTAMP:
        return PacketError("follow-up fields set without a stamp source")
    if code == E_V2_LOST:
        return PacketError("a lost stamp carries a timestamp")
    if code == E_V2_FOLLOWUP:
        return PacketError(
            "follow-up packet without a stamp, with another seq, or with reply stamps"
        )
    if code == E_HMAC_NOKEY:
        return HmacError("packet carries an HMAC but no key is configured")
    if code == E_HMAC_MISSING:
        return HmacError("packet has no HMAC but a key is configured")
    return HmacError("HMAC does not match (wrong key or altered packet)")


cdef inline void _write_header(
    uint8_t* p, uint8_t flags, uint16_t size, uint32_t session, uint64_t seq,
    uint64_t tx_ns, uint64_t refl_rx_ns, uint64_t refl_tx_ns,
) noexcept nogil:
    _st32(p, C_MAGIC)
    p[4] = C_VERSION
    p[5] = flags
    _st16(p + 6, size)
    _st32(p + 8, session)
    _st32(p + 12, 0)
    _st64(p + 16, seq)
    _st64(p + 24, tx_ns)
    _st64(p + 32, refl_rx_ns)
    _st64(p + 40, refl_tx_ns)


cdef class Probe:
    """A decoded probe packet (request, reply or follow-up)."""

    cdef readonly int version
    cdef readonly int flags
    cdef readonly int size
    cdef readonly object session
    cdef readonly object seq
    cdef readonly object tx_ns
    cdef readonly object refl_rx_ns
    cdef readonly object refl_tx_ns
    cdef readonly int rx_source
    cdef readonly int followup_source
    cdef readonly object followup_seq
    cdef readonly object followup_tx_ns
    cdef readonly bint two_step
    cdef readonly object followup_wait_ns

    @property
    def is_reply(self):
        """True when the REPLY flag is set (the packet came from a reflector)."""
        return bool(self.flags & C_REPLY)

    @property
    def is_followup(self):
        """True for a version-2 follow-up packet (a late two-step stamp)."""
        return bool(self.flags & C_FOLLOWUP)

    def __repr__(self):
        return (
            f"Probe(version={self.version}, flags={self.flags:#x}, size={self.size}, "
            f"session={self.session}, seq={self.seq}, tx_ns={self.tx_ns}, "
            f"refl_rx_ns={self.refl_rx_ns}, refl_tx_ns={self.refl_tx_ns}, "
            f"rx_source={self.rx_source}, followup_source={self.followup_source}, "
            f"followup_seq={self.followup_seq}, followup_tx_ns={self.followup_tx_ns}, "
            f"two_step={self.two_step}, followup_wait_ns={self.followup_wait_ns})"
        )


cdef Probe _probe(const header_t* h, int wait):
    cdef Probe probe = Probe.__new__(Probe)
    probe.version = h.version
    probe.flags = h.flags
    probe.size = h.length
    probe.session = h.session
    probe.seq = h.seq
    probe.tx_ns = h.tx_ns
    probe.refl_rx_ns = h.refl_rx_ns
    probe.refl_tx_ns = h.refl_tx_ns
    probe.rx_source = h.rx_source
    probe.followup_source = h.followup_source
    probe.followup_seq = h.followup_seq
    probe.followup_tx_ns = h.followup_tx_ns
    probe.two_step = wait >= 0
    probe.followup_wait_ns = (wait if wait > 0 else 0) * C_WAIT_UNIT
    return probe


cdef bytes _checked_key(object key):
    if key is None:
        return None
    if not isinstance(key, bytes):
        raise TypeError("HMAC key must be bytes")
    if not key:
        raise ValueError("HMAC key must not be empty")
    return key


_U64 = (1 << 64) - 1
_MAX_WAIT = 0xFFFF * 100_000  # followup_wait units of C_WAIT_UNIT ns


cdef int _wait_units(object followup_wait_ns) except -1:
    if not 0 <= followup_wait_ns <= _MAX_WAIT:
        raise ValueError(f"followup_wait_ns {followup_wait_ns} is not in 0..{_MAX_WAIT}")
    return -(-followup_wait_ns // C_WAIT_UNIT)


def encode_probe(
    *, session, seq, tx_ns, size=64, key=None, flags=0, refl_rx_ns=0, refl_tx_ns=0,
    version=1, two_step=False, followup_wait_ns=0, rx_source=0, followup_source=0,
    followup_seq=0, followup_tx_ns=0,
):
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed).

    Version 1: a request (``flags`` 0, ``two_step`` adds the capability block) or a
    one-step reply (FLAG_REPLY). Version 2: a two-step reply (FLAG_REPLY) or follow-up
    (FLAG_REPLY | FLAG_FOLLOWUP) with the stamp fields. The result always decodes.
    """
    cdef bytes k = _checked_key(key)
    cdef header_t h
    cdef Check code
    if version not in (C_VERSION, C_VERSION2):
        raise ValueError(f"version {version} is not 1 or 2")
    allowed = C_REPLY if version == C_VERSION else C_REPLY | C_FOLLOWUP
    if flags & ~allowed:
        raise ValueError(f"flags {flags:#x}: only {allowed:#x} may be given (HMAC follows key)")
    if k is not None:
        flags |= C_HMACF
    min_size = C_HEADER + (C_HMAC if k is not None else 0)
    if two_step or version == C_VERSION2:
        min_size = C_TWO_STEP_MIN + (C_HMAC if k is not None else 0)
    if not min_size <= size <= C_MAX:
        raise ValueError(f"probe size {size} is not in {min_size}..{C_MAX}")
    if two_step and (flags & C_REPLY or version != C_VERSION):
        raise ValueError("two_step is asked for by a request (version 1, no FLAG_REPLY)")
    if not 0 <= session <= 0xFFFFFFFF:
        raise ValueError(f"session {session} does not fit in 32 bits")
    for name, value in (
        ("seq", seq), ("tx_ns", tx_ns), ("refl_rx_ns", refl_rx_ns), ("refl_tx_ns", refl_tx_ns),
        ("followup_seq", followup_seq), ("followup_tx_ns", followup_tx_ns),
    ):
        if not 0 <= value <= _U64:
            raise ValueError(f"{name} {value} does not fit in unsigned 64 bits")
    if not (0 <= rx_source <= 0xFF and 0 <= followup_source <= 0xFF):
        raise ValueError("rx_source and followup_source are single bytes")
    cdef int wait = _wait_units(followup_wait_ns)
    cdef Py_ssize_t n = size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memset(p, 0, n)
    _write_header(p, flags, <uint16_t>n, session, seq, tx_ns, refl_rx_ns, refl_tx_ns)
    if version == C_VERSION2:
        p[4] = C_VERSION2
        p[12] = rx_source
        p[13] = followup_source
        _st64(p + 48, followup_seq)
        _st64(p + 56, followup_tx_ns)
    elif rx_source or followup_source or followup_seq or followup_tx_ns:
        raise ValueError("stamp fields need version 2")
    if two_step:
        _st32(p + C_HEADER, C_CAP_MAGIC)
        _st16(p + C_HEADER + 4, C_CAP_TWO_STEP)
        _st16(p + C_HEADER + 6, <uint16_t>wait)
    elif wait:
        raise ValueError("followup_wait_ns needs two_step")
    if k is not None:
        _sign(k, p, n)
    memset(&h, 0, sizeof(h))
    code = _check_header(p, n, &h)
    if code != OK:
        raise ValueError(f"these fields do not make a valid packet: {_error(code, &h, n)}")
    return out


cdef Check _decode(const uint8_t* p, Py_ssize_t n, object key, header_t* h) except *:
    cdef Check code = _check_header(p, n, h)
    if code == OK:
        code = _check_hmac(key, h.flags, p, n)
    return code


def decode_probe(data, *, key=None):
    """Decode and strictly validate a probe; raise PacketError with the reason."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef header_t h
    cdef Py_ssize_t n = view.shape[0]
    cdef Check code
    cdef const uint8_t* p = &view[0] if n else NULL
    memset(&h, 0, sizeof(h))
    code = _decode(p, n, _checked_key(key), &h)
    if code != OK:
        raise _error(code, &h, n)
    return _probe(&h, _asks_two_step(p, n, h.flags))


def make_reply(data, *, rx_ns, tx_ns, key=None):
    """Validate a request and return its one-step reply: same size, REPLY, reflector stamps.

    The reply is built afresh (zero fill), never an echo of the request's payload. It is
    version 1 even when the request asked for two-step stamps (the TCP echo server has
    no per-frame kernel TX stamp to send later).
    """
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef header_t h
    cdef Py_ssize_t n = view.shape[0]
    cdef bytes k = _checked_key(key)
    cdef Check code
    cdef const uint8_t* p = &view[0] if n else NULL
    memset(&h, 0, sizeof(h))
    code = _check_header(p, n, &h)
    if code == OK and (h.flags & C_REPLY or h.refl_rx_ns or h.refl_tx_ns):
        if h.flags & C_REPLY:
            raise PacketError("packet is a reply, not a request (reflection loop refused)")
        raise PacketError("request carries reflector timestamps")
    if code == OK:
        code = _check_hmac(k, h.flags, p, n)
    if code != OK:
        raise _error(code, &h, n)
    return encode_probe(
        session=h.session, seq=h.seq, tx_ns=h.tx_ns, size=n, key=k, flags=C_REPLY,
        refl_rx_ns=rx_ns, refl_tx_ns=tx_ns,
    )


def realtime_ns():
    """clock_gettime(CLOCK_REALTIME) in ns (the kernel timestamps' clock)."""
    return _clock(CLOCK_REALTIME)


def monotonic_ns():
    """clock_gettime(CLOCK_MONOTONIC) in ns (for scheduling)."""
    return _clock(CLOCK_MONOTONIC)


def clock_read_cost_ns(n=10000):
    """Mean cost of one clock_gettime(CLOCK_REALTIME) in ns, over ``n`` reads."""
    cdef long count = n
    cdef long i
    cdef int64_t start
    if count <= 0:
        raise ValueError("n must be positive")
    start = _clock(CLOCK_MONOTONIC)
    for i in range(count):
        _clock(CLOCK_REALTIME)
    return (_clock(CLOCK_MONOTONIC) - start) / <double>count
