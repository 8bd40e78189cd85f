# Included by _core.pyx: C buffers, kernel timestamps, and the UDP probe socket.
# Mirrors _py_sockets.py (same rows, same counters, same classification order).

cdef enum:
    CTRL_SIZE = 256  # room for the RX timestamp cmsg (and the error queue's two)
    MAX_BATCH = 1024  # the kernel's UIO_MAXIOV caps recvmmsg/sendmmsg vectors
    KEY_RING = 4096  # OPT_ID key -> seq, for TX stamps that arrive after send() returned
    LATE_MAX = 1024  # late TX stamps kept for take_tx_stamps(); older ones are dropped

RCVBUF_BYTES = 4 << 20  # a probe socket's receive buffer (capped by net.core.rmem_max)


cdef inline void _cmsg_rx(msghdr* msg, int64_t* sw, int64_t* hw) noexcept nogil:
    """Kernel RX timestamps (software ts[0], raw hardware ts[2]) from control data."""
    cdef cmsghdr* c = CMSG_FIRSTHDR(msg)
    cdef timespec ts[3]
    sw[0] = 0
    hw[0] = 0
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPING:
            memcpy(ts, CMSG_DATA(c), sizeof(ts))
            sw[0] = <int64_t>ts[0].tv_sec * 1000000000 + ts[0].tv_nsec
            hw[0] = <int64_t>ts[2].tv_sec * 1000000000 + ts[2].tv_nsec
            return
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPNS:
            memcpy(ts, CMSG_DATA(c), sizeof(timespec))
            sw[0] = <int64_t>ts[0].tv_sec * 1000000000 + ts[0].tv_nsec
            return
        c = CMSG_NXTHDR(msg, c)


cdef inline int64_t _cmsg_rx_ns(msghdr* msg) noexcept nogil:
    """The kernel software RX timestamp, 0 if none."""
    cdef int64_t sw, hw
    _cmsg_rx(msg, &sw, &hw)
    return sw


cdef inline uint8_t _source(int64_t sw, int64_t hw) noexcept nogil:
    return TS_HARDWARE_C if hw != 0 else TS_KERNEL_C if sw != 0 else TS_USER_C


cdef tuple _set_timestamping(int fd, int flags):
    """Set SO_TIMESTAMPING (or SO_TIMESTAMPNS for RX only); return (kernel RX, kernel TX)."""
    cdef int one = 1
    if setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPING, &flags, sizeof(flags)) == 0:
        return True, bool(flags & (DETNET_SOF_TX_SOFTWARE | DETNET_SOF_TX_HARDWARE))
    if setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one)) == 0:
        return True, False
    return False, False


cdef object _oserror(int err):
    return OSError(err, _os.strerror(err))


cdef int _wake_fd(int fd) except -1:
    """An epoll descriptor readable while ``fd`` has data or error-queue entries: watched
    instead of the socket, a late TX stamp wakes the reader instead of raising POLLERR
    (which stops a uvloop add_reader watcher for good)."""
    cdef epoll_event ev
    cdef int ep = epoll_create1(EPOLL_CLOEXEC)
    if ep < 0:
        raise _oserror(errno)
    memset(&ev, 0, sizeof(ev))
    ev.events = EPOLLIN
    ev.data.fd = fd
    if epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0:
        err = errno
        close(ep)
        raise _oserror(err)
    return ep


cdef object _address(const sockaddr_storage* name):
    """(host, port) of a received datagram's source address, None if not IP."""
    cdef const sockaddr_in* a4
    cdef const sockaddr_in6* a6
    if name.ss_family == AF_INET:
        a4 = <const sockaddr_in*>name
        host = _socket.inet_ntop(
            _socket.AF_INET, PyBytes_FromStringAndSize(<const char*>&a4.sin_addr, 4)
        )
        return host, be16toh(a4.sin_port)
    if name.ss_family == AF_INET6:
        a6 = <const sockaddr_in6*>name
        host = _socket.inet_ntop(
            _socket.AF_INET6, PyBytes_FromStringAndSize(<const char*>&a6.sin6_addr, 16)
        )
        return host, be16toh(a6.sin6_port)
    return None


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


