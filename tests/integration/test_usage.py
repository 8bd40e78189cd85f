"""The controller's usage client (controller/usage.py) against real agents on two
"nodes" (in-process ``Agent``s on 127.0.0.1 and 127.0.0.2, one port), found through the
EndpointSlices the API server emulation keeps for their Service, authenticated with a
token file the way the kubelet projects it; and against agents that are missing, late,
refusing or answering nonsense: those nodes' pods are unknown, with the reason, and the
fetch returns anyway."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from detnet.controller.agent.service import Agent, AgentConfig
from detnet.controller.kube.api import KubeClient, new_api_client
from detnet.controller.usage import (
    AGENT_NAMESPACE,
    AGENT_SERVICE,
    OK,
    EndpointSliceAgents,
    StaticAgents,
    TokenFile,
    UsageClient,
    UsageError,
    UsageReport,
    watch_agents,
)
from detnet.lab.kubeapi import ApiServerEmulator
from tests.helpers import free_port, until
from tests.integration.test_agent import MS
from tests.integration.test_agent_procfs import FakeProc, cgroup
from tests.unit.test_usage_client import _kubelet_projected

CONTROLLER = "system:serviceaccount:detnet-system:detnet-controller"
UID_A = "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad"
UID_B = "fd698699-eabf-4c23-92ef-cf0bbdb78261"
AGENT_LABELS = {"app.kubernetes.io/name": "detnet-agent"}


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[FakeProc]:
    fake = FakeProc(tmp_path / "proc")
    fake.root.mkdir()
    fake.process(cgroup(UID_A), tx=100)
    fake.process(cgroup(UID_B), tx=100)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    d = tmp_path / "projected"
    d.mkdir()
    _kubelet_projected(d, "ctl-1", 1)
    return d


class Cluster:
    def __init__(self, api: ApiServerEmulator, agents: dict[str, Agent], port: int) -> None:
        self.api, self.agents, self.port = api, agents, port


@pytest.fixture
async def cluster(proc: FakeProc) -> AsyncIterator[Cluster]:
    port = free_port()
    async with ApiServerEmulator(bookmark_interval_s=0.2) as api:
        for node, ip, uid in (("node-a", "127.0.0.1", UID_A), ("node-b", "127.0.0.2", UID_B)):
            api.add_node(node)
            api.add_pod(
                "be", f"web-{node[-1]}", node_name=node, uid=uid, labels={"app": f"web-{node[-1]}"}
            )
            api.add_pod(
                AGENT_NAMESPACE, f"agent-{node[-1]}", node_name=node, pod_ip=ip, labels=AGENT_LABELS
            )
        api.add_service(
            AGENT_NAMESPACE,
            AGENT_SERVICE,
            selector=AGENT_LABELS,
            ports=[{"name": "usage", "port": port}],
        )
        for token in ("ctl-1", "ctl-2"):
            api.add_token(token, username=CONTROLLER, audiences=["detnet-agent"])
        clients, agents = [], {}
        try:
            for node, ip in (("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")):
                client = new_api_client(api.client_configuration(), identity=f"agent-{node}")
                clients.append(client)
                config = AgentConfig(
                    node=node, listen=(ip, port), interval_ns=50 * MS, proc=str(proc.root)
                )
                agents[node] = Agent(config, api_client=client)
                await agents[node].start()
            yield Cluster(api, agents, port)
        finally:
            for agent in agents.values():
                await agent.close()
            for client in clients:
                await client.close()


@pytest.fixture
async def discovered(cluster: Cluster) -> AsyncIterator[EndpointSliceAgents]:
    api_client = new_api_client(cluster.api.client_configuration(), identity="controller")
    kube = KubeClient(api_client)
    sink = EndpointSliceAgents()
    task = asyncio.create_task(watch_agents(kube, sink).run(sink))
    try:

        async def both() -> bool:
            return sink.nodes == {"node-a", "node-b"}

        await until(both, interval_s=0.05)
        yield sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api_client.close()


@pytest.fixture
async def client(discovered: EndpointSliceAgents, token_dir: Path) -> AsyncIterator[UsageClient]:
    errors: Counter[str] = Counter()
    async with UsageClient(
        agents=discovered,
        token=TokenFile(token_dir / "token"),
        on_error=lambda k: errors.update([k]),
    ) as c:
        c.hook_errors = errors  # type: ignore[attr-defined]
        yield c


async def measured(client: UsageClient, nodes: list[str]) -> UsageReport:
    """Fetch until every pod of ``nodes`` has a known last-interval rate."""
    report: UsageReport | None = None

    async def known() -> bool:
        nonlocal report
        report = await client.fetch(nodes)
        pods = [p for p in report.pods.values() if p.namespace == "be"]
        return len(pods) == len(nodes) and all(p.egress_bps is not None for p in pods)

    await until(known, interval_s=0.05)
    assert report is not None
    return report


async def test_usage_of_every_named_node(client: UsageClient, cluster: Cluster) -> None:
    report = await measured(client, ["node-a", "node-b"])
    assert dict(report.nodes) == {"node-a": OK, "node-b": OK}
    assert report.unknown_nodes == frozenset()
    assert {p.uid for p in report.pods.values() if p.namespace == "be"} == {UID_A, UID_B}
    last = report.egress([("be", "web-a"), ("be", "web-b")], mean_1s=False)
    assert (last.bps, last.known, last.unknown) == (0.0, 2, 0)
    assert set(report.agents) == {"node-a", "node-b"}
    assert report.agents["node-b"].node == "node-b"


async def test_only_the_named_nodes_are_asked(client: UsageClient, cluster: Cluster) -> None:
    await measured(client, ["node-a", "node-b"])
    before = {n: a.route.requests["200"] for n, a in cluster.agents.items()}
    report = await client.fetch(["node-a"])
    assert set(report.nodes) == {"node-a"}
    assert cluster.agents["node-a"].route.requests["200"] == before["node-a"] + 1
    assert cluster.agents["node-b"].route.requests["200"] == before["node-b"]


async def test_namespace_and_selector_reach_the_agents(
    client: UsageClient, cluster: Cluster
) -> None:
    await measured(client, ["node-a", "node-b"])
    report = await client.fetch(["node-a", "node-b"], selector="app=web-b")
    assert list(report.pods) == [("be", "web-b")]
    report = await client.fetch(["node-a", "node-b"], namespace=AGENT_NAMESPACE)
    assert {name for _, name in report.pods} == {"agent-a", "agent-b"}
    with pytest.raises(UsageError, match="selector"):
        await client.fetch(["node-a"], selector="app in")


async def test_a_node_without_an_agent_is_unknown(client: UsageClient, cluster: Cluster) -> None:
    report = await client.fetch(["node-a", "node-c"])
    assert report.nodes["node-c"] == "no_agent"
    assert report.nodes["node-a"] == OK
    assert client.errors["no_agent"] == 1
    assert client.hook_errors["no_agent"] == 1  # type: ignore[attr-defined]


async def test_an_agent_gone_from_the_slices_is_unknown(
    client: UsageClient, cluster: Cluster, discovered: EndpointSliceAgents
) -> None:
    cluster.api.delete_pod(AGENT_NAMESPACE, "agent-b")

    async def dropped() -> bool:
        return discovered.agent_for("node-b") is None

    await until(dropped, interval_s=0.05)
    assert (await client.fetch(["node-b"])).nodes["node-b"] == "no_agent"


async def test_a_rotated_token_is_read_and_sent(
    client: UsageClient, cluster: Cluster, token_dir: Path
) -> None:
    await measured(client, ["node-a"])
    _kubelet_projected(token_dir, "ctl-2", 2)
    assert (await client.fetch(["node-a"])).nodes["node-a"] == OK
    reviewed = [
        r.body["spec"]["token"] for r in cluster.api.requests if r.path.endswith("/tokenreviews")
    ]
    assert "ctl-2" in reviewed


async def test_a_401_makes_the_client_read_the_token_again(
    client: UsageClient, cluster: Cluster, token_dir: Path
) -> None:
    path = token_dir / "..data" / "token"
    path.write_text("ctl-9")  # unknown to the API server
    client._token.invalidate()  # type: ignore[union-attr]
    assert (await client.fetch(["node-a"])).nodes["node-a"] == "http_401"
    # Rewritten in place with the same size and mtime: only the 401 makes it re-read.
    rewrite_keeping_stamp(path, "ctl-2")
    assert (await client.fetch(["node-a"])).nodes["node-a"] == OK
    assert client.errors["http_401"] == 1


def rewrite_keeping_stamp(path: Path, text: str) -> None:
    st = path.stat()
    with open(path, "r+") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_no_token_file_makes_every_node_unknown(
    discovered: EndpointSliceAgents, tmp_path: Path
) -> None:
    async with UsageClient(agents=discovered, token=TokenFile(tmp_path / "missing")) as c:
        report = await c.fetch(["node-a", "node-b"])
    assert dict(report.nodes) == {"node-a": "no_token", "node-b": "no_token"}
    assert c.errors["no_token"] == 1


# ------------------------------------------------------ agents that misbehave


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A TCP port that accepts and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.3", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def fake_agent(status: int, body: bytes) -> AsyncIterator[int]:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/usage", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.4", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_a_late_agent_does_not_stall_the_fetch(cluster: Cluster) -> None:
    async def ready() -> bool:
        return cluster.agents["node-a"].readyz()[0]

    await until(ready, interval_s=0.05)
    async with black_hole() as hole:
        agents = StaticAgents(
            {"node-a": ("127.0.0.1", cluster.port), "node-x": ("127.0.0.3", hole)}
        )
        async with UsageClient(agents=agents, token=lambda: "ctl-1", deadline_s=0.2) as c:
            async with asyncio.timeout(5):  # "never stalls": the hole would hold it forever
                report = await c.fetch(["node-a", "node-x"])
    assert report.nodes["node-x"] == "timeout"
    assert report.nodes["node-a"] in (
        OK,
        "timeout",
    )  # on a loaded machine even a real one may be late
    assert c.errors["timeout"] >= 1


_GOOD = b'{"node":"node-y","at":"2026-11-29T10:00:00.000000Z","interval_s":0.1,"pods":[]}'


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b"not json", "malformed"),
        (200, b'{"node":"node-y"}', "malformed"),
        (200, _GOOD.replace(b"node-y", b"node-z"), "wrong_node"),
        (500, b"{}", "http_500"),
        (403, b"{}", "http_403"),
        (200, _GOOD, OK),
    ],
)
async def test_agents_answering_badly_make_their_node_unknown(
    status: int, body: bytes, reason: str
) -> None:
    async with fake_agent(status, body) as port:
        agents = StaticAgents({"node-y": ("127.0.0.4", port)})
        async with UsageClient(agents=agents, token=lambda: "t") as c:
            report = await c.fetch(["node-y"])
    assert report.nodes["node-y"] == reason
    assert c.errors[reason] == (0 if reason == OK else 1)


async def test_a_refused_connection_is_unknown() -> None:
    agents = StaticAgents({"node-z": ("127.0.0.1", free_port())})
    async with UsageClient(agents=agents, token=lambda: "t") as c:
        report = await c.fetch(["node-z"])
    assert report.nodes["node-z"] == "connection"


async def test_an_oversized_document_is_not_read_whole() -> None:
    from detnet.controller.agent.wire import MAX_DOCUMENT_BYTES

    async with fake_agent(200, b" " * (MAX_DOCUMENT_BYTES + 10)) as port:
        agents = StaticAgents({"node-y": ("127.0.0.4", port)})
        async with UsageClient(agents=agents, token=lambda: "t", deadline_s=5) as c:
            report = await c.fetch(["node-y"])
    assert report.nodes["node-y"] == "malformed"
