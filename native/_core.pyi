"""Typed API of the native core. ``_core.pyx`` and ``_fallback.py`` both implement it.

Conventions: times are int nanoseconds. Packet timestamps and kernel timestamps are
CLOCK_REALTIME (the kernel stamps with it); scheduling uses CLOCK_MONOTONIC.
"""

import socket
from typing import Final

import numpy as np
import numpy.typing as npt

# --- probe packet (docs/protocol.md) ------------------------------------------------
MAGIC: Final[int]  # 0x44544E54, b"DTNT"
VERSION: Final[int]  # 1
HEADER_SIZE: Final[int]  # 48
HMAC_SIZE: Final[int]  # 16 (HMAC-SHA256 truncated)
MIN_SIZE: Final[int]  # HEADER_SIZE (HEADER_SIZE + HMAC_SIZE when keyed)
MAX_SIZE: Final[int]  # 9000
FLAG_REPLY: Final[int]  # 0x01: set by the reflector
FLAG_HMAC: Final[int]  # 0x02: an HMAC trailer ends the packet

# --- timestamp sources (REPLY_DTYPE["source"]) ----------------------------------------
TS_USER: Final[int]  # 0: user-space clock reads next to the syscalls
TS_KERNEL: Final[int]  # 1: kernel software RX (and TX when kernel_tx_ns != 0)

class PacketError(ValueError):
    """A datagram that is not a valid detnet probe (says why)."""

class HmacError(PacketError):
    """A probe whose HMAC is wrong, missing while a key is set, or present without a key."""

class Probe:
    """A decoded probe packet (request or reply)."""

    flags: int
    size: int
    session: int
    seq: int
    tx_ns: int
    refl_rx_ns: int
    refl_tx_ns: int
    @property
    def is_reply(self) -> bool: ...

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
) -> bytes:
    """Encode one probe of exactly ``size`` bytes (HMAC trailer included when keyed)."""

def decode_probe(data: bytes | bytearray | memoryview, *, key: bytes | None = ...) -> Probe:
    """Decode and strictly validate a probe; raise PacketError with the reason."""

def make_reply(
    data: bytes | bytearray | memoryview, *, rx_ns: int, tx_ns: int, key: bytes | None = ...
) -> bytes:
    """Validate a request and return its reply: same size, REPLY flag, reflector stamps."""

# --- clocks --------------------------------------------------------------------------
def realtime_ns() -> int: ...
def monotonic_ns() -> int: ...
def clock_read_cost_ns(n: int = ...) -> float:
    """Mean cost of one clock_gettime(CLOCK_REALTIME) in ns, over ``n`` reads."""

# --- probing -------------------------------------------------------------------------
SENT_DTYPE: np.dtype  # seq u8, user_tx_ns i8, kernel_tx_ns i8 (0: none)
REPLY_DTYPE: np.dtype
# seq u8, session u4, size u4, tx_ns i8 (sender stamp carried in the packet),
# refl_rx_ns i8, refl_tx_ns i8, kernel_rx_ns i8 (0: none), user_rx_ns i8, source u1

class ProbeSocket:
    """A connected non-blocking UDP socket that sends probes and drains their replies.

    Kernel RX timestamps (SO_TIMESTAMPING software RX, or SO_TIMESTAMPNS) are enabled;
    software TX timestamps too when the kernel offers them (OPT_ID | OPT_TSONLY), read from
    the error queue right after each send so the socket never sits in POLLERR (uvloop's
    add_reader would stop for good).
    """

    session: int
    size: int
    kernel_rx: bool
    kernel_tx: bool
    invalid: int  # datagrams received that were not valid replies of this session
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
    ) -> None: ...
    def fileno(self) -> int: ...
    def send(self, first_seq: int, count: int, out: npt.NDArray[np.void]) -> int:
        """Send ``count`` probes numbered from ``first_seq`` (one sendmmsg); fill
        ``out[:n]`` (SENT_DTYPE) and return n, the number the kernel took."""
    def recv(self, out: npt.NDArray[np.void]) -> int:
        """Drain up to len(out) replies (recvmmsg, non-blocking) into ``out`` (REPLY_DTYPE);
        return how many valid replies were written. Invalid ones only bump ``invalid``."""
    def close(self) -> None: ...

class Reflector:
    """The reflector fast path on a bound non-blocking UDP socket.

    Each call to ``serve()`` drains the socket in batches (recvmmsg), drops anything that
    does not parse or fails its HMAC, applies a per-source-address token bucket, stamps
    reflector RX (kernel) and TX, and answers with sendmmsg: never more bytes than came in.
    """

    kernel_rx: bool
    received: int
    replied: int
    invalid: int
    bad_hmac: int
    rate_limited: int
    def __init__(
        self,
        sock: socket.socket,
        *,
        key: bytes | None = ...,
        rate_pps: float = ...,  # per source address; 0 means unlimited
        burst: int = ...,
        batch: int = ...,
    ) -> None: ...
    def serve(self) -> int:
        """Handle every datagram pending now; return how many were read."""
    def stats(self) -> dict[str, int]: ...

# --- TCP -----------------------------------------------------------------------------
def tcp_info_rtt(fd: int) -> tuple[int, int]:
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
