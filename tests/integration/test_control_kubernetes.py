"""`detnet control --enforcer kubernetes` end to end: issue 4's acceptance check.

The real CLI runs as a subprocess against the API server emulation running in this test's
event loop on 127.0.0.1, reached through a temporary kubeconfig (``KUBECONFIG``). It
probes a real reflector on loopback with a jitter SLO no path meets (1 ns), so it keeps
cutting the two best-effort Deployments (three pods each) until min_bandwidth. Times are
compared between the controller's logged decisions and the emulator's recorded requests:
both are ``time.time()`` on this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.lab.kubeapi import DROP, ApiServerEmulator, RecordedRequest
from tests.helpers import DETNET, free_port, until

NS = "best-effort"
LEASE_NS = "detnet-system"
WORKLOADS = ("telemetry-upload", "erp-dashboard")
EGRESS = "kubernetes.io/egress-bandwidth"
RECORD = "detnet.io/egress-bandwidth"
MERGE_PATCH = "application/merge-patch+json"
SLACK_S = 0.05  # the decision's ts is rounded to 1 µs and read after apply() returned
POD_ROUTE = f"/api/v1/namespaces/{NS}/pods/"


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
async def reflector() -> AsyncIterator[ReflectorServer]:
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.5) as server:
        for name in WORKLOADS:
            server.add_deployment(NS, name, replicas=3)
        server.add_pod(NS, "unrelated", labels={"app": "other"})
        yield server


@pytest.fixture
def kubeconfig(api: ApiServerEmulator, tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(api.kubeconfig())
    return path


def config_text(
    udp_port: int,
    *,
    initial: int = 100,
    decrease_factor: float = 0.5,
    cooldown: str = "300ms",
    min_bandwidth: int = 10,
) -> str:
    """Two Deployments, one UDP app with an SLO always violated; no lease_namespace (it
    comes from POD_NAMESPACE)."""
    return textwrap.dedent(
        f"""\
        critical_apps:
          - name: robot-control
            host: 127.0.0.1
            port: {udp_port}
            protocol: UDP
            interval: 10ms
            max_jitter_ms: 0.000001
        best_effort_targets:
          - deployment: telemetry-upload
            namespace: {NS}
            initial_bandwidth: {initial}
          - deployment: erp-dashboard
            namespace: {NS}
            initial_bandwidth: {initial}
        control:
          control_interval: 100ms
          window: 1s
        policy:
          decrease_factor: {decrease_factor}
          decrease_cooldown: {cooldown}
          min_bandwidth: {min_bandwidth}
        """
    )


def udp_port(reflector: ReflectorServer) -> int:
    assert reflector.udp_address is not None
    return reflector.udp_address[1]


def child_env(kubeconfig: Path, identity: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KUBERNETES_SERVICE_HOST", "POD_NAME", "POD_NAMESPACE")
    }
    env |= {"KUBECONFIG": str(kubeconfig), "POD_NAME": identity, "POD_NAMESPACE": LEASE_NS}
    return env


# --- the controller under test --------------------------------------------------------


class Controller:
    """One `detnet control --enforcer kubernetes` subprocess and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process, *, identity: str, port: int) -> None:
        self.proc, self.identity, self.port = proc, identity, port
        self.decisions: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self._on_stdout)),
            asyncio.create_task(self._read(proc.stderr, self.stderr.append)),
        ]

    @classmethod
    async def start(cls, config: Path, kubeconfig: Path, *, identity: str) -> Controller:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *DETNET,
            "control",
            "--config",
            str(config),
            "--enforcer",
            "kubernetes",
            "--metrics",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
            env=child_env(kubeconfig, identity),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, identity=identity, port=port)

    @staticmethod
    async def _read(stream: asyncio.StreamReader, sink: Callable[[str], None]) -> None:
        while line := await stream.readline():
            sink(line.decode(errors="replace"))

    def _on_stdout(self, line: str) -> None:
        record = json.loads(line)  # stdout carries only JSON decision lines
        assert record["event"] == "decision", record
        self.decisions.append(record)

    def cuts(self) -> list[dict[str, Any]]:
        """Decrease decisions that were enforced without error."""
        return [
            d
            for d in self.decisions
            if d["action"] == "decrease" and d["enforce_s"] is not None and "error" not in d
        ]

    def log(self) -> str:
        return "".join(self.stderr)[-3000:]

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample from the process's /metrics (None: absent or not serving yet)."""

        def get() -> str:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                text: str = resp.read().decode()
                return text

        try:
            text = await asyncio.to_thread(get)
        except (urllib.error.URLError, OSError):
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    async def terminate(self, within: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(self.proc.wait(), within)
        await asyncio.gather(*self._readers)
        return rc

    async def aclose(self) -> None:
        """Kill (by PID) if still running, and collect the readers."""
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def controllers() -> AsyncIterator[list[Controller]]:
    started: list[Controller] = []
    yield started
    for c in started:
        await c.aclose()


# --- helpers over the emulator ---------------------------------------------------------


def pods_of(api: ApiServerEmulator, workload: str) -> list[dict[str, Any]]:
    return [p for p in api.pods(NS) if p["metadata"]["labels"].get("app") == workload]


def pod_value(pod: dict[str, Any]) -> str | None:
    value: str | None = (pod["metadata"].get("annotations") or {}).get(EGRESS)
    return value


def pod_patches(
    api: ApiServerEmulator, pod: str, value: str | None = None
) -> list[RecordedRequest]:
    return [
        r
        for r in api.requests
        if r.verb == "patch"
        and r.path == POD_ROUTE + pod
        and (value is None or r.body == {"metadata": {"annotations": {EGRESS: value}}})
    ]


def all_carry(api: ApiServerEmulator, value: str) -> bool:
    """Every pod of both workloads, and both workloads' records, carry ``value``."""
    pods_ok = all(pod_value(p) == value for w in WORKLOADS for p in pods_of(api, w))
    records_ok = all(
        (api.workload("Deployment", NS, w)["metadata"].get("annotations") or {}).get(RECORD)
        == value
        for w in WORKLOADS
    )
    return pods_ok and records_ok


def assert_in_place_only(api: ApiServerEmulator) -> None:
    """Every write is a merge patch of metadata.annotations; nothing touches a template."""
    for r in api.requests:
        assert "template" not in json.dumps(r.body), f"{r.method} {r.path} touches a template"
        if r.verb == "patch":
            assert r.content_type.split(";")[0] == MERGE_PATCH, r
            assert set(r.body) == {"metadata"}, r
            assert set(r.body["metadata"]) == {"annotations"}, r
        if r.path.startswith(POD_ROUTE):
            assert r.verb in ("get", "patch"), f"pods are never replaced or deleted: {r}"


# --- the tests -------------------------------------------------------------------------


async def test_cuts_patch_every_pod_in_place(
    api: ApiServerEmulator,
    reflector: ReflectorServer,
    kubeconfig: Path,
    tmp_path: Path,
    controllers: list[Controller],
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(udp_port(reflector)))
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in api.pods(NS)}
    specs = {w: api.workload("Deployment", NS, w)["spec"] for w in WORKLOADS}
    c = await Controller.start(cfg, kubeconfig, identity="detnet-a")
    controllers.append(c)

    # 100 -> 50 -> 25 -> 12 -> 10 (min_bandwidth), then it holds.
    def at_min() -> bool:
        return any(set(d["limits"].values()) == {10} for d in c.cuts())

    await until(at_min, timeout_s=30, what=lambda: f"cuts down to min_bandwidth; stderr: {c.log()}")
    # No fault here: the error counters an alert reads are there, at zero, not absent.
    for name, labels in (
        ("detnet_api_errors_total", {"code": "500"}),
        ("detnet_api_errors_total", {"code": "connection"}),
        ("detnet_enforcement_errors_total", {"enforcer": "kubernetes"}),
    ):
        assert await c.metric(name, **labels) == 0.0, (name, labels)
    cuts = c.cuts()
    assert [d["limits"]["telemetry-upload"] for d in cuts] == [50, 25, 12, 10]
    # How fast (decision -> every pod patched) is `detnet bench reaction`'s figure, not a
    # bound here: a test asserts what happened and in which order.
    for d in cuts:
        decided_at = d["ts"]  # when the policy decided, before apply() ran
        for workload, mbps in d["limits"].items():
            for pod in pods_of(api, workload):
                name = pod["metadata"]["name"]
                patches = pod_patches(api, name, f"{mbps}M")
                assert patches, f"{name} never patched to {mbps}M"
                lag = min(r.at for r in patches) - decided_at
                assert lag >= -SLACK_S, f"{name} patched {-lag:.3f} s before the decision"

    assert all_carry(api, "10M")
    assert_in_place_only(api)
    # In place: the same pods (uids), the Deployments' specs and generations untouched.
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in api.pods(NS)} == uids
    for w in WORKLOADS:
        deployment = api.workload("Deployment", NS, w)
        assert deployment["spec"] == specs[w]
        assert deployment["metadata"]["generation"] == 1
    assert pod_value(api.pod(NS, "unrelated")) is None
    assert api.lease(LEASE_NS, "detnet-controller") is not None  # POD_NAMESPACE default
    assert await c.metric("detnet_leader") == 1.0

    # A new pod: not patched while Pending, patched once it turns Running.
    api.add_pod(NS, "telemetry-upload-new", labels={"app": "telemetry-upload"}, phase="Pending")
    await asyncio.sleep(0.5)  # time for the watch to see it (and wrongly patch it)
    assert not pod_patches(api, "telemetry-upload-new")
    running_at = time.time()
    api.set_pod_phase(NS, "telemetry-upload-new", "Running")
    await until(
        lambda: pod_value(api.pod(NS, "telemetry-upload-new")) == "10M",
        what=lambda: f"the new pod to get 10M; stderr: {c.log()}",
    )
    first = min(r.at for r in pod_patches(api, "telemetry-upload-new"))
    assert first >= running_at - SLACK_S, "patched before it was Running"
    assert_in_place_only(api)

    assert await c.terminate() == 0, c.log()
    assert "Traceback" not in c.log()


