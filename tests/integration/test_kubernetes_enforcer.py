"""The Kubernetes enforcer against the API server emulation, through the real
kubernetes-asyncio client over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest
from kubernetes_asyncio import client

from detnet.controller.enforce.kubernetes import (
    EGRESS_ANNOTATION,
    RECORD_ANNOTATION,
    KubernetesEnforcer,
)
from detnet.controller.errors import EnforcementError
from detnet.controller.kube.api import KubeClient
from detnet.controller.retry import NotFound, RetryPolicy
from detnet.controller.workloads import BestEffortTarget, Scope
from detnet.lab.kubeapi import DROP, ApiServerEmulator
from tests.helpers import until

NS = "best-effort"
FAST_RETRY = RetryPolicy(attempts=5, base_s=0.01, cap_s=0.05)


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.2) as server:
        server.add_deployment(NS, "telemetry-upload", replicas=3)
        server.add_deployment(NS, "erp-dashboard", replicas=3)
        server.add_pod(NS, "unrelated", labels={"app": "other"})
        yield server


def refs() -> list[BestEffortTarget]:
    return [
        BestEffortTarget(name="telemetry-upload", namespace=NS),
        BestEffortTarget(name="erp-dashboard", namespace=NS),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "pod"}, "unknown kubernetes enforcer mode 'pod': annotation or template"),
        ({"workloads": [BestEffortTarget(name="a")] * 2}, "workload names must be unique"),
        ({"workloads": [BestEffortTarget(name="a", kind="Job")]}, "a: kind must be one of"),  # type: ignore[arg-type]
        (
            {"mode": "template", "workloads": [BestEffortTarget(name="a", selector="x=y")]},
            "a: template mode needs a workload",
        ),
    ],
)
def test_constructor_refuses_what_it_cannot_enforce(kwargs: dict, message: str) -> None:
    with pytest.raises(EnforcementError, match=f"^{re.escape(message)}"):
        KubernetesEnforcer(**{"workloads": refs(), **kwargs})


@pytest.fixture
def make(api: ApiServerEmulator) -> Callable[..., KubernetesEnforcer]:
    errors: Counter[str] = Counter()

    def factory(**kwargs: object) -> KubernetesEnforcer:
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("on_api_error", lambda code: errors.update([code]))
        enforcer = KubernetesEnforcer(
            kwargs.pop("workloads", refs()),  # type: ignore[arg-type]
            configuration=api.client_configuration(),
            **kwargs,  # type: ignore[arg-type]
        )
        enforcer.errors = errors  # type: ignore[attr-defined]
        return enforcer

    return factory


def pod_values(api: ApiServerEmulator, app: str) -> list[str | None]:
    return [
        (p["metadata"].get("annotations") or {}).get(EGRESS_ANNOTATION)
        for p in api.pods(NS)
        if p["metadata"]["labels"].get("app") == app
    ]


def template_patches(api: ApiServerEmulator) -> list[object]:
    return [
        r.body
        for r in api.requests
        if r.verb == "patch" and "template" in (r.body or {}).get("spec", {})
    ]


async def test_apply_patches_every_pod_in_place_with_merge_patch(api, make) -> None:
    enforcer = make()
    assert await enforcer.start() == {}
    try:
        await enforcer.apply({Scope("telemetry-upload"): 80, Scope("erp-dashboard"): 40})
        assert pod_values(api, "telemetry-upload") == ["80M"] * 3
        assert pod_values(api, "erp-dashboard") == ["40M"] * 3
        assert pod_values(api, "other") == [None]
        pod_patches = [r for r in api.requests if r.verb == "patch" and "/pods/" in r.path]
        assert len(pod_patches) == 6
        assert {r.content_type for r in pod_patches} == {"application/merge-patch+json"}
        bodies = [r.body for r in pod_patches if "/pods/telemetry-upload-" in r.path]
        assert bodies == [{"metadata": {"annotations": {EGRESS_ANNOTATION: "80M"}}}] * 3
        assert template_patches(api) == []
        # The limit is recorded on the workload's own metadata, never its pod template.
        dep = api.workload("Deployment", NS, "telemetry-upload")
        assert dep["metadata"]["annotations"][RECORD_ANNOTATION] == "80M"
        assert EGRESS_ANNOTATION not in dep["spec"]["template"]["metadata"]["annotations"]
        # Applying the same limits again patches no pod (values already match).
        before = len(api.requests)
        await enforcer.apply({Scope("telemetry-upload"): 80})
        assert not [r for r in api.requests[before:] if "/pods/" in r.path]
        assert enforcer.enforced_pods() == {"telemetry-upload": 3, "erp-dashboard": 3}
    finally:
        await enforcer.close()


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "80"])
async def test_invalid_limit_sends_nothing(api, make, bad) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        before = len(api.requests)
        with pytest.raises(EnforcementError):
            await enforcer.apply({Scope("telemetry-upload"): 10, Scope("erp-dashboard"): bad})
        assert not [r for r in api.requests[before:] if r.verb == "patch"]
        with pytest.raises(EnforcementError, match="unknown best-effort workload"):
            await enforcer.apply({Scope("nope"): 10})
    finally:
        await enforcer.close()


async def test_survives_500_429_and_dropped_connections(api, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        api.fail("patch /api/v1/namespaces/*/pods/telemetry-upload-*", 500, times=2)
        api.fail("patch /api/v1/namespaces/*/pods/erp-dashboard-*", 429, retry_after=0.2)
        api.fail("patch /apis/apps/v1/namespaces/*/deployments/erp-dashboard", DROP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await enforcer.apply({Scope("telemetry-upload"): 50, Scope("erp-dashboard"): 30})
        # Retry-After: 0.2 was honoured (the backoff alone would be ≤ 0.05 s).
        assert loop.time() - started >= 0.2
        assert pod_values(api, "telemetry-upload") == ["50M"] * 3
        assert pod_values(api, "erp-dashboard") == ["30M"] * 3
        assert enforcer.errors["500"] == 2
        assert enforcer.errors["429"] == 1
        assert enforcer.errors["connection"] == 1
    finally:
        await enforcer.close()


async def test_404_is_not_retried(api, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        route = "/apis/apps/v1/namespaces/best-effort/deployments/erp-dashboard"
        api.fail(f"patch {route}", 404)
        with pytest.raises(NotFound, match="erp-dashboard"):
            await enforcer.apply({Scope("erp-dashboard"): 30})
        assert len([r for r in api.requests if r.verb == "patch" and r.path == route]) == 1
        assert enforcer.errors["404"] == 1
    finally:
        await enforcer.close()


async def test_retries_give_up_with_a_clear_error(api, make) -> None:
    enforcer = make(retry=RetryPolicy(attempts=2, base_s=0.01, cap_s=0.01))
    await enforcer.start()
    try:
        api.fail("patch */deployments/erp-dashboard", 503, times=5)
        with pytest.raises(EnforcementError, match="gave up after 2 attempts"):
            await enforcer.apply({Scope("erp-dashboard"): 30})
    finally:
        await enforcer.close()


async def test_a_new_pod_gets_the_current_limit_once_running(api, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        await enforcer.apply({Scope("telemetry-upload"): 70})
        api.add_pod(NS, "telemetry-upload-new", labels={"app": "telemetry-upload"}, phase="Pending")
        await asyncio.sleep(0.2)
        pod = api.pod(NS, "telemetry-upload-new")
        assert EGRESS_ANNOTATION not in pod["metadata"]["annotations"]  # Running pods only
        api.set_pod_phase(NS, "telemetry-upload-new", "Running")

        def limited() -> bool:
            pod = api.pod(NS, "telemetry-upload-new")
            return pod["metadata"]["annotations"].get(EGRESS_ANNOTATION) == "70M"

        await until(limited, timeout_s=10.0)  # a bound on the wait, not a latency check
    finally:
        await enforcer.close()


async def test_watch_relists_on_410_gone(api, make) -> None:
    enforcer = make(watch_timeout_s=1)
    await enforcer.start()
    try:
        await enforcer.apply({Scope("erp-dashboard"): 20})
        lists_before = len([r for r in api.requests if r.verb == "list"])
        api.fail("watch /api/v1/namespaces/*/pods", 410, times=2)
        api.compact()  # and the history is gone for real too
        await asyncio.sleep(1.2)  # the open watches end (timeout 1 s) and reconnect: 410
        api.add_pod(NS, "erp-dashboard-late", labels={"app": "erp-dashboard"})

        def limited() -> bool:
            pod = api.pod(NS, "erp-dashboard-late")
            return pod["metadata"]["annotations"].get(EGRESS_ANNOTATION) == "20M"

        await until(limited, timeout_s=3.0)
        assert len([r for r in api.requests if r.verb == "list"]) > lists_before
        assert enforcer.errors["410"] >= 1
    finally:
        await enforcer.close()


async def test_watch_survives_dropped_connection_and_500(api, make) -> None:
    enforcer = make(watch_timeout_s=1)
    await enforcer.start()
    try:
        await enforcer.apply({Scope("erp-dashboard"): 20})
        api.fail("watch /api/v1/namespaces/*/pods", DROP, times=2)
        api.fail("list /api/v1/namespaces/*/pods", 500, times=1)
        await asyncio.sleep(1.2)  # the current watches end; the next attempts fail
        api.add_pod(NS, "erp-dashboard-late", labels={"app": "erp-dashboard"})

        def limited() -> bool:
            pod = api.pod(NS, "erp-dashboard-late")
            return pod["metadata"]["annotations"].get(EGRESS_ANNOTATION) == "20M"

        await until(limited, timeout_s=3.0)
    finally:
        await enforcer.close()


async def test_resume_from_the_recorded_workload_annotation(api, make) -> None:
    first = make()
    await first.start()
    await first.apply({Scope("telemetry-upload"): 60, Scope("erp-dashboard"): 25})
    await first.close()
    # A pod was replaced while no controller ran: the successor brings it to the limit.
    api.add_pod(NS, "telemetry-upload-fresh", labels={"app": "telemetry-upload"})
    second = make()
    try:
        assert await second.start() == {Scope("telemetry-upload"): 60, Scope("erp-dashboard"): 25}

        def limited() -> bool:
            pod = api.pod(NS, "telemetry-upload-fresh")
            return pod["metadata"]["annotations"].get(EGRESS_ANNOTATION) == "60M"

        await until(limited, timeout_s=10.0)  # a bound on the wait, not a latency check
    finally:
        await second.close()


async def test_template_mode_patches_only_the_template(api, make) -> None:
    enforcer = make(mode="template")
    await enforcer.start()
    try:
        await enforcer.apply({Scope("telemetry-upload"): 90})
        dep = api.workload("Deployment", NS, "telemetry-upload")
        assert dep["spec"]["template"]["metadata"]["annotations"][EGRESS_ANNOTATION] == "90M"
        assert dep["metadata"]["annotations"][RECORD_ANNOTATION] == "90M"
        assert not [r for r in api.requests if "/pods" in r.path and r.verb != "get"]
        assert pod_values(api, "telemetry-upload") == [None] * 3
    finally:
        await enforcer.close()


async def test_statefulset_with_match_expressions_and_selector_refs(api, make) -> None:
    api.add_deployment(NS, "db", replicas=2, kind="StatefulSet", labels={"tier": "db"})
    sts = api.workload("StatefulSet", NS, "db")
    assert sts["spec"]["selector"] == {"matchLabels": {"tier": "db"}}
    workloads = [
        BestEffortTarget(name="db", namespace=NS, kind="StatefulSet"),
        BestEffortTarget(name="by-label", namespace=NS, selector="app in (erp-dashboard)"),
    ]
    enforcer = make(workloads=workloads)
    await enforcer.start()
    try:
        await enforcer.apply({Scope("db"): 15, Scope("by-label"): 35})
        db = [p for p in api.pods(NS) if p["metadata"]["labels"].get("tier") == "db"]
        assert [p["metadata"]["annotations"][EGRESS_ANNOTATION] for p in db] == ["15M"] * 2
        assert pod_values(api, "erp-dashboard") == ["35M"] * 3
    finally:
        await enforcer.close()


async def test_events_on_throttle_and_release(api, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        await enforcer.apply({Scope("erp-dashboard"): 50})
        await enforcer.apply({Scope("erp-dashboard"): 40})
        await enforcer.apply({Scope("erp-dashboard"): 45})
        reasons = [e["reason"] for e in api.events(NS)]
        assert reasons == ["EgressThrottled", "EgressThrottled", "EgressReleased"]
        event = api.events(NS)[-1]
        assert event["involvedObject"]["name"] == "erp-dashboard"
        assert "45M" in event["message"]
    finally:
        await enforcer.close()


async def test_close_restores_and_finishes_in_flight_patches(api, make) -> None:
    enforcer = make()
    await enforcer.start()
    api.fail("patch */pods/telemetry-upload-*", 500, times=3)
    applying = asyncio.create_task(enforcer.apply({Scope("telemetry-upload"): 10}))
    await asyncio.sleep(0)
    await enforcer.close(restore={Scope("telemetry-upload"): 100, Scope("erp-dashboard"): 100})
    await applying  # finished, not cancelled
    assert pod_values(api, "telemetry-upload") == ["100M"] * 3
    assert pod_values(api, "erp-dashboard") == ["100M"] * 3
    with pytest.raises(EnforcementError, match="not started"):
        await enforcer.apply({Scope("telemetry-upload"): 10})


async def test_start_fails_clearly_for_a_missing_workload(api, make) -> None:
    enforcer = make(workloads=[BestEffortTarget(name="ghost", namespace=NS)])
    with pytest.raises(NotFound, match="ghost"):
        await enforcer.start()
    await enforcer.close()


async def test_a_shared_client_is_used_and_left_open(api) -> None:
    codes: list[str] = []
    async with client.ApiClient(api.client_configuration()) as ac:
        kube = KubeClient(ac, retry=FAST_RETRY, on_api_error=codes.append)
        enforcer = KubernetesEnforcer(refs(), kube=kube)
        await enforcer.start()
        try:
            api.fail("patch */pods/erp-dashboard-*", 500, times=1)
            await enforcer.apply({Scope("erp-dashboard"): 30})
        finally:
            await enforcer.close()
        assert pod_values(api, "erp-dashboard") == ["30M"] * 3
        assert codes == ["500"]  # counted through the shared client's hook
        # The enforcer did not close a client it was given: a successor can use it.
        successor = KubernetesEnforcer(refs(), kube=kube)
        try:
            assert await successor.start() == {Scope("erp-dashboard"): 30}
        finally:
            await successor.close()
        with pytest.raises(ValueError, match="either kube= or the pieces"):
            KubernetesEnforcer(refs(), kube=kube, qps=5)
