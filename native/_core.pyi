"""Typed API of the native core. ``_core.pyx`` and ``_fallback.py`` both implement it.

Conventions: times are int nanoseconds. Packet timestamps and kernel timestamps are
CLOCK_REALTIME (the kernel stamps with it; raw hardware stamps are the NIC's clock);
scheduling and the reflector's follow-up deadlines use CLOCK_MONOTONIC.
"""

import socket
from typing import Final

import numpy as np
import numpy.typing as npt

from detnet.native._common import ForeignDatagram as ForeignDatagram
from detnet.native._common import IcmpNotPermitted as IcmpNotPermitted
from detnet.native._common import TimestampPlan as TimestampPlan
from detnet.native._common import device_caps as device_caps
from detnet.native._common import plan_timestamping as plan_timestamping
from detnet.native._common import route_device as route_device

# --- probe packet (docs/protocol.md) ------------------------------------------------
MAGIC: Final[int]  # 0x44544E54, b"DTNT"
VERSION: Final[int]  # 1: requests and one-step replies
VERSION_TWO_STEP: Final[int]  # 2: two-step replies and follow-ups
HEADER_SIZE: Final[int]  # 48
HMAC_SIZE: Final[int]  # 16 (HMAC-SHA256 truncated)
MIN_SIZE: Final[int]  # HEADER_SIZE (HEADER_SIZE + HMAC_SIZE when keyed)
MAX_SIZE: Final[int]  # 9000
EXT_SIZE: Final[int]  # 16: the two-step block after the header
TWO_STEP_MIN_SIZE: Final[int]  # 64 (+ HMAC_SIZE when keyed): smaller probes are one-step
CAP_MAGIC: Final[int]  # 0x44545332, b"DTS2": a request's fill asks for two-step stamps
FLAG_REPLY: Final[int]  # 0x01: set by the reflector
FLAG_HMAC: Final[int]  # 0x02: an HMAC trailer ends the packet
FLAG_FOLLOWUP: Final[int]  # 0x04 (version 2): a follow-up packet
ICMP_MIN_SIZE: Final[int]  # 56: ICMP header + a detnet header as the echo payload

# --- timestamp sources ---------------------------------------------------------------
# REPLY_DTYPE "source" (our RX stamp) and "refl_source" (the reflector's refl_rx_ns).
TS_USER: Final[int]  # 0: user-space clock reads next to the syscalls
TS_KERNEL: Final[int]  # 1: kernel software stamp
TS_HARDWARE: Final[int]  # 2: raw hardware stamp (hw_rx_ns / hw_tx_ns)
TS_UNKNOWN: Final[int]  # 0xFF: a version-1 reply or an echo does not say
# REPLY_DTYPE "followup_source": the stamp a two-step reply or follow-up carries.
FOLLOWUP_NONE: Final[int]  # 0: none in this row
FOLLOWUP_KERNEL: Final[int]  # 1: refl_tx_kernel_ns is the reflector's kernel software TX
FOLLOWUP_HARDWARE: Final[int]  # 2: ... its hardware TX (not sent by this reflector yet)
FOLLOWUP_LOST: Final[int]  # 3: no kernel TX stamp for followup_seq: use one-step for it
# REPLY_DTYPE "kind".
KIND_REPLY: Final[int]  # 0: one-step reply (version-1 reflector, or untracked session)
KIND_REPLY_2STEP: Final[int]  # 1: version-2 reply; its own kernel TX stamp comes later
KIND_FOLLOWUP: Final[int]  # 2: a follow-up: only followup_* / refl_tx_kernel_ns are set
KIND_ECHO: Final[int]  # 3: a verbatim echo of our request (echo server, ICMP echo)

class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""

class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""

class Probe:
    """A decoded probe packet (request, reply or follow-up)."""

    version: int
    flags: int
    size: int
    session: int
    seq: int
    tx_ns: int
    refl_rx_ns: int
    refl_tx_ns: int
    rx_source: int  # version 2: source of refl_rx_ns (TS_*)
    followup_source: int  # version 2: FOLLOWUP_*
    followup_seq: int  # version 2: the seq whose reflector TX stamp this carries
    followup_tx_ns: int  # version 2: that stamp (reflector kernel TX)
    two_step: bool  # a request asking for two-step stamps
    followup_wait_ns: int  # ... and how long the reflector may wait (0: its default)
    @property
    def is_reply(self) -> bool: ...
    @property
    def is_followup(self) -> bool: ...

