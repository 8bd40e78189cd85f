"""ICMP echo probes in pure Python (fallback of ``_icmp.pxi``; docs/protocol.md, "ICMP").

The target's kernel answers, so kernel TX and RX stamps make the RTT kernel-to-kernel
without any reflector. The echo payload is a detnet version-1 request (session, full
64-bit seq, TX stamp), echoed verbatim; the ICMP sequence number is its low 16 bits.
An unprivileged ping socket (SOCK_DGRAM, allowed by net.ipv4.ping_group_range) is tried
first: the kernel picks the identifier (the socket's "port") and hands us only replies
carrying it. A raw socket (CAP_NET_RAW) is the fallback: we choose the identifier, filter
ICMP types in the kernel, and skip other processes' echo replies ourselves.
"""

from __future__ import annotations

import errno
import random
import socket
import struct

import numpy as np
import numpy.typing as npt

from detnet.native import _py_codec as c
from detnet.native._common import (
    ICMP_ECHO,
    ICMP_HEADER,
    REPLY_DTYPE,
    SENT_DTYPE,
    ForeignDatagram,
    TimestampPlan,
    foreign_datagram,
    icmp_filter,
    open_icmp,
    timestamp_plan,
)
from detnet.native._py_sockets import (
    ANC_SIZE,
    MAX_BATCH,
    RCVBUF_BYTES,
    U64,
    TxStamps,
    Wake,
    enable_timestamps,
    i64,
    realtime_ns,
    rx_stamps,
    source_of,
)

ICMP_MIN_SIZE = ICMP_HEADER + c.HEADER_SIZE
IP_MAX_HEADER = 60
_ICMP = struct.Struct("!BBHHH")

ICMP_COUNTERS = ("received", "echoes", "foreign", "other_ident", "invalid")


