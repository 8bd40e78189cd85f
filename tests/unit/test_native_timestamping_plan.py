"""Which kernel timestamps a probe socket asks for: the pure plan, from a device's
capabilities. The device look-ups and the per-packet fallback on real sockets are
tests/integration/test_native_timestamping.py."""

from __future__ import annotations

import pytest

from detnet import native
from detnet.native import _common as ts

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run

SOFTWARE = ts.SOF_RX_SOFTWARE | ts.SOF_SOFTWARE
SOFTWARE_TX = SOFTWARE | ts.SOF_TX_SOFTWARE | ts.SOF_OPT_ID | ts.SOF_OPT_TSONLY
HW_RX = ts.SOF_RX_HARDWARE | ts.SOF_RAW_HARDWARE
HW_TX = ts.SOF_TX_HARDWARE | ts.SOF_RAW_HARDWARE | ts.SOF_OPT_TX_SWHW
NIC = 0x4F  # a PTP NIC's so_timestamping: TX/RX hardware and software, raw hardware
LO = ts.SOF_TX_SOFTWARE | ts.SOF_RX_SOFTWARE | ts.SOF_SOFTWARE  # what lo and veth report


@pytest.mark.parametrize(
    ("want", "caps", "tx", "flags", "hardware"),
    [
        ("off", NIC, True, SOFTWARE_TX, False),
        ("auto", NIC, True, SOFTWARE_TX | HW_RX | HW_TX, True),
        ("auto", NIC, False, SOFTWARE | HW_RX, True),
        ("auto", LO, True, SOFTWARE_TX, False),
        ("auto", None, True, SOFTWARE_TX, False),  # the device is unknown
        ("auto", NIC & ~ts.SOF_TX_HARDWARE, True, SOFTWARE_TX, False),  # RX only: not both
        ("auto", NIC & ~ts.SOF_TX_HARDWARE, False, SOFTWARE | HW_RX, True),
        ("auto", NIC & ~ts.SOF_RAW_HARDWARE, True, SOFTWARE_TX, False),
        ("on", LO, True, SOFTWARE_TX | HW_RX | HW_TX, True),  # asked anyway
        ("on", None, False, SOFTWARE | HW_RX, True),
    ],
)
def test_plan_from_capabilities(
    want: str, caps: int | None, tx: bool, flags: int, hardware: bool
) -> None:
    plan = native.plan_timestamping(want=want, caps=caps, device="eth9", tx=tx)
    assert plan.flags == flags
    assert plan.hardware is hardware
    assert plan.device == "eth9"
    assert plan.reason


def test_plan_reasons_say_what_happened() -> None:
    assert (
        "hardware timestamps on eth9"
        in native.plan_timestamping(want="auto", caps=NIC, device="eth9", tx=True).reason
    )
    assert (
        "eth9 reports no hardware"
        in native.plan_timestamping(want="auto", caps=LO, device="eth9", tx=True).reason
    )
    assert (
        "reports none: software per packet"
        in native.plan_timestamping(want="on", caps=LO, device="eth9", tx=True).reason
    )
