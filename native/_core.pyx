# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native core in Cython: packet codec, timestamped probe socket, reflector fast path.

Python's ``socket`` module creates, binds and connects sockets; this module then drives
the file descriptor with ``sendmmsg``/``recvmmsg``/``recvmsg(MSG_ERRQUEUE)`` over C
buffers, reads kernel timestamps from control messages and writes numpy records
directly: no Python object per packet (HMAC aside, which calls the C-implemented
``hmac.digest``). Same API as ``_fallback.py``; the contract is ``_core.pyi``.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport (
    EAGAIN,
    ECONNREFUSED,
    EHOSTUNREACH,
    EINTR,
    EINVAL,
    EIO,
    ENETUNREACH,
    ENOPROTOOPT,
    errno,
)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import hmac as _hmac
import os as _os
import socket as _socket

import numpy as np

include "_core.pxi"

cnp.import_array()

__all__ = [
    "FLAG_HMAC",
    "FLAG_REPLY",
    "HEADER_SIZE",
    "HMAC_SIZE",
    "MAGIC",
    "MAX_SIZE",
    "MIN_SIZE",
    "REPLY_DTYPE",
    "SENT_DTYPE",
    "TS_KERNEL",
    "TS_USER",
    "VERSION",
    "HmacError",
    "PacketError",
    "Probe",
    "ProbeSocket",
    "Reflector",
    "clock_read_cost_ns",
    "decode_probe",
    "encode_probe",
    "make_reply",
    "monotonic_ns",
    "realtime_ns",
    "tcp_info_rtt",
]

cdef enum:
    C_MAGIC = 0x44544E54
    C_VERSION = 1
    C_HEADER = 48
    C_HMAC = 16
    C_MAX = 9000
    C_REPLY = 0x01
    C_HMACF = 0x02
    CTRL_SIZE = 256  # room for the RX timestamp cmsg (and the error queue's two)
    MAX_BATCH = 1024  # the kernel's UIO_MAXIOV caps recvmmsg/sendmmsg vectors
    SERVE_ROUNDS = 64  # batches per serve(): a flood must not starve the event loop
    TABLE_SIZE = 4096  # token buckets (a power of two)
    TABLE_PROBES = 8
    GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
    GSO_MAX_SIZE = 1232  # fits any path MTU (IPv6 minimum 1280 - 48 header bytes)

MAGIC = C_MAGIC
VERSION = C_VERSION
HEADER_SIZE = C_HEADER
HMAC_SIZE = C_HMAC
MIN_SIZE = C_HEADER
MAX_SIZE = C_MAX
FLAG_REPLY = C_REPLY
FLAG_HMAC = C_HMACF
TS_USER = 0
TS_KERNEL = 1
RCVBUF_BYTES = 4 << 20  # a probe socket's receive buffer (capped by net.core.rmem_max)

SENT_DTYPE = np.dtype([("seq", "u8"), ("user_tx_ns", "i8"), ("kernel_tx_ns", "i8")])
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
    ]
)
assert SENT_DTYPE.itemsize == sizeof(sent_rec)
assert REPLY_DTYPE.itemsize == sizeof(reply_rec)


class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""


class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""


# Validation results; messages come from _error() so both backends say the same thing.
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
    E_HMAC_NOKEY       # first of the HMAC failures (counted as bad_hmac)
    E_HMAC_MISSING
    E_HMAC_BAD


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


