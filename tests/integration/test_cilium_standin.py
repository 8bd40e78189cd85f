"""The Cilium stand-in (lab/cluster/cilium.py) as the cluster lab runs it: a real process
watching the API server emulation, shaping real pod namespaces. Cilium's semantics: a
changed ``kubernetes.io/egress-bandwidth`` applies live (the pod's sender keeps running,
its rate follows), a value it cannot parse removes the limit, a pod on another node is
not its business (even when its endpoint is listed)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from detnet.lab.kubeapi import ApiServerEmulator
from tests.conftest import IS_ROOT, requires_tool
from tests.helpers import ip, until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not IS_ROOT, reason="needs root: network namespaces and tc; CI runs as root"
    ),
    requires_tool("tc", "iproute2"),
]

NODE, OTHER = "node-it-a", "node-it-b"
SINK_PORT = 5311
ANNOTATION = "kubernetes.io/egress-bandwidth"


@dataclass
class Pods:
    """Two pod namespaces (``mine`` on NODE, ``theirs`` on OTHER) wired to a sink
    namespace, a bulk sender running in ``mine``."""

    mine: str
    theirs: str
    sink: str
    sender: subprocess.Popen[bytes]


@pytest.fixture
def pods() -> Iterator[Pods]:
    prefix = f"detnet-standin-it-{os.getpid()}-"
    mine, theirs, sink = prefix + "mine", prefix + "theirs", prefix + "sink"
    made: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for ns in (mine, theirs, sink):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate((mine, theirs)):
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                "netns", sink)  # fmt: skip
            ip("-n", ns, "addr", "add", f"198.18.200.{4 * i + 2}/30", "dev", "eth0")
            ip("-n", sink, "addr", "add", f"198.18.200.{4 * i + 1}/30", "dev", f"p{i}")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", sink, "link", "set", f"p{i}", "up")
        traffic = [sys.executable, "-m", "detnet.lab.traffic"]
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", sink, *traffic, "sink", "--listen", f"0.0.0.0:{SINK_PORT}"],
            stdout=subprocess.DEVNULL,
        ))  # fmt: skip
        sender = subprocess.Popen(
            ["ip", "netns", "exec", mine, *traffic, "send", "--to", f"198.18.200.1:{SINK_PORT}",
             "--mode", "steady", "--flows", "2"],
        )  # fmt: skip
        procs.append(sender)
        yield Pods(mine, theirs, sink, sender)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def qdisc(netns: str) -> str:
    out = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout


def tx_bytes(netns: str) -> int:
    out = subprocess.run(["ip", "-n", netns, "-j", "-s", "link", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])


async def egress_mbps(netns: str, seconds: float = 1.5) -> float:
    start = tx_bytes(netns)
    await asyncio.sleep(seconds)
    return (tx_bytes(netns) - start) * 8 / seconds / 1e6


@pytest.fixture
async def api(pods: Pods, tmp_path: Path) -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.2) as emulator:
        emulator.add_node(NODE)
        emulator.add_node(OTHER)
        emulator.add_pod("be", "upload", node_name=NODE, annotations={ANNOTATION: "20M"})
        emulator.add_pod("be", "elsewhere", node_name=OTHER, annotations={ANNOTATION: "5M"})
        emulator.add_token("cilium", username="system:serviceaccount:kube-system:cilium")
        yield emulator


@pytest.fixture
async def stand_in(api: ApiServerEmulator, pods: Pods, tmp_path: Path) -> AsyncIterator[Path]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig(token="cilium"))
    endpoints = tmp_path / "endpoints.json"
    # The other node's pod is listed too: the stand-in must still leave it alone.
    endpoints.write_text(json.dumps({"be/upload": {"netns": pods.mine},
                                     "be/elsewhere": {"netns": pods.theirs}}))  # fmt: skip
    log = tmp_path / "changes.jsonl"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "detnet.lab.cluster.cilium", "--node", NODE,
        "--kubeconfig", str(kubeconfig), "--endpoints", str(endpoints), "--log", str(log),
    )  # fmt: skip
    try:
        yield log
    finally:
        child.terminate()
        async with asyncio.timeout(20):
            assert await child.wait() == 0


def records(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def test_live_change_unparsable_value_and_other_nodes(
    api: ApiServerEmulator, pods: Pods, stand_in: Path
) -> None:
    async def shaped(rate: str) -> bool:
        return f"rate {rate}" in qdisc(pods.mine)

    await until(lambda: shaped("20Mbit"), timeout_s=20, interval_s=0.05)
    assert any(r.get("event") == "ready" for r in records(stand_in))
    sender_pid = pods.sender.pid
    await asyncio.sleep(0.5)  # TCP settles at the new rate
    assert 17 < await egress_mbps(pods.mine) < 23

    # A live change: the same process, a new rate, no restart.
    api.patch("Pod", "upload", {"metadata": {"annotations": {ANNOTATION: "50M"}}}, namespace="be")
    await until(lambda: shaped("50Mbit"), interval_s=0.05)
    await asyncio.sleep(0.5)
    assert 43 < await egress_mbps(pods.mine) < 57
    assert pods.sender.poll() is None
    assert pods.sender.pid == sender_pid

    # A value Cilium cannot parse removes the limit: the sender runs unshaped.
    api.patch("Pod", "upload", {"metadata": {"annotations": {ANNOTATION: "50 Mbit"}}},
              namespace="be")  # fmt: skip

    async def unshaped() -> bool:
        return "tbf" not in qdisc(pods.mine)

    await until(unshaped, interval_s=0.05)
    assert await egress_mbps(pods.mine) > 100
    assert pods.sender.poll() is None

    changes = [r for r in records(stand_in) if r.get("event") == "bandwidth"]
    assert [(r["pod"], r["value"], r["action"]) for r in changes] == [
        ("upload", "20M", "set"),
        ("upload", "50M", "set"),
        ("upload", "50 Mbit", "remove"),
    ]
    assert changes[-1]["reason"] == "unparsable"
    assert changes[1]["rate_bytes_per_s"] == 50_000_000 // 8
    for r in changes:
        assert isinstance(r["seen"], float)
        assert isinstance(r["applied"], float)
        assert r["applied"] >= r["seen"]

    # The other node's pod: never shaped, never logged.
    assert "tbf" not in qdisc(pods.theirs)
    assert not [r for r in changes if r["pod"] == "elsewhere"]
    # The watch was field-selected by node, as Cilium's is.
    watches = [r for r in api.requests if r.verb in ("list", "watch") and r.path == "/api/v1/pods"]
    assert watches
    assert all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}" for r in watches)


@pytest.fixture
def first_watch_gone(api: ApiServerEmulator) -> None:
    """The stand-in's first watch is answered 410 Gone (its list is too old)."""
    api.fail("watch /api/v1/pods", 410)


async def test_relists_after_410(
    api: ApiServerEmulator, pods: Pods, first_watch_gone: None, stand_in: Path
) -> None:
    async def relisted() -> bool:
        return any(r.get("event") == "relist" for r in records(stand_in))

    await until(relisted, timeout_s=20, interval_s=0.05)
    lists = [r for r in api.requests if r.verb == "list" and r.path == "/api/v1/pods"]
    assert len(lists) >= 2
    # After the re-list it watches again, and a change still applies live.
    api.patch("Pod", "upload", {"metadata": {"annotations": {ANNOTATION: "30M"}}}, namespace="be")

    async def shaped() -> bool:
        return "rate 30Mbit" in qdisc(pods.mine)

    await until(shaped, timeout_s=15, interval_s=0.05)
    assert pods.sender.poll() is None
