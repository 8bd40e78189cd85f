"""Per-endpoint probing and per-node cuts end to end (issue 13's integration test).

The controller (an in-process ``Daemon``, exactly as ``detnet control --enforcer
kubernetes`` builds it) runs against the API server emulation: a critical app with two
replicas, one on node-a (a reflector on 127.0.0.10) and one on node-b (127.0.0.11, a
reflector that rate-limits so most probes are lost), reached through its Service's
EndpointSlices; best-effort pods on both nodes. Only node-b's pods are cut. A replica
added to the Service is probed; one removed stops being probed.
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from detnet.controller.config import load_config
from detnet.controller.daemon import Daemon, make_plan
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.lab.kubeapi import ApiServerEmulator
from tests.helpers import until

APPS_NS, BE_NS = "critical-apps", "best-effort"
EGRESS = "kubernetes.io/egress-bandwidth"
LOSSY_RATE_PPS = 10.0  # the node-b replica answers 10 of the 100 probes a second


def _free_udp_port(*hosts: str) -> int:
    """A UDP port free on every one of ``hosts`` (the replicas share the Service port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            try:
                for host in hosts[1:]:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
                        t.bind((host, port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no UDP port free on every replica address")


@pytest.fixture
async def replicas() -> AsyncIterator[dict[str, ReflectorServer]]:
    hosts = ("127.0.0.10", "127.0.0.11", "127.0.0.12")
    port = _free_udp_port(*hosts)
    servers = {
        "127.0.0.10": ReflectorServer(ReflectorConfig(udp=("127.0.0.10", port))),
        "127.0.0.11": ReflectorServer(
            ReflectorConfig(udp=("127.0.0.11", port), rate_pps=LOSSY_RATE_PPS, burst=1)
        ),
        "127.0.0.12": ReflectorServer(ReflectorConfig(udp=("127.0.0.12", port))),
    }
    started: list[ReflectorServer] = []
    try:
        for server in servers.values():
            await server.start()
            started.append(server)
        yield servers
    finally:
        for server in started:
            await server.close()


def _port(replicas: dict[str, ReflectorServer]) -> int:
    address = replicas["127.0.0.10"].udp_address
    assert address is not None
    return address[1]


@pytest.fixture
async def api(replicas: dict[str, ReflectorServer]) -> AsyncIterator[ApiServerEmulator]:
    port = _port(replicas)
    async with ApiServerEmulator(bookmark_interval_s=0.5) as server:
        for node in ("node-a", "node-b"):
            server.add_node(node)
        labels = {"app": "robot-control"}
        for pod, node, ip in (("rc-a", "node-a", "127.0.0.10"), ("rc-b", "node-b", "127.0.0.11")):
            server.add_pod(APPS_NS, pod, labels=labels, node_name=node, pod_ip=ip)
        server.add_service(
            APPS_NS,
            "robot-control",
            selector=labels,
            ports=[{"name": "probe", "port": port, "protocol": "UDP"}],
        )
        server.add_deployment(BE_NS, "telemetry-upload", replicas=4, nodes=("node-a", "node-b"))
        yield server


@pytest.fixture
def config(tmp_path: Path, replicas: dict[str, ReflectorServer]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            critical_apps:
              - name: robot-control
                service: robot-control.{APPS_NS}.svc.cluster.local
                port: {_port(replicas)}
                protocol: UDP
                interval: 10ms
                max_loss_ratio: 0.05
            best_effort_targets:
              - deployment: telemetry-upload
                namespace: {BE_NS}
            control:
              control_interval: 100ms
              window: 1s
            policy:
              decrease_cooldown: 300ms
            usage: none
            """
        )
    )
    return path


def _annotations_by_node(api: ApiServerEmulator) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for pod in api.pods(BE_NS):
        node = pod["spec"].get("nodeName", "")
        out.setdefault(node, set()).add(pod["metadata"].get("annotations", {}).get(EGRESS))
    return out


def _mbit(value: str | None) -> int:
    assert value is not None
    assert value.endswith("M"), value
    return int(value[:-1])


@pytest.fixture
async def daemon(
    api: ApiServerEmulator, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemon]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    plan = make_plan(
        load_config(config),
        enforcer="kubernetes",
        listen=("127.0.0.1", 0),
        pod_namespace="detnet-system",
    )
    assert plan.scope == "node"  # the default where endpoints carry nodes
    assert [e.app for e in plan.endpoint_apps] == ["robot-control"]
    daemon = Daemon(plan)
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)


async def test_only_the_violated_node_is_cut(api: ApiServerEmulator, daemon: Daemon) -> None:
    await until(
        lambda: set(daemon.engine.stats()) == {"robot-control/rc-a", "robot-control/rc-b"},
        timeout_s=15.0,
        interval_s=0.05,
    )
    # node-b's replica loses probes: its pods are cut below the maximum, node-a's keep it.
    await until(
        lambda: all(
            v is not None and _mbit(v) < 1000
            for v in _annotations_by_node(api).get("node-b", {None})
        ),
        timeout_s=15.0,
        interval_s=0.05,
    )
    by_node = _annotations_by_node(api)
    assert by_node["node-a"] == {"1000M"}, by_node
    loop = daemon.loop
    assert loop is not None
    limits = {str(scope): mbit for scope, mbit in loop.desired.items()}
    assert limits["telemetry-upload@node-a"] == 1000
    assert limits["telemetry-upload@node-b"] < 1000
    decision = loop.last_decision
    assert decision is not None
    violated = {s.target for s in decision.signals if s.violated}
    assert violated <= {"robot-control/rc-b"}


async def test_endpoints_come_and_go(api: ApiServerEmulator, daemon: Daemon) -> None:
    await until(
        lambda: "robot-control/rc-a" in daemon.engine.stats(), timeout_s=15.0, interval_s=0.05
    )
    api.add_pod(
        APPS_NS, "rc-c", labels={"app": "robot-control"}, node_name="node-a", pod_ip="127.0.0.12"
    )
    await until(
        lambda: (daemon.engine.stats().get("robot-control/rc-c") or _NONE).received > 0,
        timeout_s=15.0,
        interval_s=0.05,
    )
    probes = daemon.probes
    assert probes is not None
    assert probes.endpoints()["robot-control/rc-c"].node == "node-a"
    api.delete_pod(APPS_NS, "rc-c")
    await until(
        lambda: "robot-control/rc-c" not in daemon.engine.stats(), timeout_s=15.0, interval_s=0.05
    )
    assert "robot-control/rc-c" not in probes.endpoints()
    assert "robot-control/rc-a" in daemon.engine.stats()


class _NoStats:
    received = 0


_NONE = _NoStats()
