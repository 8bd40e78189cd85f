# Included by _core.pyx: the reflector fast path with two-step stamps. Mirrors
# _py_reflector.py (same decisions, same counters, same batching).

cdef enum:
    SERVE_ROUNDS = 64  # batches per serve(): a flood must not starve the event loop
    GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
    GSO_MAX_SIZE = 1232  # fits any path MTU (IPv6 minimum 1280 - 48 header bytes)
    PER_SESSION = 64  # stamps pending per session (session_t.ring in _core.pxi)
    SESSION_PROBES = 8
    RKEY_RING = 8192  # OPT_ID key -> pending entry
    ERR_BATCH = 64  # error-queue entries per recvmmsg, follow-ups per sendmmsg
    P_AWAITING = 0

DEFAULT_WAIT_NS = _DEFAULT_WAIT_NS
cdef int64_t MIN_WAIT_NS = _MIN_WAIT_NS
cdef int64_t MAX_WAIT_NS = _MAX_WAIT_NS


cdef inline uint32_t _hash_session(const uint8_t* name, uint32_t n, uint32_t session) noexcept nogil:
    cdef uint32_t h = 2166136261u
    cdef uint32_t i
    for i in range(n):
        h = (h ^ name[i]) * 16777619u
    for i in range(4):
        h = (h ^ ((session >> (8 * i)) & 0xFF)) * 16777619u
    return h


