# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native core in Cython: packet codec, timestamped probe sockets, reflector fast path.

Python's ``socket`` module creates, binds and connects sockets; this module then drives
the file descriptor with ``sendmmsg``/``recvmmsg``/``recvmsg(MSG_ERRQUEUE)`` over C
buffers, reads kernel timestamps from control messages and writes numpy records
directly: no Python object per packet (HMAC aside, which calls the C-implemented
``hmac.digest``). Same API as ``_fallback.py``; the contract is ``_core.pyi``. The parts
are included from ``_bucket.pxi``, ``_codec.pxi``, ``_sockets.pxi``, ``_icmp.pxi`` and
``_reflector.pxi`` (C declarations in ``_core.pxi``); what is not per packet lives once
in ``_common.py``.
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
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

import hmac as _hmac
import os as _os
import random as _random
import socket as _socket

import numpy as np

from detnet.native._common import DEFAULT_WAIT_NS as _DEFAULT_WAIT_NS
from detnet.native._common import ICMP_ECHO as _ICMP_ECHO
from detnet.native._common import MAX_WAIT_NS as _MAX_WAIT_NS
from detnet.native._common import MIN_WAIT_NS as _MIN_WAIT_NS
from detnet.native._common import REPLY_DTYPE, SENT_DTYPE
from detnet.native._common import ForeignDatagram as _ForeignDatagram
from detnet.native._common import check_reflector_args as _check_reflector_args
from detnet.native._common import icmp_filter as _icmp_filter
from detnet.native._common import open_icmp as _open_icmp
from detnet.native._common import timestamp_plan as _timestamp_plan
from detnet.native._common import (
    ForeignDatagram,
    IcmpNotPermitted,
    TimestampPlan,
    device_caps,
    plan_timestamping,
    route_device,
)

include "_core.pxi"
include "_bucket.pxi"
include "_codec.pxi"
include "_sockets.pxi"
include "_icmp.pxi"
include "_reflector.pxi"

cnp.import_array()

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

MAGIC = C_MAGIC
VERSION = C_VERSION
VERSION_TWO_STEP = C_VERSION2
HEADER_SIZE = C_HEADER
HMAC_SIZE = C_HMAC
MIN_SIZE = C_HEADER
MAX_SIZE = C_MAX
EXT_SIZE = C_EXT
TWO_STEP_MIN_SIZE = C_TWO_STEP_MIN
ICMP_MIN_SIZE = C_ICMP_HEADER + C_HEADER
CAP_MAGIC = C_CAP_MAGIC
FLAG_REPLY = C_REPLY
FLAG_HMAC = C_HMACF
FLAG_FOLLOWUP = C_FOLLOWUP
TS_USER = TS_USER_C
TS_KERNEL = TS_KERNEL_C
TS_HARDWARE = TS_HARDWARE_C
TS_UNKNOWN = TS_UNKNOWN_C
FOLLOWUP_NONE = FU_NONE
FOLLOWUP_KERNEL = FU_KERNEL
FOLLOWUP_HARDWARE = FU_HARDWARE
FOLLOWUP_LOST = FU_LOST
KIND_REPLY = K_REPLY
KIND_REPLY_2STEP = K_REPLY2
KIND_FOLLOWUP = K_FOLLOWUP
KIND_ECHO = K_ECHO

assert SENT_DTYPE.itemsize == sizeof(sent_rec)
assert REPLY_DTYPE.itemsize == sizeof(reply_rec)


def tcp_info_rtt(int fd):
    """(tcpi_rtt, tcpi_rttvar) in microseconds from TCP_INFO of a connected socket."""
    cdef tcp_info info
    cdef socklen_t length = sizeof(info)
    memset(&info, 0, sizeof(info))
    if getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0:
        raise _oserror(errno)
    return info.tcpi_rtt, info.tcpi_rttvar
