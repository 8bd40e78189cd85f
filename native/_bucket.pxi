# Included by _core.pyx: the token bucket (mirrors _py_bucket.py, see its docstring).
#
# One arithmetic, _tb_refill/_tb_take/_tb_wait, serves both the TokenBucket class and
# the per-source C table that the reflector's fast path calls without the GIL (no Python
# object per packet). It does the same IEEE double operations in the same order as the
# Python fallback, so the parity suite can demand equal floats, not close ones.

from libc.math cimport ceil

from detnet.native._py_bucket import check_bucket_args as _check_bucket_args
from detnet.native._py_bucket import check_source_args as _check_source_args

cdef enum:
    SOURCE_TABLE_SIZE_C = 4096  # = _py_bucket.SOURCE_TABLE_SIZE (a power of two)
    SOURCE_TABLE_PROBES = 8

cdef int64_t _TB_MAX_WAIT_NS = 1LL << 53

SOURCE_TABLE_SIZE = SOURCE_TABLE_SIZE_C


# One source address's bucket in SourceBuckets' fixed-size table.
cdef struct bucket_t:
    uint8_t addr[16]
    uint8_t used
    double tokens
    int64_t last_ns


cdef inline void _tb_refill(double* tokens, int64_t* last_ns, int64_t now, double rate,
                            double burst) noexcept nogil:
    if now > last_ns[0]:
        tokens[0] += <double>(now - last_ns[0]) * rate / 1e9
        if tokens[0] > burst:
            tokens[0] = burst
        last_ns[0] = now


cdef inline bint _tb_take(double* tokens, int64_t* last_ns, int64_t now, double rate,
                          double burst) noexcept nogil:
    _tb_refill(tokens, last_ns, now, rate, burst)
    if tokens[0] >= 1.0:
        tokens[0] -= 1.0
        return True
    return False


cdef inline int64_t _tb_wait(double* tokens, int64_t* last_ns, int64_t now, double rate,
                             double burst) noexcept nogil:
    cdef double need
    cdef int64_t wait
    _tb_refill(tokens, last_ns, now, rate, burst)
    if tokens[0] >= 1.0:
        return 0
    need = (1.0 - tokens[0]) * 1e9 / rate
    if need >= <double>_TB_MAX_WAIT_NS:
        return _TB_MAX_WAIT_NS
    wait = <int64_t>ceil(need)
    while tokens[0] + <double>wait * rate / 1e9 < 1.0:
        wait += 1
    return wait


cdef inline uint32_t _hash(const uint8_t* a) noexcept nogil:
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef int i
    for i in range(16):
        h = (h ^ a[i]) * 16777619u
    return h


cdef class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; full at ``now_ns``.

    Times are nanoseconds on one monotonic clock; a time earlier than the last one seen
    counts as no time passed. ``borrow()`` may leave the bucket in debt (below zero):
    later takers wait for the debt to be paid."""

    cdef double _rate
    cdef double _burst
    cdef double _tokens
    cdef int64_t _last

    def __init__(self, *, rate, burst, now_ns):
        _check_bucket_args(rate=rate, burst=burst)
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = now_ns

    @property
    def rate(self):
        """Tokens per second."""
        return self._rate

    @property
    def burst(self):
        """The bucket's size."""
        return self._burst

    @property
    def tokens(self):
        """Tokens as of the last call (negative: in debt)."""
        return self._tokens

    def take(self, int64_t now_ns):
        """Take one token if there is one; False (nothing taken) when there is not."""
        return _tb_take(&self._tokens, &self._last, now_ns, self._rate, self._burst)

    def borrow(self, int64_t now_ns):
        """Take one token now, into debt if the bucket has none."""
        _tb_refill(&self._tokens, &self._last, now_ns, self._rate, self._burst)
        self._tokens -= 1.0

    def wait_ns(self, int64_t now_ns):
        """Nanoseconds from ``now_ns`` until ``take()`` succeeds (0: now)."""
        return _tb_wait(&self._tokens, &self._last, now_ns, self._rate, self._burst)


cdef class SourceBuckets:
    """A token bucket per source address in a fixed table (``allow_addr`` for the fast
    path, ``allow`` with the address as text for Python callers).

    ``rate_pps`` 0 means unlimited. The key is the address (IPv4 as IPv4-mapped IPv6),
    not the port; text that is not an address shares one bucket. Open addressing over
    SOURCE_TABLE_PROBES slots: a new source takes a free slot, else the stalest one."""

    cdef bucket_t* _table
    cdef double _rate
    cdef double _burst
    cdef uint32_t _used

    def __cinit__(self, *args, **kwargs):
        self._table = <bucket_t*>calloc(SOURCE_TABLE_SIZE_C, sizeof(bucket_t))
        if self._table == NULL:
            raise MemoryError()

    def __init__(self, *, rate_pps, burst):
        _check_source_args(rate_pps=rate_pps, burst=burst)
        self._rate = rate_pps
        self._burst = burst

    def __dealloc__(self):
        free(self._table)

    def __len__(self):
        return self._used

    def allow(self, str source, int64_t now_ns):
        """Take one token from ``source``'s bucket; False when it is empty."""
        cdef uint8_t addr[16]
        cdef bytes packed
        if self._rate <= 0:
            return True
        memset(addr, 0, 16)
        host = source.partition("%")[0]  # an IPv6 scope is not part of the address
        try:
            packed = _socket.inet_pton(_socket.AF_INET, host)
            addr[10] = 0xFF
            addr[11] = 0xFF
            memcpy(addr + 12, PyBytes_AS_STRING(packed), 4)
        except OSError:
            try:
                packed = _socket.inet_pton(_socket.AF_INET6, host)
                memcpy(addr, PyBytes_AS_STRING(packed), 16)
            except OSError:
                pass
        return self._allow_key(addr, now_ns)

    cdef bint allow_addr(self, const sockaddr_storage* src, int64_t now) noexcept nogil:
        """``allow`` for a datagram's source address."""
        cdef uint8_t addr[16]
        if self._rate <= 0:
            return True
        memset(addr, 0, 16)
        if src.ss_family == AF_INET:
            addr[10] = 0xFF
            addr[11] = 0xFF
            memcpy(addr + 12, &(<const sockaddr_in*>src).sin_addr, 4)
        elif src.ss_family == AF_INET6:
            memcpy(addr, &(<const sockaddr_in6*>src).sin6_addr, 16)
        return self._allow_key(addr, now)

    cdef bint _allow_key(self, const uint8_t* addr, int64_t now) noexcept nogil:
        cdef uint32_t h = _hash(addr)
        cdef bucket_t* b
        cdef bucket_t* victim = NULL
        cdef int i
        for i in range(SOURCE_TABLE_PROBES):
            b = &self._table[(h + <uint32_t>i) % <uint32_t>SOURCE_TABLE_SIZE_C]
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
            if not b.used:
                self._used += 1
            memcpy(b.addr, addr, 16)
            b.used = 1
            b.tokens = self._burst
            b.last_ns = now
        return _tb_take(&b.tokens, &b.last_ns, now, self._rate, self._burst)