cdef inline void _st64(uint8_t* p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


cdef inline void _st32(uint8_t* p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)


cdef inline void _st16(uint8_t* p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)


cdef inline Check _check_header(const uint8_t* p, Py_ssize_t n, header_t* h) noexcept nogil:
    """Structural validation (everything but the HMAC value)."""
    cdef uint16_t length
    if n < C_HEADER:
        return E_SHORT
    if n > C_MAX:
        return E_LONG
    h.magic = _ld32(p)
    h.version = p[4]
    h.flags = p[5]
    memcpy(&length, p + 6, 2)
    h.length = be16toh(length)
    h.session = _ld32(p + 8)
    h.reserved = _ld32(p + 12)
    h.seq = _ld64(p + 16)
    h.tx_ns = _ld64(p + 24)
    h.refl_rx_ns = _ld64(p + 32)
    h.refl_tx_ns = _ld64(p + 40)
    if h.magic != C_MAGIC:
        return E_MAGIC
    if h.version != C_VERSION:
        return E_VERSION
    if h.flags & ~(C_REPLY | C_HMACF):
        return E_FLAGS
    if h.length != n:
        return E_LENGTH
    if h.reserved != 0:
        return E_RESERVED
    if h.flags & C_HMACF and n < C_HEADER + C_HMAC:
        return E_HMAC_SHORT
    return OK


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
        return PacketError(f"unsupported version {h.version} (expected {C_VERSION})")
    if code == E_FLAGS:
        return PacketError(f"unknown flag bits {h.flags & ~(C_REPLY | C_HMACF):#04x}")
    if code == E_LENGTH:
        return PacketError(f"length field {h.length} does not match the datagram's {n} bytes")
    if code == E_RESERVED:
        return PacketError("reserved field is not zero")
    if code == E_HMAC_SHORT:
        return PacketError(f"HMAC packet of {n} bytes is shorter than {C_HEADER + C_HMAC}")
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
    """A decoded probe packet (request or reply)."""

    cdef readonly int flags
    cdef readonly int size
    cdef readonly object session
    cdef readonly object seq
    cdef readonly object tx_ns
    cdef readonly object refl_rx_ns
    cdef readonly object refl_tx_ns

    @property
    def is_reply(self):
        """True when the REPLY flag is set (the packet came from a reflector)."""
        return bool(self.flags & C_REPLY)

    def __repr__(self):
        return (
            f"Probe(flags={self.flags:#x}, size={self.size}, session={self.session}, "
            f"seq={self.seq}, tx_ns={self.tx_ns}, refl_rx_ns={self.refl_rx_ns}, "
            f"refl_tx_ns={self.refl_tx_ns})"
        )


cdef Probe _probe(const header_t* h):
    cdef Probe probe = Probe.__new__(Probe)
    probe.flags = h.flags
    probe.size = h.length
    probe.session = h.session
    probe.seq = h.seq
    probe.tx_ns = h.tx_ns
    probe.refl_rx_ns = h.refl_rx_ns
    probe.refl_tx_ns = h.refl_tx_ns
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


def encode_probe(
    *, session, seq, tx_ns, size=64, key=None, flags=0, refl_rx_ns=0, refl_tx_ns=0
):
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed)."""
    cdef bytes k = _checked_key(key)
    if flags & ~C_REPLY:
        raise ValueError(f"flags {flags:#x}: only FLAG_REPLY may be given (HMAC follows key)")
    if k is not None:
        flags |= C_HMACF
    min_size = C_HEADER + (C_HMAC if k is not None else 0)
    if not min_size <= size <= C_MAX:
        raise ValueError(f"probe size {size} is not in {min_size}..{C_MAX}")
    if not 0 <= session <= 0xFFFFFFFF:
        raise ValueError(f"session {session} does not fit in 32 bits")
    for name, value in (
        ("seq", seq), ("tx_ns", tx_ns), ("refl_rx_ns", refl_rx_ns), ("refl_tx_ns", refl_tx_ns)
    ):
        if not 0 <= value <= _U64:
            raise ValueError(f"{name} {value} does not fit in unsigned 64 bits")
    cdef Py_ssize_t n = size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* p = <uint8_t*>PyBytes_AS_STRING(out)
    memset(p, 0, n)
    _write_header(p, flags, <uint16_t>n, session, seq, tx_ns, refl_rx_ns, refl_tx_ns)
    if k is not None:
        _sign(k, p, n)
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
    memset(&h, 0, sizeof(h))
    code = _decode(&view[0] if n else NULL, n, _checked_key(key), &h)
    if code != OK:
        raise _error(code, &h, n)
    return _probe(&h)


def make_reply(data, *, rx_ns, tx_ns, key=None):
    """Validate a request and return its reply: same size, REPLY flag, reflector stamps.

    The reply is built afresh (zero fill), never an echo of the request's payload.
    """
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef header_t h
    cdef Py_ssize_t n = view.shape[0]
    cdef bytes k = _checked_key(key)
    cdef Check code
    memset(&h, 0, sizeof(h))
    code = _decode(&view[0] if n else NULL, n, k, &h)
    if code != OK:
        raise _error(code, &h, n)
    if h.flags & C_REPLY:
        raise PacketError("packet is a reply, not a request (reflection loop refused)")
    if h.refl_rx_ns or h.refl_tx_ns:
        raise PacketError("request carries reflector timestamps")
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


cdef inline int64_t _cmsg_rx_ns(msghdr* msg) noexcept nogil:
    """Kernel RX software timestamp from a received message's control data, 0 if none."""
    cdef cmsghdr* c = CMSG_FIRSTHDR(msg)
    cdef timespec ts
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and (
            c.cmsg_type == SCM_TIMESTAMPING or c.cmsg_type == SCM_TIMESTAMPNS
        ):
            memcpy(&ts, CMSG_DATA(c), sizeof(ts))  # ts[0] of scm_timestamping: software
            return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
        c = CMSG_NXTHDR(msg, c)
    return 0


