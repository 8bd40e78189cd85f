"""Pure-Python fallback of the native core: same API as ``_core.pyx`` (see ``_core.pyi``).

Used when the Cython extension is not built or ``DETNET_NO_EXTENSIONS=1``. It speaks the
same packet format (docs/protocol.md) with ``struct``, reads kernel timestamps with
``socket.recvmsg`` ancillary data, and loops over ``sendmsg``/``recvmsg`` where the Cython
build batches with ``sendmmsg``/``recvmmsg``. Correct, and several times slower. The
parts live in ``_py_bucket``, ``_py_codec``, ``_py_sockets``, ``_py_icmp`` and
``_py_reflector``.
"""

from __future__ import annotations

import socket
import struct

from detnet.native._common import (
    REPLY_DTYPE,
    SENT_DTYPE,
    ForeignDatagram,
    IcmpNotPermitted,
    TimestampPlan,
    device_caps,
    plan_timestamping,
    route_device,
)
from detnet.native._py_bucket import SOURCE_TABLE_SIZE, SourceBuckets, TokenBucket
from detnet.native._py_codec import (
    CAP_MAGIC,
    EXT_SIZE,
    FLAG_FOLLOWUP,
    FLAG_HMAC,
    FLAG_REPLY,
    FOLLOWUP_HARDWARE,
    FOLLOWUP_KERNEL,
    FOLLOWUP_LOST,
    FOLLOWUP_NONE,
    HEADER_SIZE,
    HMAC_SIZE,
    KIND_ECHO,
    KIND_FOLLOWUP,
    KIND_REPLY,
    KIND_REPLY_2STEP,
    MAGIC,
    MAX_SIZE,
    MIN_SIZE,
    TS_HARDWARE,
    TS_KERNEL,
    TS_UNKNOWN,
    TS_USER,
    TWO_STEP_MIN_SIZE,
    VERSION,
    VERSION_TWO_STEP,
    HmacError,
    PacketError,
    Probe,
    decode_probe,
    encode_probe,
    make_reply,
)
from detnet.native._py_icmp import ICMP_MIN_SIZE, IcmpProbeSocket
from detnet.native._py_reflector import Reflector
from detnet.native._py_sockets import (
    ProbeSocket,
    clock_read_cost_ns,
    monotonic_ns,
    realtime_ns,
)

__all__ = [
    "CAP_MAGIC",
    "EXT_SIZE",
    "FLAG_FOLLOWUP",
    "FLAG_HMAC",
    "FLAG_REPLY",
    "FOLLOWUP_HARDWARE",
    "FOLLOWUP_KERNEL",
    "FOLLOWUP_LOST",
    "FOLLOWUP_NONE",
    "HEADER_SIZE",
    "HMAC_SIZE",
    "ICMP_MIN_SIZE",
    "KIND_ECHO",
    "KIND_FOLLOWUP",
    "KIND_REPLY",
    "KIND_REPLY_2STEP",
    "MAGIC",
    "MAX_SIZE",
    "MIN_SIZE",
    "REPLY_DTYPE",
    "SENT_DTYPE",
    "SOURCE_TABLE_SIZE",
    "TS_HARDWARE",
    "TS_KERNEL",
    "TS_UNKNOWN",
    "TS_USER",
    "TWO_STEP_MIN_SIZE",
    "VERSION",
    "VERSION_TWO_STEP",
    "ForeignDatagram",
    "HmacError",
    "IcmpNotPermitted",
    "IcmpProbeSocket",
    "PacketError",
    "Probe",
    "ProbeSocket",
    "Reflector",
    "SourceBuckets",
    "TimestampPlan",
    "TokenBucket",
    "clock_read_cost_ns",
    "decode_probe",
    "device_caps",
    "encode_probe",
    "make_reply",
    "monotonic_ns",
    "plan_timestamping",
    "realtime_ns",
    "route_device",
    "tcp_info_rtt",
]

_TCP_INFO = 11


def tcp_info_rtt(fd: int) -> tuple[int, int]:
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
    with socket.socket(fileno=socket.dup(fd)) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    if len(info) < 76:
        raise OSError(f"TCP_INFO returned only {len(info)} bytes")
    rtt, rttvar = struct.unpack_from("=II", info, 68)
    return rtt, rttvar