def encode_probe(
    *,
    session: int,
    seq: int,
    tx_ns: int,
    size: int = ...,
    key: bytes | None = ...,
    flags: int = ...,
    refl_rx_ns: int = ...,
    refl_tx_ns: int = ...,
    version: int = ...,
    two_step: bool = ...,
    followup_wait_ns: int = ...,
    rx_source: int = ...,
    followup_source: int = ...,
    followup_seq: int = ...,
    followup_tx_ns: int = ...,
) -> bytes:
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed);
    ValueError when the fields would not make a valid packet."""

def decode_probe(data: bytes | bytearray | memoryview, *, key: bytes | None = ...) -> Probe:
    """Decode and strictly validate a probe; raise PacketError with the reason."""

def make_reply(
    data: bytes | bytearray | memoryview, *, rx_ns: int, tx_ns: int, key: bytes | None = ...
) -> bytes:
    """Validate a request and return its one-step (version 1) reply: same size, REPLY flag,
    reflector stamps."""

# --- clocks --------------------------------------------------------------------------
def realtime_ns() -> int: ...
def monotonic_ns() -> int: ...
def clock_read_cost_ns(n: int = ...) -> float:
    """Mean cost of one clock_gettime(CLOCK_REALTIME) in ns, over ``n`` reads."""

# --- probing -------------------------------------------------------------------------
SENT_DTYPE: np.dtype
# seq u8, user_tx_ns i8, kernel_tx_ns i8 (software, 0: none), hw_tx_ns i8 (0: none)
REPLY_DTYPE: np.dtype
# seq u8, session u4, size u4, tx_ns i8 (sender stamp carried in the packet),
# refl_rx_ns i8, refl_tx_ns i8, kernel_rx_ns i8 (software, 0: none), user_rx_ns i8,
# source u1 (TS_*: the best RX stamp), kind u1 (KIND_*), refl_source u1 (TS_*),
# followup_source u1 (FOLLOWUP_*), followup_seq u8, refl_tx_kernel_ns i8 (the
# reflector's kernel TX of followup_seq), hw_rx_ns i8 (raw hardware RX, 0: none)

class ProbeSocket:
    """A connected non-blocking UDP socket that sends probes and drains their replies.

    Kernel RX timestamps (SO_TIMESTAMPING, or SO_TIMESTAMPNS) are enabled; TX ones too
    when the kernel offers them (OPT_ID | OPT_TSONLY), read from the error queue right
    after each send. ``fileno()`` is an epoll descriptor readable on replies and on late
    TX stamps, so the error queue never leaves the socket in POLLERR (uvloop's
    add_reader would stop for good). ``two_step`` asks reflectors for two-step stamps
    (when ``size`` has room, else the attribute says False). ``hardware``: "off",
    "auto" (when ethtool reports hardware stamps for ``device`` or the route's device)
    or "on" (ask anyway); each packet falls back to software stamps by itself.
    """

    session: int
    size: int
    two_step: bool
    kernel_rx: bool
    kernel_tx: bool
    hardware: bool  # hardware stamps requested (and SO_TIMESTAMPING accepted)
    timestamping: TimestampPlan | None  # None with kernel_timestamps=False
    first_foreign: ForeignDatagram | None
    received: int  # datagrams read
    replies: int  # KIND_REPLY and KIND_REPLY_2STEP rows
    followups: int  # KIND_FOLLOWUP rows
    echoes: int  # KIND_ECHO rows
    foreign: int  # neither ours nor an echo: other magic, other session, too long
    bad_hmac: int  # ours or an echo, but the HMAC is wrong, missing or unexpected
    invalid: int  # detnet magic but malformed, or ours but neither a reply nor an echo
    def __init__(
        self,
        host: str,
        port: int,
        *,
        session: int,
        size: int = ...,
        key: bytes | None = ...,
        bind: tuple[str, int] | None = ...,
        kernel_timestamps: bool = ...,
        two_step: bool = ...,
        followup_wait_ns: int = ...,  # 0: the reflector's default; else 100 us steps
        hardware: str = ...,
        device: str | None = ...,
    ) -> None: ...
    def fileno(self) -> int: ...
    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int:
        """Send ``count`` probes numbered from ``first_seq`` (one sendmmsg); fill
        ``out[:n]`` (SENT_DTYPE) and return n, the number the kernel took."""
    def recv(self, out: npt.NDArray[np.void]) -> int:
        """Drain up to len(out) datagrams (recvmmsg, non-blocking) into ``out``
        (REPLY_DTYPE); return the rows written (replies, two-step replies, follow-ups,
        echoes); everything else only bumps a counter."""
    def take_tx_stamps(self, out: npt.NDArray[np.void]) -> int:
        """Kernel TX stamps that arrived after send() returned, as SENT_DTYPE rows
        (user_tx_ns 0; a zero stamp field means "not in this row"); return how many."""
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class IcmpProbeSocket:
    """ICMP echo probes to one host with ProbeSocket's shape and dtypes (rows KIND_ECHO).

    ``kind``: "auto" (ping socket, else raw), "ping" (SOCK_DGRAM/IPPROTO_ICMP, allowed
    by net.ipv4.ping_group_range) or "raw" (CAP_NET_RAW). IcmpNotPermitted (with the
    sysctl to set) when neither may be opened. ``size`` counts the ICMP header.
    """

    session: int
    size: int
    kind: str  # "ping" or "raw": the socket in use
    ident: int  # the ICMP identifier on the wire
    family: int
    address: str
    kernel_rx: bool
    kernel_tx: bool
    hardware: bool
    timestamping: TimestampPlan | None
    first_foreign: ForeignDatagram | None
    received: int
    echoes: int
    foreign: int
    other_ident: int  # echo replies of other processes (raw sockets see them all)
    invalid: int
    def __init__(
        self,
        host: str,
        *,
        session: int,
        size: int = ...,
        kind: str = ...,
        ident: int | None = ...,  # raw sockets only (a ping socket's is the kernel's)
        kernel_timestamps: bool = ...,
        hardware: str = ...,
        device: str | None = ...,
    ) -> None: ...
    def fileno(self) -> int: ...
    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int: ...
    def recv(self, out: npt.NDArray[np.void]) -> int: ...
    def take_tx_stamps(self, out: npt.NDArray[np.void]) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class Reflector:
    """The reflector fast path on a bound non-blocking UDP socket.

    Each call to ``serve()`` drains the socket in batches (recvmmsg), drops anything that
    does not parse or fails its HMAC, applies a per-source-address token bucket, stamps
    reflector RX (kernel) and TX, and answers with sendmmsg: never more bytes than came in.
    With ``two_step``, requests that ask for it get version-2 replies; their kernel TX
    stamps go back in the session's next reply, or in a follow-up that ``flush()`` sends
    once the request's wait (``followup_wait_ns`` when it gives none) is over.
    """

    kernel_rx: bool
    two_step_enabled: bool
    received: int
    replied: int
    invalid: int
    bad_hmac: int
    rate_limited: int
    two_step: int  # version-2 replies sent
    untracked: int  # two-step asked, but the session did not fit: one-step reply
    stamped: int  # kernel TX stamps read for two-step replies
    carried: int  # stamps delivered in a later reply
    followups: int  # follow-up packets sent
    lost: int  # stamps given up on (no kernel stamp by the end of the wait)
    followups_limited: int  # follow-ups the source's token bucket refused
    def __init__(
        self,
        sock: socket.socket,
        *,
        key: bytes | None = ...,
        rate_pps: float = ...,  # per source address; 0 means unlimited
        burst: int = ...,
        batch: int = ...,
        two_step: bool = ...,
        followup_wait_ns: int = ...,  # 20 ms; requests may ask for 0.1 ms .. 1 s
        sessions: int = ...,  # two-step sessions tracked at once (1024)
    ) -> None: ...
    def fileno(self) -> int:
        """A descriptor readable on datagrams and queued TX stamps: watch it, not the
        socket, so that error-queue entries never surface as POLLERR."""
    def serve(self) -> int:
        """Handle every datagram pending now; return how many were read."""
    def flush(self, now_ns: int | None = ...) -> int:
        """Send the follow-ups due at ``now_ns`` (CLOCK_MONOTONIC); return how many."""
    def next_followup_ns(self) -> int:
        """CLOCK_MONOTONIC ns when flush() has work next (0: nothing pending)."""
    def pending_followups(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None:
        """Close the wake descriptor (the socket is the caller's)."""

# --- Token buckets -------------------------------------------------------------------
SOURCE_TABLE_SIZE: Final[int]  # 4096: sources SourceBuckets holds at once

class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; full at ``now_ns``.

    Sans-I/O: every call takes the time (ns, one monotonic clock; an earlier time than
    the last counts as no time passed). The one token-bucket arithmetic of detnet."""

    def __init__(self, *, rate: float, burst: float, now_ns: int) -> None: ...
    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> float: ...
    @property
    def tokens(self) -> float:
        """Tokens as of the last call (negative: in debt)."""
    def take(self, now_ns: int) -> bool:
        """Take one token if there is one; False (nothing taken) when there is not."""
    def borrow(self, now_ns: int) -> None:
        """Take one token now, into debt if the bucket has none."""
    def wait_ns(self, now_ns: int) -> int:
        """Nanoseconds from ``now_ns`` until ``take()`` succeeds (0: now)."""

class SourceBuckets:
    """A token bucket per source address (text, as the socket API gives it) in a table
    of at most ``SOURCE_TABLE_SIZE`` sources; the stalest is forgotten. ``rate_pps`` 0
    means unlimited. The reflectors use the same table for their datagrams."""

    def __init__(self, *, rate_pps: float, burst: float) -> None: ...
    def __len__(self) -> int: ...
    def allow(self, source: str, now_ns: int) -> bool:
        """Take one token from ``source``'s bucket; False when it is empty."""

# --- TCP -----------------------------------------------------------------------------
def tcp_info_rtt(fd: int) -> tuple[int, int]:
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
