"""The tc enforcer against a real veth pair in a network namespace this test creates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from detnet.controller.enforce.tc import TcEnforcer
from detnet.controller.errors import EnforcementError
from detnet.controller.workloads import Scope, TcDevice
from tests.conftest import requires_root
from tests.helpers import ip, root_qdisc

pytestmark = [requires_root, pytest.mark.root]
BULK = Scope("bulk")


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace with veth va (198.18.250.1) <-> vb (198.18.250.2), both up."""
    name = f"detnet-test-tc-{os.getpid()}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("-n", name, "addr", "add", "198.18.250.1/30", "dev", "va")
        ip("-n", name, "addr", "add", "198.18.250.2/30", "dev", "vb")
        for dev in ("lo", "va", "vb"):
            ip("-n", name, "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


async def test_sets_changes_and_reads_back_rate(netns: str) -> None:
    enforcer = TcEnforcer({"bulk": TcDevice(device="va", netns=netns)})
    assert await enforcer.start() == {}  # veth starts with noqueue: nothing to resume
    await enforcer.apply({BULK: 80})
    assert re.search(r"qdisc tbf 1: root .*rate 80Mbit", root_qdisc(netns, "va"))
    await enforcer.apply({BULK: 25})
    shown = root_qdisc(netns, "va")
    assert re.search(r"qdisc tbf 1: root .*rate 25Mbit", shown)
    assert shown.count("qdisc") == 1  # changed in place, not stacked
    await enforcer.close()

    # a new enforcer (a restarted controller) resumes from what the kernel holds
    again = TcEnforcer({"bulk": TcDevice(device="va", netns=netns)})
    assert await again.start() == {BULK: 25}
    await again.close(restore={BULK: 1000})
    assert re.search(r"rate 1Gbit", root_qdisc(netns, "va"))


async def test_changes_a_foreign_tbf_in_place(netns: str) -> None:
    foreign = "qdisc add dev va root handle 5: tbf rate 10mbit burst 20k latency 10ms"
    subprocess.run(["tc", "-n", netns, *foreign.split()], check=True)  # noqa: ASYNC221
    enforcer = TcEnforcer(
        {"bulk": TcDevice(device="va", netns=netns)}, burst_bytes=30_000, latency_ms=15
    )
    assert await enforcer.start() == {BULK: 10}
    await enforcer.apply({BULK: 40})
    assert re.search(r"qdisc tbf 5: root .*rate 40Mbit burst 30000b", root_qdisc(netns, "va"))
    await enforcer.close()


async def test_usage_counts_tx_bytes(netns: str) -> None:
    # A permanent neighbour entry: without it the first packets wait on ARP and leave
    # (and are counted) whenever it resolves, maybe after the first reading.
    show = ["ip", "-n", netns, "-j", "link", "show", "dev", "vb"]
    mac = json.loads(subprocess.run(show, check=True, capture_output=True, text=True).stdout)  # noqa: ASYNC221
    ip("-n", netns, "neigh", "replace", "198.18.250.2", "lladdr", mac[0]["address"],
        "dev", "va", "nud", "permanent")  # fmt: skip
    enforcer = TcEnforcer({"bulk": TcDevice(device="va", netns=netns)})
    await enforcer.start()
    try:
        await _send_and_read(enforcer, netns)
    finally:
        await enforcer.close()


async def _send_and_read(enforcer: TcEnforcer, netns: str) -> None:
    # send ~2 MB out of va from inside the namespace, to vb's address
    sender = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'va')\n"
        "for _ in range(1500): s.sendto(b'x' * 1400, ('198.18.250.2', 9))\n"
    )
    subprocess.run(  # noqa: ASYNC221 - a short helper; the loop has nothing else to do
        ["ip", "netns", "exec", netns, sys.executable, "-c", sender], check=True, timeout=30
    )
    rates = await enforcer.usage()
    assert set(rates) == {BULK}
    assert rates[BULK] > 0
    second = await enforcer.usage()  # nothing sent since: close to zero
    assert second[BULK] < rates[BULK]


async def test_missing_device_and_netns_are_clear_errors(netns: str) -> None:
    with pytest.raises(EnforcementError, match=r"interface nope in netns .* does not exist"):
        await TcEnforcer({"bulk": TcDevice(device="nope", netns=netns)}).start()
    with pytest.raises(EnforcementError, match="network namespace 'detnet-no-such-ns'"):
        await TcEnforcer({"bulk": TcDevice(device="eth0", netns="detnet-no-such-ns")}).start()
    assert not os.path.exists("/var/run/netns/detnet-no-such-ns")  # noqa: ASYNC240 - not created


async def test_bad_limits_change_nothing(netns: str) -> None:
    enforcer = TcEnforcer(
        {"a": TcDevice(device="va", netns=netns), "b": TcDevice(device="vb", netns=netns)}
    )
    await enforcer.start()
    with pytest.raises(EnforcementError, match="no tc device configured"):
        await enforcer.apply({Scope("a"): 50, Scope("ghost"): 10})
    with pytest.raises(EnforcementError, match=r"must be 1\.\.34000"):
        await enforcer.apply({Scope("a"): 50, Scope("b"): 0})
    assert "tbf" not in root_qdisc(netns, "va")
    await enforcer.close()


def test_constructor_validates() -> None:
    with pytest.raises(EnforcementError, match="no best-effort target"):
        TcEnforcer({})
    with pytest.raises(EnforcementError, match="burst"):
        TcEnforcer({"a": TcDevice(device="x")}, burst_bytes=10)