async def test_survives_api_faults(
    api: ApiServerEmulator,
    reflector: ReflectorServer,
    kubeconfig: Path,
    tmp_path: Path,
    controllers: list[Controller],
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(udp_port(reflector), cooldown="500ms"))
    pods = "/api/v1/namespaces/*/pods/*"
    deployments = "/apis/apps/v1/namespaces/*/deployments/*"
    # Faults at start: resolving the workloads, the first watches (410, then a drop), and
    # the first pod patches (500 twice, 429 with Retry-After, a dropped connection).
    api.fail(f"get {deployments}", 500)
    api.fail("watch /api/v1/namespaces/*/pods", 410, times=2)
    api.fail("watch /api/v1/namespaces/*/pods", DROP)
    api.fail(f"patch {pods}", 500, times=2)
    api.fail(f"patch {pods}", 429, retry_after=0.3)
    api.fail(f"patch {pods}", DROP)
    c = await Controller.start(cfg, kubeconfig, identity="detnet-a")
    controllers.append(c)
    await until(
        lambda: bool(c.cuts()), timeout_s=30, what=lambda: f"a first cut; stderr: {c.log()}"
    )
    # And while it runs: the next cuts meet the same kinds of faults.
    api.fail(f"patch {deployments}", 500)
    api.fail(f"patch {pods}", 429, retry_after=0.2)
    api.fail(f"patch {pods}", 500, times=2)
    api.fail(f"patch {pods}", DROP)
    api.fail("create /api/v1/namespaces/*/events", 500, times=2)

    await until(
        lambda: any(set(d["limits"].values()) == {10} for d in c.cuts()) and all_carry(api, "10M"),
        timeout_s=40,
        what=lambda: f"every pod and record at min_bandwidth; stderr: {c.log()}",
    )
    assert c.proc.returncode is None, "the controller must keep running"
    for code in ("500", "429", "410", "connection"):
        count = await c.metric("detnet_api_errors_total", code=code)
        assert count is not None, f"no API error {code} counted"
        assert count >= 1
    assert_in_place_only(api)
    assert await c.terminate() == 0, c.log()


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("policy:\n", "kubernetes:\n  qps: fast\npolicy:\n", "kubernetes.qps"),
        (
            f"namespace: {NS}\n    initial_bandwidth: 100",
            f"namespace: {NS}\n    initial_bandwidth: [100]",
            "best_effort_targets[0].initial_bandwidth",
        ),
    ],
)
async def test_bad_config_exits_nonzero_without_any_request(
    api: ApiServerEmulator, kubeconfig: Path, tmp_path: Path, old: str, new: str, field: str
) -> None:
    text = config_text(5201)
    assert old in text
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text.replace(old, new, 1))
    proc = await asyncio.create_subprocess_exec(
        *DETNET,
        "control",
        "--config",
        str(cfg),
        "--enforcer",
        "kubernetes",
        env=child_env(kubeconfig, "detnet-a"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert f": {field}: " in lines[0], lines
    assert lines[0].startswith(f"detnet control: error: {cfg}:")
    assert api.requests == []


async def test_only_the_leader_patches_and_the_standby_takes_over(
    api: ApiServerEmulator,
    reflector: ReflectorServer,
    kubeconfig: Path,
    tmp_path: Path,
    controllers: list[Controller],
) -> None:
    # 1000 Mbit/s cut by 20 % per 500 ms: still cutting (above 1) when B takes over.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        config_text(
            udp_port(reflector),
            initial=1000,
            decrease_factor=0.2,
            cooldown="500ms",
            min_bandwidth=1,
        )
    )
    a = await Controller.start(cfg, kubeconfig, identity="detnet-a")
    controllers.append(a)

    def holder() -> str | None:
        lease = api.lease(LEASE_NS, "detnet-controller")
        return None if lease is None else lease["spec"].get("holderIdentity")

    await until(
        lambda: holder() == "detnet-a", timeout_s=30, what=lambda: f"A to lead; stderr: {a.log()}"
    )
    b = await Controller.start(cfg, kubeconfig, identity="detnet-b")
    controllers.append(b)

    def pod_patches_by(identity: str) -> list[RecordedRequest]:
        return [
            r
            for r in api.requests
            if r.verb == "patch"
            and r.path.startswith(POD_ROUTE)
            and r.user_agent == f"detnet/{identity}"
        ]

    async def serving(c: Controller) -> bool:
        return await c.metric("detnet_leader") is not None

    await until(
        lambda: len(a.cuts()) >= 2, timeout_s=30, what=lambda: f"A to cut twice; stderr: {a.log()}"
    )
    await until(lambda: serving(b), timeout_s=30, what="B to serve /metrics", interval_s=0.1)
    assert await a.metric("detnet_leader") == 1.0
    assert await b.metric("detnet_leader") == 0.0
    assert pod_patches_by("detnet-a")
    assert not pod_patches_by("detnet-b"), "the standby patched pods"
    assert holder() == "detnet-a"

    # SIGTERM: A finishes, releases the lease (holder cleared) and exits 0.
    stopped_at = time.time()
    assert await a.terminate() == 0, a.log()
    releases = [
        r
        for r in api.requests
        if r.verb == "update"
        and "/leases/" in r.path
        and r.user_agent == "detnet/detnet-a"
        and not (r.body.get("spec") or {}).get("holderIdentity")
    ]
    assert releases, "A did not release the lease"
    assert not [r for r in pod_patches_by("detnet-b") if r.at < stopped_at]

    # B takes over (at its next retry period, 2 s by default) and cuts from A's record.
    await until(
        lambda: holder() == "detnet-b",
        timeout_s=15,
        what=lambda: f"B to take the lease; stderr: {b.log()}",
    )
    await until(
        lambda: bool(pod_patches_by("detnet-b")),
        timeout_s=15,
        what=lambda: f"B to patch; stderr: {b.log()}",
    )
    await until(
        lambda: bool(b.cuts()),
        timeout_s=15,
        what=lambda: f"B's first cut logged; stderr: {b.log()}",
    )
    assert not [r for r in pod_patches_by("detnet-a") if r.at > releases[-1].at]
    assert await b.metric("detnet_leader") == 1.0
    last_a = a.cuts()[-1]["limits"]["telemetry-upload"]
    first_b = b.cuts()[0]
    # B resumed from A's record: its first cut starts where A stopped, not from 1000.
    assert first_b["previous"]["telemetry-upload"] == last_a, (first_b, last_a)
    assert_in_place_only(api)
    assert await b.terminate() == 0, b.log()