cdef tuple _enable_timestamps(int fd, bint tx):
    """Turn on kernel RX (and TX when asked) software timestamps; return (rx, tx)."""
    cdef int flags = DETNET_SOF_RX_SOFTWARE | DETNET_SOF_SOFTWARE
    cdef int one = 1
    if tx:
        flags |= DETNET_SOF_TX_SOFTWARE | DETNET_SOF_OPT_ID | DETNET_SOF_OPT_TSONLY
    if setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPING, &flags, sizeof(flags)) == 0:
        return True, bool(tx)
    if setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one)) == 0:
        return True, False
    return False, False


cdef object _oserror(int err):
    return OSError(err, _os.strerror(err))


cdef class _Batch:
    """C buffers for up to ``cap`` datagrams of ``slot`` bytes, with mmsghdr vectors."""

    cdef int cap
    cdef Py_ssize_t slot
    cdef uint8_t* data
    cdef uint8_t* ctrl
    cdef sockaddr_storage* names
    cdef iovec* iov
    cdef mmsghdr* msgs
    cdef iovec* tx_iov
    cdef mmsghdr* tx_msgs

    def __cinit__(self, int cap, Py_ssize_t slot):
        cdef int i
        self.cap = cap
        self.slot = slot
        self.data = <uint8_t*>calloc(cap, slot)
        self.ctrl = <uint8_t*>calloc(cap, CTRL_SIZE)
        self.names = <sockaddr_storage*>calloc(cap, sizeof(sockaddr_storage))
        self.iov = <iovec*>calloc(cap, sizeof(iovec))
        self.msgs = <mmsghdr*>calloc(cap, sizeof(mmsghdr))
        self.tx_iov = <iovec*>calloc(cap, sizeof(iovec))
        self.tx_msgs = <mmsghdr*>calloc(cap, sizeof(mmsghdr))
        if (
            self.data == NULL or self.ctrl == NULL or self.names == NULL or self.iov == NULL
            or self.msgs == NULL or self.tx_iov == NULL or self.tx_msgs == NULL
        ):
            raise MemoryError()
        for i in range(cap):
            self.iov[i].iov_base = self.data + i * slot
            self.iov[i].iov_len = slot
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.tx_msgs[i].msg_hdr.msg_iov = &self.tx_iov[i]
            self.tx_msgs[i].msg_hdr.msg_iovlen = 1

    cdef inline void arm_recv(self, int count, bint names) noexcept nogil:
        """Reset the fields recvmmsg overwrites."""
        cdef int i
        for i in range(count):
            self.msgs[i].msg_hdr.msg_name = &self.names[i] if names else NULL
            self.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage) if names else 0
            self.msgs[i].msg_hdr.msg_control = self.ctrl + i * CTRL_SIZE
            self.msgs[i].msg_hdr.msg_controllen = CTRL_SIZE
            self.msgs[i].msg_hdr.msg_flags = 0

    def __dealloc__(self):
        free(self.data)
        free(self.ctrl)
        free(self.names)
        free(self.iov)
        free(self.msgs)
        free(self.tx_iov)
        free(self.tx_msgs)