cdef class Reflector:
    """The reflector fast path on a bound non-blocking UDP socket.

    Each call to ``serve()`` drains the socket in batches (recvmmsg), drops anything that
    does not parse or fails its HMAC, applies a per-source-address token bucket, stamps
    reflector RX (kernel) and TX, and answers with sendmmsg: never more bytes than came in.
    With ``two_step``, a request that asks for it gets a version-2 reply whose kernel TX
    stamp goes back in the session's next reply, or in a follow-up sent by ``flush()``.
    """

    cdef object _sock
    cdef int _fd
    cdef int _wake
    cdef bytes _key
    cdef double _rate
    cdef int _batch
    cdef _Batch _buf
    cdef _Batch _fu
    cdef SourceBuckets _buckets  # per source address (_bucket.pxi)
    cdef bint _gso
    cdef uint8_t* _gso_ctrl
    cdef int* _src  # reply k answers request _src[k] of the batch
    cdef int* _gcount  # replies carried by sendmmsg message g
    cdef int* _txent  # reply k's pending entry (session * PER_SESSION + slot), -1: one-step
    cdef session_t* _sessions
    cdef uint32_t _nsessions
    cdef int32_t* _keymap
    cdef uint32_t _next_key
    cdef int _ts_flags
    cdef int64_t _wait
    cdef int64_t _next_due
    cdef uint64_t _pending
    cdef mmsghdr* _errmsgs
    cdef uint8_t* _errctrl
    cdef public bint kernel_rx
    cdef readonly bint two_step_enabled
    cdef readonly uint64_t received
    cdef readonly uint64_t replied
    cdef readonly uint64_t invalid
    cdef readonly uint64_t bad_hmac
    cdef readonly uint64_t rate_limited
    cdef readonly uint64_t two_step
    cdef readonly uint64_t untracked
    cdef readonly uint64_t stamped
    cdef readonly uint64_t carried
    cdef readonly uint64_t followups
    cdef readonly uint64_t lost
    cdef readonly uint64_t followups_limited

    def __cinit__(self, *args, **kwargs):
        self._wake = -1

    def __init__(
        self, sock, *, key=None, rate_pps=0.0, burst=32, batch=64, two_step=False,
        followup_wait_ns=DEFAULT_WAIT_NS, sessions=1024,
    ):
        cdef int value = 0
        cdef socklen_t vlen = sizeof(value)
        self._key = _checked_key(key)
        _check_reflector_args(
            rate_pps=rate_pps, burst=burst, batch=batch, followup_wait_ns=followup_wait_ns,
            sessions=sessions,
        )
        self._rate = rate_pps
        self._buckets = SourceBuckets(rate_pps=rate_pps, burst=burst)
        self._batch = batch
        self._wait = followup_wait_ns
        self._sock = sock
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._ts_flags = DETNET_SOF_RX_SOFTWARE | DETNET_SOF_SOFTWARE
        if two_step:
            self._ts_flags |= DETNET_SOF_OPT_ID | DETNET_SOF_OPT_TSONLY
        self.kernel_rx = _set_timestamping(self._fd, self._ts_flags)[0]
        # Two-step needs the OPT_ID counter: without SO_TIMESTAMPING there is none.
        if two_step and getsockopt(self._fd, SOL_SOCKET, SO_TIMESTAMPING, &value, &vlen) == 0:
            self.two_step_enabled = bool(value & DETNET_SOF_OPT_ID)
        self._buf = _Batch(batch, C_MAX)
        self._fu = _Batch(ERR_BATCH, C_TWO_STEP_MIN + C_HMAC)
        self._gso_ctrl = <uint8_t*>calloc(batch, CMSG_SPACE(sizeof(uint32_t)))
        self._src = <int*>calloc(batch, sizeof(int))
        self._gcount = <int*>calloc(batch, sizeof(int))
        self._txent = <int*>calloc(batch, sizeof(int))
        self._nsessions = sessions
        self._sessions = <session_t*>calloc(sessions if self.two_step_enabled else 1,
                                            sizeof(session_t))
        self._keymap = <int32_t*>calloc(RKEY_RING, sizeof(int32_t))
        self._errmsgs = <mmsghdr*>calloc(ERR_BATCH, sizeof(mmsghdr))
        self._errctrl = <uint8_t*>calloc(ERR_BATCH, CTRL_SIZE)
        if (
            self._gso_ctrl == NULL or self._src == NULL
            or self._gcount == NULL or self._txent == NULL or self._sessions == NULL
            or self._keymap == NULL or self._errmsgs == NULL or self._errctrl == NULL
        ):
            raise MemoryError()
        memset(self._keymap, 0xFF, RKEY_RING * sizeof(int32_t))  # all -1: no entry
        self._gso = True

    def __dealloc__(self):
        free(self._gso_ctrl)
        free(self._src)
        free(self._gcount)
        free(self._txent)
        free(self._sessions)
        free(self._keymap)
        free(self._errmsgs)
        free(self._errctrl)
        if self._wake >= 0:
            close(self._wake)

    def fileno(self):
        """A descriptor readable while the socket has datagrams or TX stamps queued: watch
        this one (not the socket) so error-queue entries never surface as POLLERR."""
        if self._wake < 0:
            self._wake = _wake_fd(self._fd)
        return self._wake

    def close(self):
        """Close the wake descriptor (the socket belongs to the caller)."""
        if self._wake >= 0:
            close(self._wake)
            self._wake = -1

    cdef int _group(self, int k, bint gso) noexcept:
        """Lay the k replies out as sendmmsg messages; return how many messages.

        With UDP GSO, consecutive replies of equal (small) size to the same address go
        out as one message the kernel cuts into datagrams of exactly that size: one trip
        down the stack instead of one per reply, and each reply is still its request's
        size. A two-step reply travels alone, asking for its own kernel TX stamp (the
        stamp of a GSO message would be one for all its segments). ``_gcount[g]`` says
        how many replies message g carries.
        """
        cdef _Batch buf = self._buf
        cdef int i, g = -1
        cdef msghdr* m = NULL
        cdef msghdr* req
        cdef cmsghdr* c
        cdef uint16_t seg
        cdef uint32_t tsflags = DETNET_SOF_TX_SOFTWARE
        cdef size_t space = CMSG_SPACE(sizeof(uint32_t))
        for i in range(k):
            req = &buf.msgs[self._src[i]].msg_hdr
            if (
                gso and g >= 0 and self._gcount[g] < GSO_MAX_SEGMENTS
                and self._txent[i] < 0 and self._txent[i - 1] < 0
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
            if self._txent[i] >= 0:
                m.msg_control = self._gso_ctrl + g * space
                m.msg_controllen = CMSG_SPACE(sizeof(uint32_t))
                c = CMSG_FIRSTHDR(m)
                c.cmsg_level = SOL_SOCKET
                c.cmsg_type = SO_TIMESTAMPING
                c.cmsg_len = CMSG_LEN(sizeof(uint32_t))
                memcpy(CMSG_DATA(c), &tsflags, sizeof(tsflags))
        for i in range(g + 1):
            if self._gcount[i] > 1:
                m = &buf.tx_msgs[i].msg_hdr
                m.msg_control = self._gso_ctrl + i * space
                m.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
                c = CMSG_FIRSTHDR(m)
                c.cmsg_level = SOL_UDP
                c.cmsg_type = UDP_SEGMENT
                c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                seg = <uint16_t>m.msg_iov[0].iov_len
                memcpy(CMSG_DATA(c), &seg, sizeof(seg))
        return g + 1

    cdef int _session(self, const sockaddr_storage* name, uint32_t namelen, uint32_t session,
                      int64_t now) noexcept nogil:
        """The session's table index, or -1 when the table has no room for it.

        Open addressing over SESSION_PROBES slots; a new session takes a free slot, else
        the stalest slot with nothing pending. Slots are never emptied, only reused, so a
        lookup may stop at the first free one.
        """
        cdef uint32_t h = _hash_session(<const uint8_t*>name, namelen, session)
        cdef session_t* s
        cdef session_t* victim = NULL
        cdef int i, index = -1, vindex = -1
        for i in range(SESSION_PROBES):
            index = (h + <uint32_t>i) % self._nsessions
            s = &self._sessions[index]
            if not s.used:
                victim = s
                vindex = index
                break
            if (
                s.session == session and s.namelen == namelen
                and memcmp(&s.name, name, namelen) == 0
            ):
                s.last_ns = now
                return index
            if s.count == 0 and (victim == NULL or s.last_ns < victim.last_ns):
                victim = s
                vindex = index
        if victim == NULL:
            return -1
        victim.used = 1
        victim.session = session
        victim.namelen = namelen
        memcpy(&victim.name, name, namelen)
        victim.head = 0
        victim.count = 0
        victim.last_ns = now
        return vindex

    cdef inline bint _has_room(self, session_t* s, int64_t now) noexcept nogil:
        """Room for one more stamp, counting the one this reply will carry away."""
        cdef pending_t* head
        if s.count < PER_SESSION:
            return True
        head = &s.ring[s.head]
        return head.source != P_AWAITING or head.due <= now

    cdef bint _carry(self, session_t* s, int64_t now, uint64_t* seq, int64_t* stamp,
                     uint8_t* source) noexcept nogil:
        """Pop the session's oldest stamp if it is ready (or its wait is over: lost)."""
        cdef pending_t* head
        if s.count == 0:
            return False
        head = &s.ring[s.head]
        if head.source == P_AWAITING:
            if head.due > now:
                return False
            head.source = FU_LOST
            self.lost += 1
        seq[0] = head.seq
        stamp[0] = head.stamp
        source[0] = head.source
        head.keyed = 0
        s.head = (s.head + 1) % PER_SESSION
        s.count -= 1
        self._pending -= 1
        self.carried += 1
        return True

    def serve(self):
        """Handle every datagram pending now (up to 64 batches); return how many were read."""
        cdef _Batch buf = self._buf
        cdef int i, r, k, total = 0, rounds, sent, wait, si, unsent
        cdef int64_t user_rx, now_mono, tx, rx, wait_ns
        cdef header_t h
        cdef uint8_t* p
        cdef Py_ssize_t length, end
        cdef msghdr* msg
        cdef Check code
        cdef bint keyed = self._key is not None
        cdef bint stamped
        cdef session_t* s
        cdef pending_t* pd
        cdef uint64_t cseq
        cdef int64_t cstamp
        cdef uint8_t csource
        for rounds in range(SERVE_ROUNDS):
            buf.arm_recv(self._batch, True)
            r = recvmmsg(self._fd, buf.msgs, self._batch, MSG_DONTWAIT, NULL)
            if r < 0:
                if errno == EAGAIN or errno == EINTR:
                    if self.two_step_enabled:
                        # Woken by the error queue (a late or stray TX stamp), or by
                        # nothing: read it, or the wake descriptor stays readable.
                        self._drain()
                    break
                if errno == ECONNREFUSED or errno == EHOSTUNREACH or errno == ENETUNREACH:
                    continue  # a stale ICMP error of an earlier reply, now consumed
                raise _oserror(errno)
            total += r
            self.received += r
            user_rx = _clock(CLOCK_REALTIME)
            now_mono = _clock(CLOCK_MONOTONIC) if self._rate > 0 or self.two_step_enabled else 0
            k = 0
            stamped = False
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
                if self._rate > 0 and not self._buckets.allow_addr(&buf.names[i], now_mono):
                    self.rate_limited += 1
                    continue
                si = -1
                if self.two_step_enabled:
                    wait = _asks_two_step(p, length, h.flags)
                    if wait >= 0:
                        si = self._session(&buf.names[i], msg.msg_namelen, h.session, now_mono)
                        if si >= 0 and not self._has_room(&self._sessions[si], now_mono):
                            si = -1
                        if si < 0:
                            self.untracked += 1
                # Build the reply in place: fresh fill, never an echo of the payload.
                rx = _cmsg_rx_ns(msg)
                p[5] = C_REPLY | (C_HMACF if keyed else 0)
                _st64(p + 32, <uint64_t>(rx if rx != 0 else user_rx))
                end = length - C_HMAC if keyed else length
                if si >= 0:
                    s = &self._sessions[si]
                    p[4] = C_VERSION2
                    p[12] = TS_KERNEL_C if rx != 0 else TS_USER_C
                    p[14] = 0
                    p[15] = 0
                    if self._carry(s, now_mono, &cseq, &cstamp, &csource):
                        p[13] = csource
                        _st64(p + 48, cseq)
                        _st64(p + 56, <uint64_t>cstamp)
                    else:
                        p[13] = FU_NONE
                        memset(p + 48, 0, 16)
                    memset(p + C_TWO_STEP_MIN, 0, end - C_TWO_STEP_MIN)
                    wait_ns = wait * C_WAIT_UNIT if wait else self._wait
                    wait_ns = min(max(wait_ns, MIN_WAIT_NS), MAX_WAIT_NS)
                    pd = &s.ring[(s.head + s.count) % PER_SESSION]
                    pd.seq = h.seq
                    pd.due = now_mono + wait_ns
                    pd.stamp = 0
                    pd.keyed = 0
                    pd.source = P_AWAITING
                    self._txent[k] = si * PER_SESSION + <int>((s.head + s.count) % PER_SESSION)
                    s.count += 1
                    self._pending += 1
                    if self._next_due == 0 or pd.due < self._next_due:
                        self._next_due = pd.due
                    stamped = True
                else:
                    memset(p + C_HEADER, 0, end - C_HEADER)
                    self._txent[k] = -1
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
                    if self._txent[i] >= 0:
                        self._entry(self._txent[i]).pre_tx = tx
                sent = self._send(k)
                self.replied += sent
                if stamped:
                    self._settle(k, sent)
            if r < self._batch:
                break
        return total

    cdef inline pending_t* _entry(self, int e) noexcept nogil:
        return &self._sessions[e // PER_SESSION].ring[e % PER_SESSION]

    cdef void _settle(self, int k, int sent) noexcept:
        """Number the sent two-step replies as the kernel does (OPT_ID), forget the unsent
        ones (the last reserved of their sessions), then read the stamps already there."""
        cdef int i, e
        cdef pending_t* pd
        cdef bint unsent = False
        for i in range(min(sent, k)):
            e = self._txent[i]
            if e < 0:
                continue
            pd = self._entry(e)
            pd.key = self._next_key
            pd.keyed = 1
            self._keymap[self._next_key % RKEY_RING] = e
            self._next_key += 1
            self.two_step += 1
        for i in range(k - 1, sent - 1, -1):
            e = self._txent[i]
            if e < 0:
                continue
            self._sessions[e // PER_SESSION].count -= 1
            self._pending -= 1
            unsent = True
        if unsent:
            self._resync()
        else:
            self._drain()

    cdef void _drain(self) noexcept:
        """Read the kernel TX stamps queued for the socket; attach them to their replies."""
        cdef int i, r, e
        cdef msghdr* m
        cdef cmsghdr* c
        cdef timespec ts[3]
        cdef detnet_extended_err err
        cdef int64_t sw, key
        cdef pending_t* pd
        cdef int guard
        for guard in range(64):
            for i in range(ERR_BATCH):
                m = &self._errmsgs[i].msg_hdr
                memset(m, 0, sizeof(msghdr))
                m.msg_control = self._errctrl + i * CTRL_SIZE
                m.msg_controllen = CTRL_SIZE
            r = recvmmsg(self._fd, self._errmsgs, ERR_BATCH, MSG_ERRQUEUE | MSG_DONTWAIT, NULL)
            if r <= 0:
                return
            for i in range(r):
                m = &self._errmsgs[i].msg_hdr
                sw = 0
                key = -1
                c = CMSG_FIRSTHDR(m)
                while c != NULL:
                    if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_TIMESTAMPING:
                        memcpy(ts, CMSG_DATA(c), sizeof(ts))
                        sw = <int64_t>ts[0].tv_sec * 1000000000 + ts[0].tv_nsec
                    elif (c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_RECVERR) or (
                        c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_RECVERR
                    ):
                        memcpy(&err, CMSG_DATA(c), sizeof(err))
                        if (
                            err.ee_origin == DETNET_SO_EE_ORIGIN_TIMESTAMPING
                            and err.ee_info == DETNET_SCM_TSTAMP_SND
                        ):
                            key = err.ee_data
                    c = CMSG_NXTHDR(m, c)
                if key < 0 or sw == 0:
                    continue
                e = self._keymap[<uint32_t>key % RKEY_RING]
                if e < 0:
                    continue
                pd = self._entry(e)
                if not pd.keyed or pd.key != <uint32_t>key or pd.source != P_AWAITING:
                    continue
                self._keymap[<uint32_t>key % RKEY_RING] = -1
                if sw < pd.pre_tx:
                    continue  # a stale key (see _resync): leave it to be reported lost
                pd.stamp = sw
                pd.source = FU_KERNEL
                self.stamped += 1
            if r < ERR_BATCH:
                return

    cdef void _resync(self) noexcept:
        """After a failed stamped send the kernel may or may not have used a key: restart
        its OPT_ID counter (off and on again) so ours matches it; stamps awaited under the
        old numbering are reported lost when their wait is over."""
        cdef int flags = self._ts_flags & ~DETNET_SOF_OPT_ID
        self._drain()
        memset(self._keymap, 0xFF, RKEY_RING * sizeof(int32_t))
        if (
            setsockopt(self._fd, SOL_SOCKET, SO_TIMESTAMPING, &flags, sizeof(flags)) != 0
            or setsockopt(self._fd, SOL_SOCKET, SO_TIMESTAMPING, &self._ts_flags,
                          sizeof(self._ts_flags)) != 0
        ):
            self.two_step_enabled = False
        self._next_key = 0

    cdef int _send(self, int k) noexcept:
        """sendmmsg the k prepared replies (GSO-grouped); return how many went out (the
        first ones: messages keep the replies' order)."""
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

    def flush(self, now_ns=None):
        """Read TX stamps, then send a follow-up for every stamp whose wait is over at
        ``now_ns`` (CLOCK_MONOTONIC; now when None); return how many were sent."""
        cdef int64_t now = _clock(CLOCK_MONOTONIC) if now_ns is None else now_ns
        cdef int64_t next_due = 0
        cdef uint32_t si
        cdef int j = 0, count = 0
        cdef session_t* s
        cdef pending_t* head
        cdef uint8_t* p
        cdef uint8_t source
        cdef bint keyed = self._key is not None
        cdef Py_ssize_t size = C_TWO_STEP_MIN + (C_HMAC if keyed else 0)
        cdef uint8_t flags = C_REPLY | C_FOLLOWUP | (C_HMACF if keyed else 0)
        if self._pending == 0:
            self._next_due = 0
            return 0
        self._drain()
        for si in range(self._nsessions):
            s = &self._sessions[si]
            if not s.used:
                continue
            while s.count and s.ring[s.head].due <= now:
                head = &s.ring[s.head]
                if head.source == P_AWAITING:
                    head.source = FU_LOST
                    self.lost += 1
                source = head.source
                head.keyed = 0
                s.head = (s.head + 1) % PER_SESSION
                s.count -= 1
                self._pending -= 1
                if self._rate > 0 and not self._buckets.allow_addr(&s.name, now):
                    self.followups_limited += 1
                    continue
                p = self._fu.data + j * self._fu.slot
                memset(p, 0, size)
                _write_header(p, flags, <uint16_t>size, s.session, head.seq, 0, 0, 0)
                p[4] = C_VERSION2
                p[13] = source
                _st64(p + 48, head.seq)
                _st64(p + 56, <uint64_t>head.stamp)
                if keyed:
                    _sign(self._key, p, size)
                self._fu.tx_iov[j].iov_base = p
                self._fu.tx_iov[j].iov_len = size
                self._fu.tx_msgs[j].msg_hdr.msg_name = &s.name
                self._fu.tx_msgs[j].msg_hdr.msg_namelen = s.namelen
                self._fu.tx_msgs[j].msg_hdr.msg_control = NULL
                self._fu.tx_msgs[j].msg_hdr.msg_controllen = 0
                j += 1
                if j == ERR_BATCH:
                    count += self._send_followups(j)
                    j = 0
            if s.count and (next_due == 0 or s.ring[s.head].due < next_due):
                next_due = s.ring[s.head].due
        if j:
            count += self._send_followups(j)
        self._next_due = next_due
        return count

    cdef int _send_followups(self, int n) noexcept:
        """sendmmsg n follow-ups; one that cannot go (unreachable, full buffer) is skipped."""
        cdef int done = 0, sent = 0, r
        while done < n:
            r = sendmmsg(self._fd, self._fu.tx_msgs + done, n - done, MSG_DONTWAIT)
            if r < 0 and errno == EINTR:
                continue
            if r < 0:
                done += 1
                continue
            sent += r
            done += r
        self.followups += sent
        return sent

    def next_followup_ns(self):
        """CLOCK_MONOTONIC ns when the next follow-up is due (call flush() then), 0: none."""
        return self._next_due if self._pending else 0

    def pending_followups(self):
        """Two-step stamps not yet delivered (in a reply or a follow-up)."""
        return self._pending

    def stats(self):
        """Counters since start (see docs/protocol.md, "Counters")."""
        return {
            "received": self.received,
            "replied": self.replied,
            "invalid": self.invalid,
            "bad_hmac": self.bad_hmac,
            "rate_limited": self.rate_limited,
            "two_step": self.two_step,
            "untracked": self.untracked,
            "stamped": self.stamped,
            "carried": self.carried,
            "followups": self.followups,
            "lost": self.lost,
            "followups_limited": self.followups_limited,
        }