def icmp_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    total = sum(struct.unpack(f"!{len(raw) // 2}H", raw))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class IcmpProbeSocket:
    """ICMP echo probes to one host, with the ProbeSocket shape and dtypes."""

    def __init__(
        self,
        host: str,
        *,
        session: int,
        size: int = 64,
        kind: str = "auto",
        ident: int | None = None,
        kernel_timestamps: bool = True,
        hardware: str = "off",
        device: str | None = None,
    ) -> None:
        if not ICMP_MIN_SIZE <= size <= c.MAX_SIZE:
            raise ValueError(f"icmp probe size {size} is not in {ICMP_MIN_SIZE}..{c.MAX_SIZE}")
        if ident is not None and not 0 <= ident <= 0xFFFF:
            raise ValueError(f"icmp identifier {ident} does not fit in 16 bits")
        payload = c.encode_probe(session=session, seq=0, tx_ns=0, size=size - ICMP_HEADER)
        self.session = session
        self.size = size
        self.received = self.echoes = self.foreign = self.other_ident = self.invalid = 0
        self.first_foreign: ForeignDatagram | None = None
        self._tx = TxStamps()
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, addr = infos[0]
        if family not in ICMP_ECHO:
            raise OSError(f"{host!r}: ICMP echo needs an IPv4 or IPv6 address")
        self.family = family
        self.address = str(addr[0])
        self._request, self._reply = ICMP_ECHO[family]
        self.timestamping: TimestampPlan | None = None
        if kernel_timestamps:
            self.timestamping = timestamp_plan(
                want=hardware, host=self.address, device=device, tx=True
            )
        self._sock, self.kind = open_icmp(family, kind)
        try:
            self._sock.setblocking(False)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            if self.kind == "raw":
                self._sock.setsockopt(*icmp_filter(family))
            self._sock.connect((self.address, 0, *addr[2:]))
            if self.kind == "ping":
                self.ident = self._sock.getsockname()[1]  # the kernel's, whatever we send
            else:
                self.ident = random.getrandbits(16) if ident is None else ident
            if self.timestamping is not None:
                self.kernel_rx, self.kernel_tx = enable_timestamps(
                    self._sock, self.timestamping.flags
                )
            else:
                self.kernel_rx = self.kernel_tx = False
            self.hardware = bool(
                self.timestamping and self.timestamping.hardware and self.kernel_rx
            )
            self._wake = Wake(self._sock.fileno())
        except BaseException:
            self._sock.close()
            raise
        # The kernel computes the checksum for ping sockets and for ICMPv6; we do raw IPv4.
        self._checksum = self.kind == "raw" and family == socket.AF_INET
        self._packet = bytearray(_ICMP.pack(self._request, 0, 0, self.ident, 0) + payload)
        self._payload = payload
        self._offset = IP_MAX_HEADER if self.kind == "raw" and family == socket.AF_INET else 0
        self._buf = bytearray(self._offset + size)

    def fileno(self) -> int:
        """The descriptor to watch (loop.add_reader): readable on replies and late stamps."""
        return self._wake.fileno()

    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int:
        """Send ``count`` echo requests numbered from ``first_seq``; fill ``out[:n]``."""
        if out.dtype != SENT_DTYPE or count > len(out) or count < 0:
            raise ValueError("out must be a SENT_DTYPE array with at least `count` records")
        if count > MAX_BATCH:
            raise ValueError(f"count {count} is not in 0..{MAX_BATCH}")
        if self._sock.fileno() < 0:
            raise OSError("icmp probe socket is closed")
        buf = self._packet
        tx_ns = realtime_ns()
        sent = 0
        for i in range(count):
            seq = (first_seq + i) & U64
            struct.pack_into("!HHH", buf, 2, 0, self.ident, seq & 0xFFFF)
            struct.pack_into("!QQ", buf, ICMP_HEADER + 16, seq, tx_ns)
            if self._checksum:
                struct.pack_into("!H", buf, 2, icmp_checksum(buf))
            try:
                self._sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            out[i] = (seq, tx_ns, 0, 0)
            sent += 1
        if self.kernel_tx:
            self._tx.drain(self._sock, out, sent)
            self._tx.sent(first_seq, sent)
        return sent

    def take_tx_stamps(self, out: npt.NDArray[np.void]) -> int:
        """Kernel TX stamps that arrived after send() returned (as ProbeSocket's)."""
        return self._tx.take(out)

    def recv(self, out: npt.NDArray[np.void]) -> int:
        """Drain up to len(out) echo replies into ``out`` (REPLY_DTYPE, kind KIND_ECHO)."""
        if out.dtype != REPLY_DTYPE:
            raise ValueError("out must be a REPLY_DTYPE array")
        if self._sock.fileno() < 0:
            raise OSError("icmp probe socket is closed")
        if self.kernel_tx:
            self._tx.drain(self._sock, None, 0)
        n = 0
        view = memoryview(self._buf)
        while n < len(out) and n < MAX_BATCH:
            try:
                length, ancdata, _, addr = self._sock.recvmsg_into(
                    [self._buf], ANC_SIZE, socket.MSG_TRUNC
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED):
                    break  # an ICMP error for an earlier probe: the probe counts as lost
                raise
            user_rx = realtime_ns()
            self.received += 1
            f = self._classify(view, length, addr)
            if f is None:
                continue
            rx_sw, rx_hw = rx_stamps(ancdata)
            out[n] = (
                f.seq,
                f.session,
                self.size,
                i64(f.tx_ns),
                0,
                0,
                rx_sw,
                user_rx,
                source_of(rx_sw, rx_hw),
                c.KIND_ECHO,
                c.TS_UNKNOWN,
                c.FOLLOWUP_NONE,
                0,
                0,
                rx_hw,
            )
            n += 1
        return n

    def _classify(self, view: memoryview, length: int, addr: object) -> c.Fields | None:
        """The echoed probe's fields, or None once counted as not ours."""
        start = 0
        if self._offset:  # raw IPv4 hands us the IP header too
            if length < 20 or length > len(view):
                return self._foreign(view, length, addr)
            start = (view[0] & 0x0F) * 4
        icmp = view[start:length]
        if len(icmp) < ICMP_HEADER or length - start > self.size:
            return self._foreign(icmp, length - start, addr)
        type_, code, _, ident, seq16 = _ICMP.unpack_from(icmp)
        if type_ != self._reply or code != 0:
            return self._foreign(icmp, len(icmp), addr)
        if self.kind == "raw" and ident != self.ident:
            self.other_ident += 1  # another process's ping: not for us, not a fault
            return None
        payload = icmp[ICMP_HEADER:]
        n = len(payload)
        if n != len(self._payload) or payload[:4] != self._payload[:4]:
            return self._foreign(icmp, len(icmp), addr)
        f = c.Fields()
        if c.check_header(payload, n, f) != c.OK:
            self.invalid += 1
            return None
        if f.session != self.session:
            return self._foreign(icmp, len(icmp), addr)
        if (
            f.flags
            or f.refl_rx_ns
            or f.refl_tx_ns
            or f.seq & 0xFFFF != seq16
            or payload[c.HEADER_SIZE :] != self._payload[c.HEADER_SIZE :]
        ):
            self.invalid += 1  # our session, but not a verbatim echo of our request
            return None
        self.echoes += 1
        return f

    def _foreign(self, view: memoryview, length: int, addr: object) -> c.Fields | None:
        """Count a datagram that is not ours; keep the first one for the report."""
        self.foreign += 1
        if self.first_foreign is None:
            self.first_foreign = foreign_datagram(
                data=bytes(view[: min(max(length, 0), 16)]), size=length, address=addr
            )
        return None

    def stats(self) -> dict[str, int]:
        """Counters: received, echoes, foreign, other_ident (another process's replies on a
        raw socket), invalid, late_tx_dropped."""
        out = {name: int(getattr(self, name)) for name in ICMP_COUNTERS}
        out["late_tx_dropped"] = self._tx.late_dropped
        return out

    def close(self) -> None:
        """Close the socket and its wake descriptor (idempotent)."""
        self._wake.close()
        self._sock.close()