cdef cnp.ndarray _records(object out, object dtype, Py_ssize_t need):
    if not isinstance(out, np.ndarray):
        raise TypeError("out must be a numpy array")
    cdef cnp.ndarray arr = <cnp.ndarray>out
    if arr.dtype != dtype or arr.ndim != 1:
        raise ValueError(f"out must be a 1-D array of dtype {dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError("out must be C-contiguous and writeable")
    if arr.shape[0] < need:
        raise ValueError(f"out has {arr.shape[0]} records, fewer than {need}")
    return arr


cdef class ProbeSocket:
    """A connected non-blocking UDP socket that sends probes and drains their replies.

    Kernel RX timestamps (SO_TIMESTAMPING software RX, or SO_TIMESTAMPNS) are enabled;
    software TX timestamps too when the kernel offers them (OPT_ID | OPT_TSONLY), read from
    the error queue right after each send so the socket never sits in POLLERR.
    """

    cdef object _sock
    cdef int _fd
    cdef readonly uint32_t session
    cdef readonly int size
    cdef bytes _key
    cdef public bint kernel_rx
    cdef public bint kernel_tx
    cdef public uint64_t invalid
    cdef uint32_t _tskey   # OPT_ID of the next datagram (the kernel counts from 0, wraps)
    cdef _Batch _tx
    cdef _Batch _rx
    cdef uint8_t _errctrl[CTRL_SIZE]

    def __init__(
        self, host, port, *, session, size=64, key=None, bind=None, kernel_timestamps=True
    ):
        self._key = _checked_key(key)
        encode_probe(session=session, seq=0, tx_ns=0, size=size, key=key)  # validates
        self.session = session
        self.size = size
        self.invalid = 0
        self._tskey = 0
        try:
            infos = _socket.getaddrinfo(host, port, type=_socket.SOCK_DGRAM)
        except _socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        sock = _socket.socket(family, _socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # A batch of replies can outgrow the default buffer (~200 KiB of skbs) before
            # the loop drains it: losses that would be ours, not the network's.
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, RCVBUF_BYTES)
            if bind is not None:
                sock.bind(bind)
            sock.connect(addr)
            if kernel_timestamps:
                self.kernel_rx, self.kernel_tx = _enable_timestamps(sock.fileno(), True)
            else:
                self.kernel_rx = self.kernel_tx = False
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._fd = sock.fileno()
        self._tx = _Batch(16, size)
        self._rx = _Batch(16, size)
        self._prepare_tx(self._tx)

    cdef void _prepare_tx(self, _Batch b):
        cdef int i
        for i in range(b.cap):
            _write_header(b.data + i * b.slot, C_HMACF if self._key is not None else 0,
                          <uint16_t>self.size, self.session, 0, 0, 0, 0)
            b.tx_iov[i].iov_base = b.data + i * b.slot
            b.tx_iov[i].iov_len = self.size

    def fileno(self):
        """The socket's file descriptor (for loop.add_reader)."""
        return self._sock.fileno()

    def send(self, first_seq, Py_ssize_t count, out):
        """Send ``count`` probes numbered from ``first_seq`` (one sendmmsg); fill
        ``out[:n]`` (SENT_DTYPE) and return n, the number the kernel took."""
        cdef cnp.ndarray arr = _records(out, SENT_DTYPE, count)
        cdef sent_rec* rec = <sent_rec*>cnp.PyArray_DATA(arr)
        cdef uint64_t seq0 = first_seq & _U64
        cdef int i, r, n
        cdef int64_t now
        cdef uint8_t* p
        if count < 0 or count > MAX_BATCH:
            raise ValueError(f"count {count} is not in 0..{MAX_BATCH}")
        if count == 0:
            return 0
        self._check_open()
        if count > self._tx.cap:
            self._tx = _Batch(count, self.size)
            self._prepare_tx(self._tx)
        n = <int>count
        for i in range(n):
            _st64(self._tx.data + i * self._tx.slot + 16, seq0 + <uint64_t>i)
        # One user-space TX stamp for the batch, read right before the syscall.
        now = _clock(CLOCK_REALTIME)
        for i in range(n):
            p = self._tx.data + i * self._tx.slot
            _st64(p + 24, <uint64_t>now)
            if self._key is not None:
                _sign(self._key, p, self.size)
        r = sendmmsg(self._fd, self._tx.tx_msgs, n, MSG_DONTWAIT)
        if r < 0 and errno == ECONNREFUSED:
            # A stale ICMP error of an earlier probe was reported here; it is consumed now.
            r = sendmmsg(self._fd, self._tx.tx_msgs, n, MSG_DONTWAIT)
        if r < 0:
            if errno == EAGAIN or errno == EINTR or errno == ECONNREFUSED:
                r = 0
            else:
                raise _oserror(errno)
        for i in range(r):
            rec[i].seq = seq0 + <uint64_t>i
            rec[i].user_tx_ns = now
            rec[i].kernel_tx_ns = 0
        if self.kernel_tx:
            self._drain_errqueue(rec, r)
        self._tskey += <uint32_t>r
        return r

    cdef void _drain_errqueue(self, sent_rec* rec, int sent) noexcept:
        """Read every pending TX timestamp; map OPT_ID counters onto rec[:sent]."""
        cdef msghdr msg
        cdef cmsghdr* c
        cdef timespec ts
        cdef detnet_extended_err err
        cdef int64_t stamp
        cdef int64_t key
        cdef uint32_t index
        cdef int guard
        for guard in range(4 * MAX_BATCH):
            memset(&msg, 0, sizeof(msg))
            msg.msg_control = self._errctrl
            msg.msg_controllen = CTRL_SIZE
            if recvmsg(self._fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
                return
            stamp = 0
            key = -1
            c = CMSG_FIRSTHDR(&msg)
            while c != NULL:
                if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPING:
                    memcpy(&ts, CMSG_DATA(c), sizeof(ts))
                    stamp = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
                elif (c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_RECVERR) or (
                    c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_RECVERR
                ):
                    memcpy(&err, CMSG_DATA(c), sizeof(err))
                    if (
                        err.ee_origin == DETNET_SO_EE_ORIGIN_TIMESTAMPING
                        and err.ee_info == DETNET_SCM_TSTAMP_SND
                    ):
                        key = err.ee_data
                c = CMSG_NXTHDR(&msg, c)
            if rec != NULL and key >= 0 and stamp != 0:
                index = <uint32_t>key - self._tskey  # wraps like the kernel's counter
                if index < <uint32_t>sent:
                    rec[index].kernel_tx_ns = stamp

    def recv(self, out):
        """Drain up to len(out) replies (recvmmsg, non-blocking) into ``out`` (REPLY_DTYPE);
        return how many valid replies were written. Invalid ones only bump ``invalid``."""
        cdef cnp.ndarray arr = _records(out, REPLY_DTYPE, 0)
        cdef reply_rec* rec = <reply_rec*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t want = min(arr.shape[0], MAX_BATCH)
        cdef int i, r, n = 0
        cdef int64_t user_rx
        cdef int64_t kernel_rx
        cdef header_t h
        cdef uint8_t* p
        cdef Py_ssize_t length
        cdef msghdr* msg
        if want == 0:
            return 0
        self._check_open()
        if self.kernel_tx:
            self._drain_errqueue(NULL, 0)  # late stamps: keep the socket out of POLLERR
        if want > self._rx.cap:
            self._rx = _Batch(<int>want, self.size)
        self._rx.arm_recv(<int>want, False)
        r = recvmmsg(self._fd, self._rx.msgs, <unsigned int>want, MSG_DONTWAIT, NULL)
        user_rx = _clock(CLOCK_REALTIME)
        if r < 0:
            if errno == EAGAIN or errno == EINTR or errno == ECONNREFUSED:
                return 0
            raise _oserror(errno)
        for i in range(r):
            msg = &self._rx.msgs[i].msg_hdr
            p = self._rx.data + i * self._rx.slot
            length = self._rx.msgs[i].msg_len
            if msg.msg_flags & MSG_TRUNC or _check_header(p, length, &h) != OK:
                self.invalid += 1
                continue
            if not h.flags & C_REPLY or h.session != self.session:
                self.invalid += 1
                continue
            if (self._key is not None or h.flags & C_HMACF) and _check_hmac(
                self._key, h.flags, p, length
            ) != OK:
                self.invalid += 1
                continue
            kernel_rx = _cmsg_rx_ns(msg)
            rec[n].seq = h.seq
            rec[n].session = h.session
            rec[n].size = h.length
            rec[n].tx_ns = <int64_t>h.tx_ns
            rec[n].refl_rx_ns = <int64_t>h.refl_rx_ns
            rec[n].refl_tx_ns = <int64_t>h.refl_tx_ns
            rec[n].kernel_rx_ns = kernel_rx
            rec[n].user_rx_ns = user_rx
            rec[n].source = 1 if kernel_rx != 0 else 0
            n += 1
        return n

    cdef void _check_open(self) except *:
        if self._sock.fileno() < 0:
            raise OSError("probe socket is closed")

    def close(self):
        """Close the socket (idempotent)."""
        self._sock.close()


cdef inline uint32_t _hash(const uint8_t* a) noexcept nogil:
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef int i
    for i in range(16):
        h = (h ^ a[i]) * 16777619u
    return h


cdef class Reflector:
    """The reflector fast path on a bound non-blocking UDP socket.

    Each call to ``serve()`` drains the socket in batches (recvmmsg), drops anything that
    does not parse or fails its HMAC, applies a per-source-address token bucket, stamps
    reflector RX (kernel) and TX, and answers with sendmmsg: never more bytes than came in.
    """

    cdef object _sock
    cdef int _fd
    cdef bytes _key
    cdef double _rate
    cdef double _burst
    cdef int _batch
    cdef _Batch _buf
    cdef bucket_t* _table
    cdef bint _gso
    cdef uint8_t* _gso_ctrl
    cdef int* _src  # reply k answers request _src[k] of the batch
    cdef int* _gcount  # replies carried by sendmmsg message g
    cdef public bint kernel_rx
    cdef readonly uint64_t received
    cdef readonly uint64_t replied
    cdef readonly uint64_t invalid
    cdef readonly uint64_t bad_hmac
    cdef readonly uint64_t rate_limited

    def __init__(self, sock, *, key=None, rate_pps=0.0, burst=32, batch=64):
        self._key = _checked_key(key)
        if rate_pps < 0:
            raise ValueError(f"rate_pps {rate_pps} must be >= 0 (0 = unlimited)")
        if rate_pps > 0 and burst < 1:
            raise ValueError(f"burst {burst} must be >= 1 when rate limiting")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch {batch} is not in 1..{MAX_BATCH}")
        self._rate = rate_pps
        self._burst = burst
        self._batch = batch
        self._sock = sock
        sock.setblocking(False)
        self._fd = sock.fileno()
        self.kernel_rx = _enable_timestamps(self._fd, False)[0]
        self._buf = _Batch(batch, C_MAX)
        self._table = <bucket_t*>calloc(TABLE_SIZE, sizeof(bucket_t))
        self._gso_ctrl = <uint8_t*>calloc(batch, CMSG_SPACE(sizeof(uint16_t)))
        self._src = <int*>calloc(batch, sizeof(int))
        self._gcount = <int*>calloc(batch, sizeof(int))
        if (
            self._table == NULL or self._gso_ctrl == NULL or self._src == NULL
            or self._gcount == NULL
        ):
            raise MemoryError()
        self._gso = True

    def __dealloc__(self):
        free(self._table)
        free(self._gso_ctrl)
        free(self._src)
        free(self._gcount)

    cdef int _group(self, int k, bint gso) noexcept:
        """Lay the k replies out as sendmmsg messages; return how many messages.

        With UDP GSO, consecutive replies of equal (small) size to the same address go
        out as one message the kernel cuts into datagrams of exactly that size: one trip
        down the stack instead of one per reply, and each reply is still its request's
        size. ``_gcount[g]`` says how many replies message g carries.
        """
        cdef _Batch buf = self._buf
        cdef int i, g = -1
        cdef msghdr* m = NULL
        cdef msghdr* req
        cdef cmsghdr* c
        cdef uint16_t seg
        for i in range(k):
            req = &buf.msgs[self._src[i]].msg_hdr
            if (
                gso and g >= 0 and self._gcount[g] < GSO_MAX_SEGMENTS
                and buf.tx_iov[i].iov_len == buf.tx_iov[i - 1].iov_len
                and buf.tx_iov[i].iov_len <= GSO_MAX_SIZE
                and m.msg_namelen == req.msg_namelen
                and memcmp(m.msg_name, req.msg_name, req.msg_namelen) == 0
            ):
                self._gcount[g] += 1
                m.msg_iovlen = self._gcount[g]
                continue
            g += 1
            self._gcount[g] = 1
            m = &buf.tx_msgs[g].msg_hdr
            m.msg_iov = &buf.tx_iov[i]
            m.msg_iovlen = 1
            m.msg_name = req.msg_name
            m.msg_namelen = req.msg_namelen
            m.msg_control = NULL
            m.msg_controllen = 0
            m.msg_flags = 0
        for i in range(g + 1):
            if self._gcount[i] > 1:
                m = &buf.tx_msgs[i].msg_hdr
                m.msg_control = self._gso_ctrl + i * CMSG_SPACE(sizeof(uint16_t))
                m.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                c = CMSG_FIRSTHDR(m)
                c.cmsg_level = SOL_UDP
                c.cmsg_type = UDP_SEGMENT
                c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                seg = <uint16_t>m.msg_iov[0].iov_len
                memcpy(CMSG_DATA(c), &seg, sizeof(seg))
        return g + 1

    cdef bint _allow(self, const sockaddr_storage* src, int64_t now) noexcept nogil:
        """Token bucket of the source address (not port); the stalest slot is evicted."""
        cdef uint8_t addr[16]
        cdef uint32_t h
        cdef bucket_t* b
        cdef bucket_t* victim = NULL
        cdef int i
        memset(addr, 0, 16)
        if src.ss_family == AF_INET:
            addr[10] = 0xFF
            addr[11] = 0xFF
            memcpy(addr + 12, &(<const sockaddr_in*>src).sin_addr, 4)
        elif src.ss_family == AF_INET6:
            memcpy(addr, &(<const sockaddr_in6*>src).sin6_addr, 16)
        h = _hash(addr)
        for i in range(TABLE_PROBES):
            b = &self._table[(h + <uint32_t>i) % <uint32_t>TABLE_SIZE]
            if b.used and memcmp(b.addr, addr, 16) == 0:
                break
            if not b.used:
                victim = b
                b = NULL
                break
            if victim == NULL or b.last_ns < victim.last_ns:
                victim = b
            b = NULL
        if b == NULL:
            b = victim
            memcpy(b.addr, addr, 16)
            b.used = 1
            b.tokens = self._burst
            b.last_ns = now
        b.tokens += (now - b.last_ns) * self._rate / 1e9
        if b.tokens > self._burst:
            b.tokens = self._burst
        b.last_ns = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True
        return False

    def serve(self):
        """Handle every datagram pending now (up to 64 batches); return how many were read."""
        cdef _Batch buf = self._buf
        cdef int i, r, k, total = 0, rounds
        cdef int64_t user_rx, now_mono, tx
        cdef int64_t rx
        cdef header_t h
        cdef uint8_t* p
        cdef Py_ssize_t length, end
        cdef msghdr* msg
        cdef Check code
        cdef bint keyed = self._key is not None
        for rounds in range(SERVE_ROUNDS):
            buf.arm_recv(self._batch, True)
            r = recvmmsg(self._fd, buf.msgs, self._batch, MSG_DONTWAIT, NULL)
            if r < 0:
                if errno == EAGAIN or errno == EINTR:
                    break
                if errno == ECONNREFUSED or errno == EHOSTUNREACH or errno == ENETUNREACH:
                    continue  # a stale ICMP error of an earlier reply, now consumed
                raise _oserror(errno)
            total += r
            self.received += r
            user_rx = _clock(CLOCK_REALTIME)
            now_mono = _clock(CLOCK_MONOTONIC) if self._rate > 0 else 0
            k = 0
            for i in range(r):
                msg = &buf.msgs[i].msg_hdr
                p = buf.data + i * buf.slot
                length = buf.msgs[i].msg_len
                if msg.msg_flags & MSG_TRUNC:
                    self.invalid += 1
                    continue
                code = _check_header(p, length, &h)
                if code == OK and (h.flags & C_REPLY or h.refl_rx_ns or h.refl_tx_ns):
                    code = E_FLAGS  # a reply or a stamped packet: never reflect it
                if code != OK:
                    self.invalid += 1
                    continue
                if keyed or h.flags & C_HMACF:
                    if _check_hmac(self._key, h.flags, p, length) != OK:
                        self.bad_hmac += 1
                        continue
                if self._rate > 0 and not self._allow(&buf.names[i], now_mono):
                    self.rate_limited += 1
                    continue
                # Build the reply in place: fresh fill, never an echo of the payload.
                rx = _cmsg_rx_ns(msg)
                p[5] = C_REPLY | (C_HMACF if keyed else 0)
                _st64(p + 32, <uint64_t>(rx if rx != 0 else user_rx))
                end = length - C_HMAC if keyed else length
                memset(p + C_HEADER, 0, end - C_HEADER)
                buf.tx_iov[k].iov_base = p
                buf.tx_iov[k].iov_len = length
                self._src[k] = i
                k += 1
            if k:
                tx = _clock(CLOCK_REALTIME)
                for i in range(k):
                    p = <uint8_t*>buf.tx_iov[i].iov_base
                    if keyed:
                        tx = _clock(CLOCK_REALTIME)  # the HMAC covers the stamp
                        _st64(p + 40, <uint64_t>tx)
                        _sign(self._key, p, buf.tx_iov[i].iov_len)
                    else:
                        _st64(p + 40, <uint64_t>tx)
                self.replied += self._send(k)
            if r < self._batch:
                break
        return total

    cdef int _send(self, int k) noexcept:
        """sendmmsg the k prepared replies (GSO-grouped); return how many went out."""
        cdef int msgs = self._group(k, self._gso)
        cdef int done = 0, sent = 0, r, i
        while done < msgs:
            r = sendmmsg(self._fd, self._buf.tx_msgs + done, msgs - done, MSG_DONTWAIT)
            if r < 0 and errno == EINTR:
                continue
            if r < 0 and self._gso and done == 0 and (errno == EINVAL or errno == EIO
                                                      or errno == ENOPROTOOPT):
                self._gso = False  # no UDP GSO on this kernel/path: one message per reply
                msgs = self._group(k, False)
                continue
            if r <= 0:
                break  # full buffer or unreachable source: the rest are dropped
            for i in range(done, done + r):
                sent += self._gcount[i]
            done += r
        return sent

    def stats(self):
        """Counters since start: received, replied, invalid, bad_hmac, rate_limited."""
        return {
            "received": self.received,
            "replied": self.replied,
            "invalid": self.invalid,
            "bad_hmac": self.bad_hmac,
            "rate_limited": self.rate_limited,
        }


def tcp_info_rtt(int fd):
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
    cdef tcp_info info
    cdef socklen_t length = sizeof(info)
    memset(&info, 0, sizeof(info))
    if getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0:
        raise _oserror(errno)
    return info.tcpi_rtt, info.tcpi_rttvar
