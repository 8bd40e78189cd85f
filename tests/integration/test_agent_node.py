"""``detnet agent`` on a real node (root): pods are network namespaces whose processes sit
in kubelet-shaped cgroups (``lab/kubepods.py``: the systemd driver on the cgroup v1
named hierarchy, the cgroupfs driver on cgroup v2), shaped by tbf at 20 and 50 Mbit/s
on their ``eth0`` with bulk TCP senders above that; the API server emulation holds the
pods with the same UIDs on the agent's node. The agent runs as a real process, as the
DaemonSet runs it: an unprivileged user (65532) with every capability dropped and
no_new_privs, in the host's PID namespace. ``/v1/usage`` must be within ±10 % of each
rate, stay so when the process it reads through exits (a container restart), and follow
a rate change."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from detnet.lab.kubeapi import ApiServerEmulator
from detnet.lab.kubepods import KubePods
from tests.conftest import IS_ROOT, requires_tool
from tests.helpers import ready_line, until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not IS_ROOT, reason="needs root: network namespaces, tc and cgroups; CI runs as root"
    ),
    requires_tool("tc", "iproute2"),
    requires_tool("setpriv", "util-linux"),
]

NODE = "node-agent-it"
SINK_PORT = 5301
MBIT = 1e6 / 8  # bytes per second
AGENT_UID = 65532  # the DaemonSet's runAsUser
CONTROLLER = "system:serviceaccount:detnet-system:detnet-controller"
SITE_PACKAGES = (
    Path(sys.prefix)
    / "lib"
    / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    / "site-packages"
)
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")


@pytest.fixture
def node() -> Iterator[KubePods]:
    with KubePods(tag="agent-it") as pods:
        a = pods.add_pod(driver="systemd", qos="burstable", rate_mbps=20)
        b = pods.add_pod(driver="cgroupfs", qos="besteffort", rate_mbps=50)
        pods.spawn_on_node(
            [sys.executable, "-m", "detnet.lab.traffic", "sink", "--listen", f"0.0.0.0:{SINK_PORT}"]
        )
        for pod in (a, b):
            pods.spawn(pod, ["sleep", "600"])  # the sandbox: the pod's first process
        for pod in (a, b):
            pods.spawn(
                pod,
                [sys.executable, "-m", "detnet.lab.traffic", "send", "--to",
                 f"{pod.node_address}:{SINK_PORT}", "--mode", "steady", "--flows", "2"],
            )  # fmt: skip
        yield pods


def unprivileged_python() -> list[str]:
    """This installation's Python as uid 65532 with no capability at all (the DaemonSet's
    securityContext), or skip when this machine cannot run it so."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} missing: this venv's own interpreter is under /root")
    import detnet.controller

    source = Path(detnet.controller.__file__).resolve().parent  # an editable install's tree
    for path in (SITE_PACKAGES, source):
        for d in (path, *path.parents):
            if not d.stat().st_mode & 0o001:  # others may not enter it
                pytest.skip(
                    f"uid {AGENT_UID} cannot reach {path}: {d} is mode "
                    f"{d.stat().st_mode & 0o777:o} (check out and install where others may "
                    "read, e.g. chmod o+x on it)"
                )
    bootstrap = (
        f"import site, sys; site.addsitedir({str(SITE_PACKAGES)!r}); "
        "from detnet.controller.cli import main; sys.exit(main())"
    )
    return [
        "setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        str(SYSTEM_PYTHON), "-c", bootstrap, "agent",
    ]  # fmt: skip


@pytest.fixture
async def cluster(node: KubePods) -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.5) as api:
        api.add_node(NODE)
        a, b = node.pods
        api.add_pod("be", "upload-20m", node_name=NODE, uid=a.uid, labels={"app": "upload"})
        api.add_pod("be", "upload-50m", node_name=NODE, uid=b.uid, labels={"app": "upload"})
        api.add_pod("kube-system", "host-net", node_name=NODE, uid=str(uuid.uuid4()))
        api.patch("Pod", "host-net", {"spec": {"hostNetwork": True}}, namespace="kube-system")
        api.add_token("ctl", username=CONTROLLER, audiences=["detnet-agent"])
        yield api


