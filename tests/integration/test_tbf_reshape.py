"""A tbf re-set under load never blocks its queue: the tc enforcer's netlink path and the
lab's ``tc`` path (its bottleneck, its Cilium stand-in's pods) share ``engine.tbf.tbf_plan``,
each tested here against TCP flows through a veth between two namespaces it creates."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from detnet.controller.enforce.tc import TcEnforcer
from detnet.controller.workloads import Scope, TcDevice
from detnet.lab.topology import set_tbf
from tests.conftest import requires_root
from tests.helpers import ip, root_qdisc

pytestmark = [requires_root, pytest.mark.root]
BULK = Scope("bulk")


def _tx_bytes(ns: str, dev: str) -> int:
    shown = subprocess.run(
        ["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(shown)[0]["stats64"]["tx"]["bytes"])


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Namespaces A (va, 198.18.250.5) and B (vb, 198.18.250.6), a veth between them."""
    a, b = f"detnet-test-tca-{os.getpid()}", f"detnet-test-tcb-{os.getpid()}"
    try:
        for name in (a, b):
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        ip("-n", a, "addr", "add", "198.18.250.5/30", "dev", "va")
        ip("-n", b, "addr", "add", "198.18.250.6/30", "dev", "vb")
        ip("-n", a, "link", "set", "va", "up")
        ip("-n", b, "link", "set", "vb", "up")
        yield a, b
    finally:
        for name in (a, b):
            subprocess.run(["ip", "netns", "del", name], check=False)


# Four bulk flows, each paced (SO_MAX_PACING_RATE, 47) to 150 Mbit/s: together over the
# tbf's 200, so it holds a standing queue, and TCP sizes each GSO packet to a millisecond
# of its pace, ~19 kB: whole within the 25 kB bucket of 200 Mbit/s, too big for 10's.
# (BBR's flows in the lab paced themselves like this.)
_SINK = (
    "import socket, threading\n"
    "s = socket.create_server(('198.18.250.6', 9000))\n"
    "def drain(c):\n"
    "    while c.recv(1 << 20): pass\n"
    "while True: threading.Thread(target=drain, args=(s.accept()[0],)).start()\n"
)
_SENDER = (
    "import socket, threading, time\n"
    "def flow():\n"
    "    for _ in range(100):\n"
    "        try: s = socket.create_connection(('198.18.250.6', 9000)); break\n"
    "        except OSError: time.sleep(0.05)\n"
    "    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b'cubic')\n"
    "    s.setsockopt(socket.SOL_SOCKET, 47, 150_000_000 // 8)\n"
    "    chunk = bytes(1 << 16)\n"
    "    while True: s.sendall(chunk)\n"
    "for _ in range(4): threading.Thread(target=flow).start()\n"
)


@pytest.fixture
def bulk(pair: tuple[str, str]) -> Iterator[str]:
    """_SINK in B and _SENDER in A, running; yields A."""
    a, b = pair
    procs = [
        subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])
        for ns, code in ((b, _SINK), (a, _SENDER))
    ]
    try:
        yield a
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_the_tc_enforcers_cuts_never_block_the_queue(bulk: str) -> None:
    # A tbf changed in place to a smaller bucket keeps packets queued under the bigger
    # one, which the kernel then never sends: the flow stops for good (tbf_plan). Each
    # cut from 200 to 10 Mbit/s (25 to 15 kB) under a standing queue did that often
    # enough that five in a row caught one in every run (4 of 4).
    a = bulk
    enforcer = TcEnforcer({"bulk": TcDevice(device="va", netns=a)})
    try:
        await enforcer.start()
        for _ in range(5):
            await enforcer.apply({BULK: 200})
            await asyncio.sleep(0.5)  # a standing queue of packets cut to a 25 kB bucket
            await enforcer.apply({BULK: 10})
            shown = root_qdisc(a, "va")
            assert re.search(r"qdisc tbf [12]: root .*rate 10Mbit", shown)
            assert shown.count("qdisc") == 1  # grafted over the old one, not stacked
            await asyncio.sleep(0.3)  # what was queued before the cut leaves
            await enforcer.usage()
            await asyncio.sleep(1.0)
            sent = (await enforcer.usage())[BULK]
            assert sent > 5, f"{sent:.2f} Mbit/s through a 10 Mbit/s tbf: the queue is stuck"
    finally:
        await enforcer.close()


async def test_the_labs_cuts_never_block_the_queue(bulk: str) -> None:
    # the same cuts through the lab's tc path (set_tbf: tc -j qdisc show, then change or
    # replace), which its bottleneck's knee step and its Cilium stand-in take
    a = bulk
    for _ in range(5):
        set_tbf(a, "va", rate_mbps=200, buffer_ms=20)
        await asyncio.sleep(0.5)
        set_tbf(a, "va", rate_mbps=10, buffer_ms=20)
        shown = root_qdisc(a, "va")
        assert re.search(r"qdisc tbf [12]: root .*rate 10Mbit", shown)
        assert shown.count("qdisc") == 1
        await asyncio.sleep(0.3)
        before = _tx_bytes(a, "va")
        await asyncio.sleep(1.0)
        sent = (_tx_bytes(a, "va") - before) * 8 / 1e6
        assert sent > 5, f"{sent:.2f} Mbit in 1 s through a 10 Mbit/s tbf: the queue is stuck"