cdef class _StampedSocket:
    """What the UDP and ICMP probe sockets share: the socket, its wake descriptor, kernel
    timestamps, and the OPT_ID bookkeeping that maps TX stamps to our seqs."""

    cdef object _sock
    cdef int _fd
    cdef int _wake
    cdef public bint kernel_rx
    cdef public bint kernel_tx
    cdef readonly bint hardware
    cdef readonly object timestamping
    cdef readonly object first_foreign
    cdef uint32_t _tskey   # OPT_ID of the next datagram (the kernel counts from 0, wraps)
    cdef uint32_t* _ring_key
    cdef uint8_t* _ring_used
    cdef uint64_t* _ring_seq
    cdef late_t* _late
    cdef int _late_head
    cdef int _late_count
    cdef uint64_t _late_dropped
    cdef uint8_t _errctrl[CTRL_SIZE]

    def __cinit__(self, *args, **kwargs):
        self._wake = -1
        self._ring_key = <uint32_t*>calloc(KEY_RING, sizeof(uint32_t))
        self._ring_used = <uint8_t*>calloc(KEY_RING, 1)
        self._ring_seq = <uint64_t*>calloc(KEY_RING, sizeof(uint64_t))
        self._late = <late_t*>calloc(LATE_MAX, sizeof(late_t))
        if (
            self._ring_key == NULL or self._ring_used == NULL or self._ring_seq == NULL
            or self._late == NULL
        ):
            raise MemoryError()

    def __dealloc__(self):
        free(self._ring_key)
        free(self._ring_used)
        free(self._ring_seq)
        free(self._late)
        if self._wake >= 0:
            close(self._wake)

    cdef void _attach(self, object sock, object plan) except *:
        """Take the connected socket: timestamps per ``plan`` (None: off), wake fd."""
        self._sock = sock
        self._fd = sock.fileno()
        self.timestamping = plan
        if plan is not None:
            self.kernel_rx, self.kernel_tx = _set_timestamping(self._fd, plan.flags)
        else:
            self.kernel_rx = self.kernel_tx = False
        self.hardware = plan is not None and plan.hardware and self.kernel_rx
        self._wake = _wake_fd(self._fd)

    def fileno(self):
        """The descriptor to watch (loop.add_reader): readable on replies and late stamps."""
        return self._wake

    cdef void _check_open(self) except *:
        if self._sock.fileno() < 0:
            raise OSError("probe socket is closed")

    cdef void _record_sent(self, uint64_t first_seq, int n) noexcept:
        cdef int i
        cdef uint32_t key, slot
        for i in range(n):
            key = self._tskey + <uint32_t>i
            slot = key % KEY_RING
            self._ring_key[slot] = key
            self._ring_used[slot] = 1
            self._ring_seq[slot] = first_seq + <uint64_t>i
        self._tskey += <uint32_t>n

    cdef void _push_late(self, uint64_t seq, int64_t sw, int64_t hw) noexcept:
        cdef int pos
        if self._late_count == LATE_MAX:
            self._late_head = (self._late_head + 1) % LATE_MAX
            self._late_count -= 1
            self._late_dropped += 1
        pos = (self._late_head + self._late_count) % LATE_MAX
        self._late[pos].seq = seq
        self._late[pos].sw = sw
        self._late[pos].hw = hw
        self._late_count += 1

    cdef void _drain_errqueue(self, sent_rec* rec, int sent) noexcept:
        """Read every pending TX timestamp: stamps of rec[:sent] go there, others are late."""
        cdef msghdr msg
        cdef cmsghdr* c
        cdef timespec ts[3]
        cdef detnet_extended_err err
        cdef int64_t sw, hw
        cdef int64_t key
        cdef uint32_t index, slot
        cdef int guard
        for guard in range(4 * MAX_BATCH):
            memset(&msg, 0, sizeof(msg))
            msg.msg_control = self._errctrl
            msg.msg_controllen = CTRL_SIZE
            if recvmsg(self._fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
                return
            sw = hw = 0
            key = -1
            c = CMSG_FIRSTHDR(&msg)
            while c != NULL:
                if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPING:
                    memcpy(ts, CMSG_DATA(c), sizeof(ts))
                    sw = <int64_t>ts[0].tv_sec * 1000000000 + ts[0].tv_nsec
                    hw = <int64_t>ts[2].tv_sec * 1000000000 + ts[2].tv_nsec
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
            if key < 0 or (sw == 0 and hw == 0):
                continue
            index = <uint32_t>key - self._tskey  # wraps like the kernel's counter
            if rec != NULL and index < <uint32_t>sent:
                if sw != 0:
                    rec[index].kernel_tx_ns = sw
                if hw != 0:
                    rec[index].hw_tx_ns = hw
                continue
            slot = <uint32_t>key % KEY_RING
            if self._ring_used[slot] and self._ring_key[slot] == <uint32_t>key:
                self._push_late(self._ring_seq[slot], sw, hw)

    def take_tx_stamps(self, out):
        """Kernel TX stamps that arrived after send() returned (SENT_DTYPE rows, user_tx_ns
        0; a zero stamp field means "not in this row"); return how many were written."""
        cdef cnp.ndarray arr = _records(out, SENT_DTYPE, 0)
        cdef sent_rec* rec = <sent_rec*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = 0
        cdef late_t* e
        while self._late_count and n < arr.shape[0]:
            e = &self._late[self._late_head]
            rec[n].seq = e.seq
            rec[n].user_tx_ns = 0
            rec[n].kernel_tx_ns = e.sw
            rec[n].hw_tx_ns = e.hw
            self._late_head = (self._late_head + 1) % LATE_MAX
            self._late_count -= 1
            n += 1
        return n

    cdef void _foreign(self, const uint8_t* p, Py_ssize_t length, Py_ssize_t have,
                       const sockaddr_storage* name) except *:
        """Keep the first datagram that was neither ours nor an echo, for one report."""
        if self.first_foreign is not None:
            return
        cdef Py_ssize_t keep = min(min(length, have), 16)
        self.first_foreign = _ForeignDatagram(
            size=length,
            source=_address(name),
            prefix=PyBytes_FromStringAndSize(<const char*>p, keep if keep > 0 else 0),
        )

    def close(self):
        """Close the socket and its wake descriptor (idempotent)."""
        if self._wake >= 0:
            close(self._wake)
            self._wake = -1
        self._sock.close()


cdef class ProbeSocket(_StampedSocket):
    """A connected non-blocking UDP socket that sends probes and drains their replies.

    Kernel RX timestamps (SO_TIMESTAMPING software RX, raw hardware too when planned, or
    SO_TIMESTAMPNS) are enabled, TX ones when the kernel offers them (OPT_ID | OPT_TSONLY),
    read from the error queue right after each send; later ones wait for take_tx_stamps().
    """

    cdef readonly uint32_t session
    cdef readonly int size
    cdef readonly bint two_step
    cdef bytes _key
    cdef bytes _template
    cdef Py_ssize_t _fill_end
    cdef uint8_t _req_flags
    cdef public uint64_t received
    cdef public uint64_t replies
    cdef public uint64_t followups
    cdef public uint64_t echoes
    cdef public uint64_t foreign
    cdef public uint64_t bad_hmac
    cdef public uint64_t invalid
    cdef _Batch _tx
    cdef _Batch _rx

    def __init__(
        self, host, port, *, session, size=64, key=None, bind=None, kernel_timestamps=True,
        two_step=False, followup_wait_ns=0, hardware="off", device=None,
    ):
        self._key = _checked_key(key)
        self.two_step = bool(two_step) and size >= C_TWO_STEP_MIN + (
            C_HMAC if self._key is not None else 0
        )
        # Validates size/session/wait once, and gives the template every probe starts from.
        self._template = encode_probe(
            session=session, seq=0, tx_ns=0, size=size, key=key, two_step=self.two_step,
            followup_wait_ns=followup_wait_ns if self.two_step else 0,
        )
        self.session = session
        self.size = size
        self._fill_end = size - (C_HMAC if self._key is not None else 0)
        self._req_flags = C_HMACF if self._key is not None else 0
        try:
            infos = _socket.getaddrinfo(host, port, type=_socket.SOCK_DGRAM)
        except _socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        plan = None
        if kernel_timestamps:
            plan = _timestamp_plan(want=hardware, host=str(addr[0]), device=device, tx=True)
        sock = _socket.socket(family, _socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            # A batch of replies can outgrow the default buffer (~200 KiB of skbs) before
            # the loop drains it: losses that would be ours, not the network's.
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, RCVBUF_BYTES)
            if bind is not None:
                sock.bind(bind)
            sock.connect(addr)
            self._attach(sock, plan)
        except BaseException:
            sock.close()
            raise
        self._tx = _Batch(16, size)
        self._rx = _Batch(16, size)
        self._prepare_tx(self._tx)

    cdef void _prepare_tx(self, _Batch b):
        cdef int i
        for i in range(b.cap):
            memcpy(b.data + i * b.slot, PyBytes_AS_STRING(self._template), self.size)
            b.tx_iov[i].iov_base = b.data + i * b.slot
            b.tx_iov[i].iov_len = self.size

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
            rec[i].hw_tx_ns = 0
        if self.kernel_tx:
            self._drain_errqueue(rec, r)
            self._record_sent(seq0, r)
        return r

    def recv(self, out):
        """Drain up to len(out) datagrams into ``out`` (REPLY_DTYPE); return the rows written.

        Rows are replies, two-step replies, follow-ups and verbatim echoes (``kind``);
        everything else only bumps a counter (foreign, bad_hmac, invalid).
        """
        cdef cnp.ndarray arr = _records(out, REPLY_DTYPE, 0)
        cdef reply_rec* rec = <reply_rec*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t want = min(arr.shape[0], MAX_BATCH)
        cdef int i, r, n = 0
        cdef int kind
        cdef int64_t user_rx, rx_sw, rx_hw
        cdef header_t h
        cdef uint8_t* p
        cdef const uint8_t* tmpl = <const uint8_t*>PyBytes_AS_STRING(self._template)
        cdef Py_ssize_t length
        cdef msghdr* msg
        if want == 0:
            return 0
        self._check_open()
        if self.kernel_tx:
            self._drain_errqueue(NULL, 0)  # late stamps, and out of POLLERR
        if want > self._rx.cap:
            self._rx = _Batch(<int>want, self.size)
        self._rx.arm_recv(<int>want, True)
        # MSG_TRUNC: msg_len is the datagram's real length, also when it did not fit.
        r = recvmmsg(self._fd, self._rx.msgs, <unsigned int>want, MSG_DONTWAIT | MSG_TRUNC, NULL)
        user_rx = _clock(CLOCK_REALTIME)
        if r < 0:
            if errno == EAGAIN or errno == EINTR or errno == ECONNREFUSED:
                return 0
            raise _oserror(errno)
        for i in range(r):
            msg = &self._rx.msgs[i].msg_hdr
            p = self._rx.data + i * self._rx.slot
            length = self._rx.msgs[i].msg_len
            self.received += 1
            if length > self.size or length < 4 or _ld32(p) != C_MAGIC:
                self.foreign += 1
                self._foreign(p, length, self.size, &self._rx.names[i])
                continue
            if _check_header(p, length, &h) != OK:
                self.invalid += 1
                continue
            if h.session != self.session:
                self.foreign += 1
                self._foreign(p, length, self.size, &self._rx.names[i])
                continue
            if h.version == C_VERSION2 and not self.two_step:
                self.invalid += 1
                continue
            if h.flags & C_REPLY:
                kind = K_REPLY
                if h.version == C_VERSION2:
                    kind = K_FOLLOWUP if h.flags & C_FOLLOWUP else K_REPLY2
            elif (
                h.flags == self._req_flags and length == self.size
                and h.refl_rx_ns == 0 and h.refl_tx_ns == 0
                and memcmp(p + C_HEADER, tmpl + C_HEADER, self._fill_end - C_HEADER) == 0
            ):
                kind = K_ECHO
            else:
                self.invalid += 1  # our session, but neither a reply nor a verbatim echo
                continue
            if (self._key is not None or h.flags & C_HMACF) and _check_hmac(
                self._key, h.flags, p, length
            ) != OK:
                self.bad_hmac += 1
                continue
            if kind == K_ECHO:
                self.echoes += 1
            elif kind == K_FOLLOWUP:
                self.followups += 1
            else:
                self.replies += 1
            _cmsg_rx(msg, &rx_sw, &rx_hw)
            rec[n].seq = h.seq
            rec[n].session = h.session
            rec[n].size = <uint32_t>length
            if kind == K_FOLLOWUP:
                rec[n].tx_ns = 0
                rec[n].refl_rx_ns = 0
                rec[n].refl_tx_ns = 0
            else:
                rec[n].tx_ns = <int64_t>h.tx_ns
                rec[n].refl_rx_ns = <int64_t>h.refl_rx_ns
                rec[n].refl_tx_ns = <int64_t>h.refl_tx_ns
            rec[n].kernel_rx_ns = rx_sw
            rec[n].user_rx_ns = user_rx
            rec[n].source = _source(rx_sw, rx_hw)
            rec[n].kind = <uint8_t>kind
            rec[n].refl_source = (
                TS_UNKNOWN_C if kind == K_REPLY or kind == K_ECHO else h.rx_source
            )
            rec[n].followup_source = h.followup_source
            rec[n].followup_seq = h.followup_seq
            rec[n].refl_tx_kernel_ns = <int64_t>h.followup_tx_ns
            rec[n].hw_rx_ns = rx_hw
            n += 1
        return n

    def stats(self):
        """Counters since start: received, replies, followups, echoes, foreign, bad_hmac,
        invalid, and late_tx_dropped (late TX stamps nobody took in time)."""
        return {
            "received": self.received,
            "replies": self.replies,
            "followups": self.followups,
            "echoes": self.echoes,
            "foreign": self.foreign,
            "bad_hmac": self.bad_hmac,
            "invalid": self.invalid,
            "late_tx_dropped": self._late_dropped,
        }