def readable_kubeconfig(home: Path, text: str) -> Path:
    """A kubeconfig uid 65532 can read (pytest's tmp_path is root's alone)."""
    home.chmod(0o755)
    path = home / "kubeconfig"
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture
async def agent_url(cluster: ApiServerEmulator) -> AsyncIterator[str]:
    home = Path(tempfile.mkdtemp(prefix="detnet-agent-it-"))
    try:
        kubeconfig = readable_kubeconfig(home, cluster.kubeconfig())
        child = await asyncio.create_subprocess_exec(
            *unprivileged_python(), "--node", NODE, "--listen", "127.0.0.1:0",
            "--kubeconfig", str(kubeconfig), "--interval", "100ms",
            stderr=asyncio.subprocess.PIPE, cwd=str(home),
        )  # fmt: skip
        try:
            line = await ready_line(child.stderr, "serving http://")
            yield "http://" + line.split("serving http://", 1)[1].split("/", 1)[0]
        finally:
            if child.returncode is None:
                child.terminate()
                async with asyncio.timeout(20):
                    assert await child.wait() == 0
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def usage(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, object]]:
    """The pods of the document by name ({} while the agent has no sample yet)."""
    async with http.get(url, headers={"Authorization": "Bearer ctl"}) as resp:
        if resp.status == 503:
            return {}
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    return {p["name"]: p for p in doc["pods"]}


async def steady(
    http: aiohttp.ClientSession, url: str, names: tuple[str, ...], *, seconds: float = 3.0
) -> dict[str, float]:
    """The median of each pod's 1 s mean egress, read every 0.25 s for ``seconds``, once
    every pod has one."""

    async def known() -> bool:
        pods = await usage(http, url)
        return all(pods.get(n, {}).get("egress_bps_1s") is not None for n in names)

    await until(known, timeout_s=30, interval_s=0.05)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(int(seconds / 0.25)):
        pods = await usage(http, url)
        for n in names:
            value = pods[n]["egress_bps_1s"]
            if value is not None:
                assert isinstance(value, float)
                samples[n].append(value)
        await asyncio.sleep(0.25)
    return {n: statistics.median(v) for n, v in samples.items()}


def within(measured: float, expected: float, tolerance: float = 0.10) -> bool:
    return abs(measured - expected) <= tolerance * expected


async def test_usage_matches_the_shaped_rates(node: KubePods, agent_url: str) -> None:
    url = f"{agent_url}/v1/usage"
    async with aiohttp.ClientSession() as http:
        # A warm-up second for TCP to fill the tbf, then the steady state.
        await asyncio.sleep(1.0)
        rates = await steady(http, url, ("upload-20m", "upload-50m"))
        assert within(rates["upload-20m"], 20 * MBIT), rates
        assert within(rates["upload-50m"], 50 * MBIT), rates
        pods = await usage(http, url)
        for name in ("upload-20m", "upload-50m"):
            assert isinstance(pods[name]["ingress_bps"], float)  # the ACKs: small, known
            assert pods[name]["ingress_bps"] < pods[name]["egress_bps_1s"]  # type: ignore[operator]
        assert pods["host-net"]["egress_bps"] is None  # hostNetwork: not measurable, not 0

        # A container restart: the sandbox process exits; the agent reads through another
        # process of the pod and the numbers stay right.
        sandbox = node.pods[0].processes[0]
        sandbox.kill()
        sandbox.wait()
        await asyncio.sleep(0.5)
        rates = await steady(http, url, ("upload-20m",))
        assert within(rates["upload-20m"], 20 * MBIT), rates

        # A rate change (Cilium's bandwidth manager would do this): followed.
        node.set_rate(node.pods[1], 20)
        await asyncio.sleep(1.5)
        rates = await steady(http, url, ("upload-50m",), seconds=2.0)
        assert within(rates["upload-50m"], 20 * MBIT), rates


async def test_the_agent_needs_no_capability_to_read_other_users_pods(
    node: KubePods, agent_url: str
) -> None:
    """The senders run as root in their own network namespaces; the agent, as 65532 with
    no capability, still resolves and reads them (docs/agent.md, "Privileges")."""
    async with aiohttp.ClientSession() as http:

        async def both() -> bool:
            pods = await usage(http, f"{agent_url}/v1/usage")
            names = ("upload-20m", "upload-50m")
            return all(pods.get(n, {}).get("egress_bps") is not None for n in names)

        await until(both, timeout_s=30, interval_s=0.05)
        async with http.get(f"{agent_url}/metrics") as resp:
            text = await resp.text()
    assert 'detnet_agent_pods{node="node-agent-it",state="measured"} 2.0' in text
    assert 'kind="proc_unreadable"' not in text
    assert os.geteuid() == 0  # the pods' processes are root's; the agent is not
