# Included by _core.pyx: ICMP echo probes (docs/protocol.md, "ICMP"). Mirrors _py_icmp.py.

cdef enum:
    C_ICMP_HEADER = 8
    C_IP_MAX_HEADER = 60


cdef inline uint16_t _icmp_checksum(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The Internet checksum (RFC 1071) of p[:n]."""
    cdef uint64_t total = 0
    cdef Py_ssize_t i
    for i in range(0, n - 1, 2):
        total += (<uint32_t>p[i] << 8) | p[i + 1]
    if n & 1:
        total += <uint32_t>p[n - 1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>(~total & 0xFFFF)


def _checksum(data):
    """The Internet checksum of ``data`` (exposed for the tests)."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    return _icmp_checksum(&view[0] if view.shape[0] else NULL, view.shape[0])


cdef class IcmpProbeSocket(_StampedSocket):
    """ICMP echo probes to one host, with the ProbeSocket shape and dtypes.

    An unprivileged ping socket is tried first (the kernel picks the identifier and hands
    us only replies carrying it), a raw ICMP socket second (we pick the identifier and
    skip other processes' replies). The echo payload is a detnet request: session, full
    64-bit seq and TX stamp, echoed verbatim; the ICMP sequence number is its low 16 bits.
    """

    cdef readonly uint32_t session
    cdef readonly int size
    cdef readonly str kind
    cdef readonly int ident
    cdef readonly int family
    cdef readonly str address
    cdef public uint64_t received
    cdef public uint64_t echoes
    cdef public uint64_t foreign
    cdef public uint64_t other_ident
    cdef public uint64_t invalid
    cdef bytes _packet
    cdef bint _checksum
    cdef int _offset
    cdef uint8_t _reply_type
    cdef _Batch _tx
    cdef _Batch _rx

    def __init__(
        self, host, *, session, size=64, kind="auto", ident=None, kernel_timestamps=True,
        hardware="off", device=None,
    ):
        if not C_ICMP_HEADER + C_HEADER <= size <= C_MAX:
            raise ValueError(
                f"icmp probe size {size} is not in {C_ICMP_HEADER + C_HEADER}..{C_MAX}"
            )
        if ident is not None and not 0 <= ident <= 0xFFFF:
            raise ValueError(f"icmp identifier {ident} does not fit in 16 bits")
        payload = encode_probe(session=session, seq=0, tx_ns=0, size=size - C_ICMP_HEADER)
        self.session = session
        self.size = size
        try:
            infos = _socket.getaddrinfo(host, None, type=_socket.SOCK_DGRAM)
        except _socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        if family not in _ICMP_ECHO:
            raise OSError(f"{host!r}: ICMP echo needs an IPv4 or IPv6 address")
        self.family = family
        self.address = str(addr[0])
        request, self._reply_type = _ICMP_ECHO[family]
        plan = None
        if kernel_timestamps:
            plan = _timestamp_plan(want=hardware, host=self.address, device=device, tx=True)
        sock, self.kind = _open_icmp(family, kind)
        try:
            sock.setblocking(False)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, RCVBUF_BYTES)
            if self.kind == "raw":
                sock.setsockopt(*_icmp_filter(family))
            sock.connect((self.address, 0, *addr[2:]))
            if self.kind == "ping":
                self.ident = sock.getsockname()[1]  # the kernel's, whatever we send
            else:
                self.ident = _random.getrandbits(16) if ident is None else ident
            self._attach(sock, plan)
        except BaseException:
            sock.close()
            raise
        # The kernel computes the checksum for ping sockets and for ICMPv6; we do raw IPv4.
        self._checksum = self.kind == "raw" and family == _socket.AF_INET
        self._packet = bytes([request, 0, 0, 0, self.ident >> 8, self.ident & 0xFF, 0, 0]) + payload
        self._offset = C_IP_MAX_HEADER if self._checksum else 0
        self._tx = _Batch(16, size)
        self._rx = _Batch(16, self._offset + size)
        self._prepare_tx(self._tx)

    cdef void _prepare_tx(self, _Batch b):
        cdef int i
        for i in range(b.cap):
            memcpy(b.data + i * b.slot, PyBytes_AS_STRING(self._packet), self.size)
            b.tx_iov[i].iov_base = b.data + i * b.slot
            b.tx_iov[i].iov_len = self.size

    def send(self, first_seq, Py_ssize_t count, out):
        """Send ``count`` echo requests numbered from ``first_seq`` (one sendmmsg); fill
        ``out[:n]`` (SENT_DTYPE) and return n."""
        cdef cnp.ndarray arr = _records(out, SENT_DTYPE, count)
        cdef sent_rec* rec = <sent_rec*>cnp.PyArray_DATA(arr)
        cdef uint64_t seq0 = first_seq & _U64
        cdef uint64_t seq
        cdef int i, r, n
        cdef int64_t now
        cdef uint8_t* p
        if count < 0 or count > MAX_BATCH:
            raise ValueError(f"count {count} is not in 0..{MAX_BATCH}")
        if count == 0:
            return 0
        if self._sock.fileno() < 0:
            raise OSError("icmp probe socket is closed")
        if count > self._tx.cap:
            self._tx = _Batch(count, self.size)
            self._prepare_tx(self._tx)
        n = <int>count
        now = _clock(CLOCK_REALTIME)
        for i in range(n):
            p = self._tx.data + i * self._tx.slot
            seq = seq0 + <uint64_t>i
            _st16(p + 2, 0)
            _st16(p + 6, <uint16_t>(seq & 0xFFFF))
            _st64(p + C_ICMP_HEADER + 16, seq)
            _st64(p + C_ICMP_HEADER + 24, <uint64_t>now)
            if self._checksum:
                _st16(p + 2, _icmp_checksum(p, self.size))
        r = sendmmsg(self._fd, self._tx.tx_msgs, n, MSG_DONTWAIT)
        if r < 0:
            if errno == EAGAIN or errno == EINTR:
                r = 0
            else:
                raise _oserror(errno)
        for i in range(r):
            rec[i].seq = seq0 + <uint64_t>i
            rec[i].user_tx_ns = now
            rec[i].kernel_tx_ns = 0
            rec[i].hw_tx_ns = 0
        if self.kernel_tx:
            self._drain_errqueue(rec, r)
            self._record_sent(seq0, r)
        return r

    def recv(self, out):
        """Drain up to len(out) echo replies into ``out`` (REPLY_DTYPE, kind KIND_ECHO)."""
        cdef cnp.ndarray arr = _records(out, REPLY_DTYPE, 0)
        cdef reply_rec* rec = <reply_rec*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t want = min(arr.shape[0], MAX_BATCH)
        cdef int i, r, n = 0
        cdef int64_t user_rx, rx_sw, rx_hw
        cdef header_t h
        cdef uint8_t* p
        cdef uint8_t* icmp
        cdef const uint8_t* tmpl = <const uint8_t*>PyBytes_AS_STRING(self._packet)
        cdef Py_ssize_t length, start, have, plen
        cdef Py_ssize_t payload_len = self.size - C_ICMP_HEADER
        cdef msghdr* msg
        if want == 0:
            return 0
        if self._sock.fileno() < 0:
            raise OSError("icmp probe socket is closed")
        if self.kernel_tx:
            self._drain_errqueue(NULL, 0)
        if want > self._rx.cap:
            self._rx = _Batch(<int>want, self._offset + self.size)
        self._rx.arm_recv(<int>want, True)
        r = recvmmsg(self._fd, self._rx.msgs, <unsigned int>want, MSG_DONTWAIT | MSG_TRUNC, NULL)
        user_rx = _clock(CLOCK_REALTIME)
        if r < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            if errno == EHOSTUNREACH or errno == ENETUNREACH or errno == ECONNREFUSED:
                return 0  # an ICMP error for an earlier probe: the probe counts as lost
            raise _oserror(errno)
        for i in range(r):
            msg = &self._rx.msgs[i].msg_hdr
            p = self._rx.data + i * self._rx.slot
            length = self._rx.msgs[i].msg_len
            self.received += 1
            start = 0
            if self._offset:  # raw IPv4 hands us the IP header too
                if length < 20 or length > self._rx.slot:
                    self.foreign += 1
                    self._foreign(p, length, self._rx.slot, &self._rx.names[i])
                    continue
                start = (p[0] & 0x0F) * 4
            icmp = p + start
            have = min(length, self._rx.slot) - start
            plen = length - start
            if have < C_ICMP_HEADER or plen > self.size:
                self.foreign += 1
                self._foreign(icmp, plen, have, &self._rx.names[i])
                continue
            if icmp[0] != self._reply_type or icmp[1] != 0:
                self.foreign += 1
                self._foreign(icmp, plen, have, &self._rx.names[i])
                continue
            if self.kind == "raw" and _ld16(icmp + 4) != self.ident:
                self.other_ident += 1  # another process's ping: not for us, not a fault
                continue
            if plen - C_ICMP_HEADER != payload_len or _ld32(icmp + C_ICMP_HEADER) != C_MAGIC:
                self.foreign += 1
                self._foreign(icmp, plen, have, &self._rx.names[i])
                continue
            if _check_header(icmp + C_ICMP_HEADER, payload_len, &h) != OK:
                self.invalid += 1
                continue
            if h.session != self.session:
                self.foreign += 1
                self._foreign(icmp, plen, have, &self._rx.names[i])
                continue
            if (
                h.flags or h.refl_rx_ns or h.refl_tx_ns
                or (h.seq & 0xFFFF) != _ld16(icmp + 6)
                or memcmp(
                    icmp + C_ICMP_HEADER + C_HEADER, tmpl + C_ICMP_HEADER + C_HEADER,
                    payload_len - C_HEADER,
                ) != 0
            ):
                self.invalid += 1  # our session, but not a verbatim echo of our request
                continue
            self.echoes += 1
            _cmsg_rx(msg, &rx_sw, &rx_hw)
            rec[n].seq = h.seq
            rec[n].session = h.session
            rec[n].size = <uint32_t>self.size
            rec[n].tx_ns = <int64_t>h.tx_ns
            rec[n].refl_rx_ns = 0
            rec[n].refl_tx_ns = 0
            rec[n].kernel_rx_ns = rx_sw
            rec[n].user_rx_ns = user_rx
            rec[n].source = _source(rx_sw, rx_hw)
            rec[n].kind = K_ECHO
            rec[n].refl_source = TS_UNKNOWN_C
            rec[n].followup_source = FU_NONE
            rec[n].followup_seq = 0
            rec[n].refl_tx_kernel_ns = 0
            rec[n].hw_rx_ns = rx_hw
            n += 1
        return n

    def stats(self):
        """Counters: received, echoes, foreign, other_ident (another process's replies on a
        raw socket), invalid, late_tx_dropped."""
        return {
            "received": self.received,
            "echoes": self.echoes,
            "foreign": self.foreign,
            "other_ident": self.other_ident,
            "invalid": self.invalid,
            "late_tx_dropped": self._late_dropped,
        }
