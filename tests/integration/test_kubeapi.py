"""The API server emulation over HTTP on 127.0.0.1, driven by the real kubernetes-asyncio
client: lists, patch content types, Status errors, concurrency, watch and faults."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client

from detnet.lab.kubeapi import DROP, ApiServerEmulator

NS = "ns"


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.1) as server:
        yield server


@pytest.fixture
async def v1(api: ApiServerEmulator) -> AsyncIterator[Any]:
    async with client.ApiClient(api.client_configuration()) as ac:
        yield client.CoreV1Api(ac)


async def test_list_by_label_selector_and_patch_content_types(api, v1) -> None:
    pods = api.add_deployment(NS, "web", replicas=2)
    api.add_pod(NS, "other", labels={"app": "db"})
    listing = await v1.list_namespaced_pod(NS, label_selector="app in (web)")
    assert sorted(p.metadata.name for p in listing.items) == sorted(pods)
    # A dict body without a content type is a strategic merge patch.
    await v1.patch_namespaced_pod(pods[0], NS, {"metadata": {"annotations": {"x": "1"}}})
    await v1.patch_namespaced_pod(
        pods[0],
        NS,
        {"metadata": {"annotations": {"x": None, "y": "2"}}},
        _content_type="application/merge-patch+json",
    )
    assert api.pod(NS, pods[0])["metadata"]["annotations"] == {"y": "2"}
    types = [r.content_type for r in api.requests if r.verb == "patch"]
    assert types == ["application/strategic-merge-patch+json", "application/merge-patch+json"]


async def test_status_errors_and_validation(api, v1) -> None:
    with pytest.raises(client.ApiException) as info:
        await v1.read_namespaced_pod("ghost", NS)
    body = json.loads(info.value.body or b"")
    assert (info.value.status, body["kind"], body["reason"], body["code"]) == (
        404,
        "Status",
        "NotFound",
        404,
    )
    api.add_pod(NS, "p")
    with pytest.raises(client.ApiException) as info:
        await v1.patch_namespaced_pod(
            "p",
            NS,
            {"metadata": {"annotations": {"kubernetes.io/egress-bandwidth": 80}}},
            _content_type="application/merge-patch+json",
        )
    assert info.value.status == 422


async def test_optimistic_concurrency_on_replace(api) -> None:
    async with client.ApiClient(api.client_configuration()) as ac:
        leases: Any = client.CoordinationV1Api(ac)
        body = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
        created = await leases.create_namespaced_lease(NS, body)
        stale_rv = created.metadata.resource_version
        created.spec.holder_identity = "b"
        await leases.replace_namespaced_lease("l", NS, created)
        created.spec.holder_identity = "c"
        created.metadata.resource_version = stale_rv
        with pytest.raises(client.ApiException) as info:
            await leases.replace_namespaced_lease("l", NS, created)
        assert info.value.status == 409
        with pytest.raises(client.ApiException) as info:
            await leases.create_namespaced_lease(NS, body)
        assert info.value.status == 409
    lease = api.lease(NS, "l")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "b"


async def read_watch(v1: Any, **kwargs: object) -> list[dict]:
    resp = await v1.list_namespaced_pod(
        NS, watch=True, timeout_seconds=1, _preload_content=False, **kwargs
    )
    events = []
    try:
        while line := await resp.content.readline():
            events.append(json.loads(line))
    finally:
        resp.release()
    return events


async def test_watch_from_resource_version_bookmarks_and_410(api, v1) -> None:
    api.add_pod(NS, "a", labels={"app": "web"})
    listing = await v1.list_namespaced_pod(NS)
    rv = listing.metadata.resource_version
    api.add_pod(NS, "b", labels={"app": "web"})
    api.add_pod(NS, "c", labels={"app": "db"})
    api.delete_pod(NS, "b")
    events = await read_watch(
        v1, resource_version=rv, label_selector="app=web", allow_watch_bookmarks=True
    )
    kinds = [(e["type"], e["object"]["metadata"].get("name")) for e in events]
    assert kinds[:2] == [("ADDED", "b"), ("DELETED", "b")]
    assert ("BOOKMARK", None) in kinds
    api.compact()
    gone = await read_watch(v1, resource_version=rv)
    assert gone[0]["type"] == "ERROR"
    assert gone[0]["object"]["code"] == 410


async def test_fault_injection_queue(api, v1) -> None:
    api.add_pod(NS, "p")
    api.fail("get /api/v1/namespaces/*/pods/p", 429, times=2, retry_after=3)
    # aiohttp silently resends an idempotent GET on a dropped keep-alive connection,
    # so the dropped connection is shown with a PATCH.
    api.fail("patch /api/v1/namespaces/*/pods/p", DROP)
    for _ in range(2):
        with pytest.raises(client.ApiException) as info:
            await v1.read_namespaced_pod("p", NS)
        assert info.value.status == 429
        headers: Any = info.value.headers
        assert headers["Retry-After"] == "3"
    with pytest.raises(aiohttp.ClientError):
        await v1.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"a": "b"}}})
    assert (await v1.read_namespaced_pod("p", NS)).metadata.name == "p"
    assert [r.verb for r in api.requests] == ["get", "get", "patch", "get"]
    assert api.pod(NS, "p")["metadata"]["labels"] == {}  # the dropped patch was not applied


async def test_events_create_and_list(api, v1) -> None:
    body = {
        "metadata": {"generateName": "web."},
        "involvedObject": {"kind": "Deployment", "name": "web", "namespace": NS},
        "reason": "EgressThrottled",
        "message": "m",
    }
    await v1.create_namespaced_event(NS, body)
    listing = await v1.list_namespaced_event(NS)
    assert [e.reason for e in listing.items] == ["EgressThrottled"]
    assert api.events(NS)[0]["metadata"]["name"].startswith("web.")
