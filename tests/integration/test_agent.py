"""``detnet agent`` over HTTP against the API server emulation: the pod watch of its node,
TokenReview authentication (401/403/200, health without a token), the query filters,
the document for unresolved and hostNetwork pods, and bad input of every kind (API
errors, malformed requests, huge headers) logged and counted, never fatal.

The agent runs in this process over a /proc-shaped tree whose PIDs are real child
processes (tests/integration/test_agent_procfs.py's), so no root is needed; the real /proc,
cgroups and traffic are test_agent_node.py's. A real ``detnet agent`` process: the last
tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from detnet.controller.agent.service import Agent, AgentConfig
from detnet.controller.kube.api import new_api_client
from detnet.lab.kubeapi import ApiServerEmulator
from tests.helpers import ready_line, until
from tests.integration.test_agent_procfs import FakeProc, cgroup

NODE = "node-a"
UID_WEB1 = "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad"
UID_WEB2 = "fd698699-eabf-4c23-92ef-cf0bbdb78261"  # no process: never resolved
UID_DB = "3d274242-8ee0-11e9-a8a6-1e68d864ef1a"
UID_HOST = "85adbef3-622f-4ef2-8f60-a8bdf3eb6c72"
CONTROLLER = "system:serviceaccount:detnet-system:detnet-controller"
TOKENS = {
    "ctl": (CONTROLLER, ["detnet-agent"]),
    "other": ("system:serviceaccount:default:default", ["detnet-agent"]),
    "api-only": (CONTROLLER, ["https://kubernetes.default.svc.cluster.local"]),
}
MS = 1_000_000


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[FakeProc]:
    fake = FakeProc(tmp_path / "proc")
    fake.root.mkdir()
    for noise in range(2, 30):
        fake.entry(noise, "0::/system.slice/containerd.service\n")
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.2) as server:
        server.add_node(NODE)
        server.add_node("node-b")
        server.add_pod("be", "web-1", node_name=NODE, uid=UID_WEB1, labels={"app": "web"})
        server.add_pod("be", "web-2", node_name=NODE, uid=UID_WEB2, labels={"app": "web"})
        server.add_pod("data", "db-0", node_name=NODE, uid=UID_DB, labels={"app": "db"})
        host = server.add_pod("kube-system", "proxy", node_name=NODE, uid=UID_HOST)
        server.patch("Pod", "proxy", {"spec": {"hostNetwork": True}}, namespace="kube-system")
        assert host["metadata"]["uid"] == UID_HOST
        server.add_pod("be", "elsewhere", node_name="node-b", labels={"app": "web"})
        for token, (user, audiences) in TOKENS.items():
            server.add_token(token, username=user, audiences=audiences)
        yield server


@pytest.fixture
async def agent(api: ApiServerEmulator, proc: FakeProc) -> AsyncIterator[Agent]:
    proc.process(cgroup(UID_WEB1), tx=1000)
    proc.process(cgroup(UID_DB), tx=5000)
    client = new_api_client(api.client_configuration(), identity=f"agent-{NODE}")
    config = AgentConfig(
        node=NODE, listen=("127.0.0.1", 0), interval_ns=50 * MS, proc=str(proc.root)
    )
    try:
        async with Agent(config, api_client=client) as running:
            yield running
    finally:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(agent: Agent, path: str = "/v1/usage") -> str:
    host, port = agent.address
    return f"http://{host}:{port}{path}"


async def get(
    http: aiohttp.ClientSession,
    agent: Agent,
    path: str = "/v1/usage",
    token: str | None = "ctl",
    **params: str,
) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url(agent, path), headers=headers, params=params) as resp:
        body: Any = (
            await resp.json() if resp.content_type == "application/json" else await resp.text()
        )
        return resp.status, body, dict(resp.headers)


async def ready(http: aiohttp.ClientSession, agent: Agent) -> None:
    async def measured() -> bool:
        status, doc, _ = await get(http, agent)
        if status != 200:
            return False
        web1 = [p for p in doc["pods"] if p["name"] == "web-1"]
        return bool(web1) and web1[0]["egress_bps"] is not None

    await until(measured, interval_s=0.05)


async def test_health_needs_no_token_and_says_when_ready(agent: Agent, http) -> None:
    await ready(http, agent)
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _ = await get(http, agent, path, token=None)
        assert status == 200, path


@pytest.mark.parametrize(
    ("token", "status", "challenge"),
    [
        (None, 401, 'Bearer realm="detnet-agent"'),
        ("garbage", 401, 'Bearer realm="detnet-agent", error="invalid_token"'),
        ("api-only", 401, 'Bearer realm="detnet-agent", error="invalid_token"'),  # wrong audience
        ("other", 403, None),
        ("ctl", 200, None),
    ],
)
async def test_only_the_controller_reads_usage(
    agent: Agent, http, token: str | None, status: int, challenge: str | None
) -> None:
    await ready(http, agent)
    got, body, headers = await get(http, agent, token=token)
    assert got == status
    assert headers.get("WWW-Authenticate") == challenge
    if status != 200:
        assert "pods" not in body


async def test_tokens_are_reviewed_once_then_cached(
    agent: Agent, api: ApiServerEmulator, http
) -> None:
    await ready(http, agent)
    before = sum(1 for r in api.requests if r.path.endswith("/tokenreviews"))
    for _ in range(10):
        assert (await get(http, agent, token="ctl"))[0] == 200
        assert (await get(http, agent, token="other"))[0] == 403
        assert (await get(http, agent, token="garbage"))[0] == 401
    reviews = [r for r in api.requests if r.path.endswith("/tokenreviews")]
    assert len(reviews) - before <= 3  # at most one each: ctl may already be cached
    assert all(r.body["spec"]["audiences"] == ["detnet-agent"] for r in reviews)


async def test_the_document_for_every_kind_of_pod(agent: Agent, http) -> None:
    await ready(http, agent)

    async def db_measured() -> bool:
        _, doc, _ = await get(http, agent)
        return any(p["name"] == "db-0" and p["egress_bps"] is not None for p in doc["pods"])

    await until(db_measured, interval_s=0.05)
    _, doc, _ = await get(http, agent)
    assert doc["node"] == NODE
    assert doc["interval_s"] == 0.05
    by_name = {p["name"]: p for p in doc["pods"]}
    assert set(by_name) == {"web-1", "web-2", "db-0", "proxy"}  # node-b's pod is not here
    assert by_name["web-1"]["uid"] == UID_WEB1
    assert by_name["web-1"]["egress_bps"] == 0.0  # counters read, and not moving
    assert by_name["db-0"]["ingress_bps"] == 0.0
    for unknown in ("web-2", "proxy"):  # no process found; hostNetwork
        p = by_name[unknown]
        assert [p[k] for k in ("egress_bps", "ingress_bps", "egress_bps_1s", "ingress_bps_1s")] == [
            None
        ] * 4


async def test_filters(agent: Agent, http) -> None:
    await ready(http, agent)

    async def names(**params: str) -> list[str]:
        status, doc, _ = await get(http, agent, **params)
        assert status == 200
        return sorted(p["name"] for p in doc["pods"])

    assert await names(namespace="be") == ["web-1", "web-2"]
    assert await names(selector="app=db") == ["db-0"]
    assert await names(selector="app in (web,db)", namespace="data") == ["db-0"]
    assert await names(selector="!app") == ["proxy"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("selector=app%20in", "selector"),
        ("namespaces=be", "unknown parameter"),
        ("namespace=be&namespace=data", "more than once"),
        ("namespace=Not%20Valid", "not a namespace name"),
    ],
)
async def test_bad_queries_are_400_with_a_reason(
    agent: Agent, http, query: str, message: str
) -> None:
    await ready(http, agent)
    headers = {"Authorization": "Bearer ctl"}
    async with http.get(f"{url(agent)}?{query}", headers=headers) as resp:
        assert resp.status == 400
        assert message in await resp.text()
    # without a token, the same query learns nothing but 401
    async with http.get(f"{url(agent)}?{query}") as resp:
        assert resp.status == 401


async def test_a_deleted_pod_leaves_the_document(
    agent: Agent, api: ApiServerEmulator, http
) -> None:
    await ready(http, agent)
    api.delete_pod("be", "web-1")

    async def gone() -> bool:
        _, doc, _ = await get(http, agent)
        return all(p["name"] != "web-1" for p in doc["pods"])

    await until(gone, interval_s=0.05)
    assert agent.resolver.pid_of(UID_WEB1) is None  # its descriptors are closed


async def test_a_new_pod_is_found_and_measured(
    agent: Agent, api: ApiServerEmulator, proc: FakeProc, http
) -> None:
    await ready(http, agent)
    uid = "26a1a59b-8013-459b-9a20-a611facb1888"
    proc.process(cgroup(uid), tx=7)
    api.add_pod("be", "web-3", node_name=NODE, uid=uid)

    async def measured() -> bool:
        _, doc, _ = await get(http, agent)
        return any(p["name"] == "web-3" and p["egress_bps"] is not None for p in doc["pods"])

    await until(measured, interval_s=0.05)


async def test_api_errors_are_survived_and_counted(
    api: ApiServerEmulator, proc: FakeProc, http
) -> None:
    proc.process(cgroup(UID_WEB1), tx=1000)
    api.fail("list /api/v1/pods", 503, times=2)
    api.fail("watch /api/v1/pods", 500, times=2)
    client = new_api_client(api.client_configuration(), identity=f"agent-{NODE}")
    config = AgentConfig(
        node=NODE, listen=("127.0.0.1", 0), interval_ns=50 * MS, proc=str(proc.root)
    )
    try:
        async with Agent(config, api_client=client) as agent:
            await ready(http, agent)
            uid = "26a1a59b-8013-459b-9a20-a611facb1888"
            api.add_pod("be", "late", node_name=NODE, uid=uid)  # the watch works again

            async def listed() -> bool:
                _, doc, _ = await get(http, agent)
                return any(p["name"] == "late" for p in doc["pods"])

            await until(listed, timeout_s=20, interval_s=0.05)
            status, text, _ = await get(http, agent, "/metrics", token=None)
    finally:
        await client.close()
    assert status == 200
    assert 'detnet_agent_errors_total{kind="api_503",node="node-a"} 2.0' in text
    assert 'detnet_agent_errors_total{kind="api_500",node="node-a"} 2.0' in text


async def test_an_unreachable_token_review_is_503_then_recovers(
    api: ApiServerEmulator, agent: Agent, http
) -> None:
    await ready(http, agent)
    api.add_token("fresh", username=CONTROLLER, audiences=["detnet-agent"])
    api.fail("create /apis/authentication.k8s.io/v1/tokenreviews", 500, times=10)
    status, _, headers = await get(http, agent, token="fresh")
    assert status == 503
    assert headers["Retry-After"] == "1"
    api.clear_faults()
    assert (await get(http, agent, token="fresh"))[0] == 200  # the failure was not cached


async def test_malformed_and_huge_requests_are_refused_and_survived(agent: Agent, http) -> None:
    await ready(http, agent)
    host, port = agent.address
    async with http.get(url(agent), headers={"X-Big": "x" * 20_000}) as resp:
        assert resp.status in (400, 431)
    async with http.get(f"{url(agent)}?selector={'a' * 20_000}") as resp:
        assert resp.status in (400, 414)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x16\x03\x01garbage that is no HTTP\r\n\r\n")
    await writer.drain()
    await reader.read()  # the server answers or closes; it does not hang or crash
    writer.close()
    await writer.wait_closed()
    assert (await get(http, agent))[0] == 200


# ------------------------------------------------------------- a real process


def agent_command() -> list[str]:
    """``detnet agent`` of this installation."""
    return [sys.executable, "-m", "detnet.controller", "agent"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "nowhere"], "--listen"),
        (["--interval", "1ms"], "--interval"),
        (["--interval", "2s"], "--interval"),
        (["--allow", "justaname"], "--allow"),
        (["--node", "Not A Node"], "--node"),
        (["--proc", "/does/not/exist"], "--proc"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    node = [] if "--node" in args else ["--node", NODE]
    out = subprocess.run(
        [*agent_command(), *node, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("detnet agent: error: ")
    assert message in lines[0]


def test_the_node_comes_from_the_downward_api_when_not_given() -> None:
    env = {**os.environ, "NODE_NAME": "Not A Node"}
    out = subprocess.run(
        [*agent_command(), "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert 'NODE_NAME "Not A Node"' in out.stderr


async def test_a_real_agent_process_serves_usage_and_stops_on_sigterm(
    api: ApiServerEmulator, proc: FakeProc, tmp_path: Path, http
) -> None:
    proc.process(cgroup(UID_WEB1), tx=10)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())
    child = await asyncio.create_subprocess_exec(
        *agent_command(), "--node", NODE, "--listen", "127.0.0.1:0", "--proc", str(proc.root),
        "--kubeconfig", str(kubeconfig), "--interval", "50ms",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = await ready_line(child.stderr, "serving http://")
        address = line.split("serving http://", 1)[1].split("/", 1)[0]

        async def measured() -> bool:
            async with http.get(
                f"http://{address}/v1/usage", headers={"Authorization": "Bearer ctl"}
            ) as resp:
                if resp.status != 200:
                    return False
                doc = await resp.json()
            return any(p["uid"] == UID_WEB1 and p["egress_bps"] is not None for p in doc["pods"])

        await until(measured, timeout_s=20, interval_s=0.05)
        child.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
