"""Which kernel timestamps a probe socket asks for, on real sockets: the device look-ups,
and the per-packet fallback to software stamps on a device without hardware stamping
(the pure plan is tests/unit/test_native_timestamping_plan.py)."""

from __future__ import annotations

import select
import socket

import numpy as np
import pytest

from detnet import native
from detnet.native import _common as ts
from tests.unit.test_native_timestamping_plan import LO

pytestmark = pytest.mark.usefixtures("kernel_rx_stamps", "native_backend")


def test_plan_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="off, auto, on"):
        native.plan_timestamping(want="yes", caps=None, device=None, tx=True)
    with pytest.raises(ValueError, match="hardware timestamps"):
        native.ProbeSocket("127.0.0.1", 9, session=1, hardware="always")


def test_loopback_routes_through_lo_which_has_software_stamps_only() -> None:
    assert native.route_device("127.0.0.1") == "lo"
    caps = native.device_caps("lo")
    assert caps is not None
    assert caps & LO == LO
    assert not caps & (ts.SOF_TX_HARDWARE | ts.SOF_RX_HARDWARE)
    assert native.device_caps("no-such-dev0") is None
    assert native.route_device("not an address") is None


@pytest.fixture
def sink() -> object:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def _round_trip(probe: native.ProbeSocket, sink: socket.socket) -> tuple[np.void, np.void]:
    sent = np.zeros(1, native.SENT_DTYPE)
    assert probe.send(1, 1, sent) == 1
    data, address = sink.recvfrom(2048)
    sink.sendto(data, address)  # an echo: the row is ours, with our RX stamps
    out = np.zeros(4, native.REPLY_DTYPE)
    assert select.select([probe.fileno()], [], [], 2.0)[0]
    assert probe.recv(out) == 1
    return sent[0], out[0]


def test_auto_on_lo_plans_software(sink: socket.socket) -> None:
    probe = native.ProbeSocket("127.0.0.1", sink.getsockname()[1], session=1, hardware="auto")
    try:
        assert probe.timestamping is not None
        assert probe.timestamping.device == "lo"
        assert not probe.hardware
        assert "lo reports no hardware" in probe.timestamping.reason
    finally:
        probe.close()


def test_hardware_requested_but_absent_falls_back_to_software_per_packet(
    sink: socket.socket,
) -> None:
    probe = native.ProbeSocket("127.0.0.1", sink.getsockname()[1], session=1, hardware="on")
    try:
        assert probe.hardware
        assert probe.timestamping is not None
        assert probe.timestamping.flags & ts.SOF_RAW_HARDWARE
        for _ in range(5):
            sent, row = _round_trip(probe, sink)
            assert sent["hw_tx_ns"] == 0
            assert sent["kernel_tx_ns"] > 0  # the software TX stamp is still there
            assert row["hw_rx_ns"] == 0
            assert row["kernel_rx_ns"] > 0
            assert row["source"] == native.TS_KERNEL  # labelled software, not hardware
        tx = np.zeros(4, native.SENT_DTYPE)
        assert probe.take_tx_stamps(tx) == 0  # no hardware stamp turned up later either
    finally:
        probe.close()


def test_no_kernel_timestamps_means_no_plan(sink: socket.socket) -> None:
    probe = native.ProbeSocket(
        "127.0.0.1", sink.getsockname()[1], session=1, kernel_timestamps=False, hardware="on"
    )
    try:
        assert probe.timestamping is None
        assert not (probe.kernel_rx)
        assert not (probe.kernel_tx)
        assert not (probe.hardware)
        sent, row = _round_trip(probe, sink)
        assert sent["kernel_tx_ns"] == 0
        assert row["source"] == native.TS_USER
    finally:
        probe.close()
