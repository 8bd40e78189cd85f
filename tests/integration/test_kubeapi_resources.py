"""The emulation's cluster resources over HTTP, driven by the real kubernetes-asyncio
client (and kubectl): nodes, pods across namespaces with field selectors, watches that
see objects leave their selection, the status subresource, Services and their
EndpointSlices, TokenReview and TokenRequest, and discovery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch

from detnet.lab.kubeapi import ApiServerEmulator
from tests.conftest import requires_tool

NS = "apps"
AUD = "detnet-agent"


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.1) as server:
        server.add_node("n1", internal_ip="198.18.1.1")
        server.add_node("n2", internal_ip="198.18.1.2")
        yield server


@pytest.fixture
async def ac(api: ApiServerEmulator) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(api.client_configuration()) as c:
        yield c


async def raw(api: ApiServerEmulator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, api.url + path, json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_nodes_are_cluster_scoped(api: ApiServerEmulator, ac: client.ApiClient) -> None:
    v1: Any = client.CoreV1Api(ac)
    nodes = await v1.list_node()
    assert [n.metadata.name for n in nodes.items] == ["n1", "n2"]
    assert nodes.items[0].metadata.namespace is None
    assert nodes.items[0].status.addresses[0].address == "198.18.1.1"
    await v1.patch_node("n2", {"spec": {"unschedulable": True}})
    only = await v1.list_node(field_selector="spec.unschedulable=true")
    assert [n.metadata.name for n in only.items] == ["n2"]
    with pytest.raises(client.ApiException) as info:
        await v1.list_node(field_selector="metadata.namespace=x")
    assert info.value.status == 400
    # The kubelet's status write: the status subresource, which leaves the spec alone.
    patch = {
        "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        "spec": {"unschedulable": False},
    }
    await v1.patch_node_status("n2", patch)
    n2 = api.get("Node", "n2")
    assert (n2["status"]["conditions"][0]["status"], n2["spec"]["unschedulable"]) == ("False", True)
    assert (await raw(api, "GET", f"/api/v1/namespaces/{NS}/nodes"))[0] == 404


async def test_pods_across_namespaces_by_field(
    api: ApiServerEmulator, ac: client.ApiClient
) -> None:
    v1: Any = client.CoreV1Api(ac)
    api.add_pod(NS, "a", node_name="n1")
    api.add_pod("other", "b", node_name="n1", phase="Pending")
    api.add_pod(NS, "c", node_name="n2")
    on_n1 = await v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [(p.metadata.namespace, p.metadata.name) for p in on_n1.items] == [
        (NS, "a"),
        ("other", "b"),
    ]
    running = await v1.list_pod_for_all_namespaces(
        field_selector="spec.nodeName=n1,status.phase=Running"
    )
    assert [p.metadata.name for p in running.items] == ["a"]
    not_apps = await v1.list_pod_for_all_namespaces(field_selector=f"metadata.namespace!={NS}")
    assert [p.metadata.name for p in not_apps.items] == ["b"]
    with pytest.raises(client.ApiException) as info:
        await v1.list_namespaced_pod(NS, field_selector="spec.containers=x")
    body = json.loads(info.value.body or b"")
    assert (info.value.status, body["reason"], body["message"]) == (
        400,
        "BadRequest",
        "field label not supported: spec.containers",
    )
    # As on the real server, list items carry no kind or apiVersion; the list does.
    status, listing = await raw(api, "GET", "/api/v1/pods?fieldSelector=metadata.name%3Da")
    assert (status, listing["kind"], listing["apiVersion"]) == (200, "PodList", "v1")
    assert "kind" not in listing["items"][0]
    assert (await raw(api, "POST", "/api/v1/pods", {"metadata": {"name": "x"}}))[0] == 405


async def _watch_events(
    func: Any, want: int, started: asyncio.Event, **kwargs: Any
) -> list[tuple[str, str, str]]:
    """(type, name, phase) of the first ``want`` events of a watch; ``started`` is set
    once the first one arrived (the watch is then surely open)."""
    got: list[tuple[str, str, str]] = []
    w = watch.Watch()
    async with w.stream(func, timeout_seconds=10, **kwargs) as stream:
        async for event in stream:
            obj = event["raw_object"]
            got.append((event["type"], obj["metadata"]["name"], obj["status"]["phase"]))
            started.set()
            if len(got) == want:
                w.stop()
    return got


async def test_a_node_agent_watch_sees_pods_leave_its_selection(
    api: ApiServerEmulator, ac: client.ApiClient
) -> None:
    """The node agent's watch: ``spec.nodeName=NODE`` (here with Running): a pod that
    stops matching is DELETED for it, one that starts matching ADDED, as the real
    server's watch cache sends them."""
    v1: Any = client.CoreV1Api(ac)
    api.add_pod(NS, "early", node_name="n1")
    started = asyncio.Event()
    selector = "spec.nodeName=n1,status.phase=Running"
    task = asyncio.create_task(
        _watch_events(v1.list_pod_for_all_namespaces, 5, started, field_selector=selector)
    )
    await asyncio.wait_for(started.wait(), 10)  # "early" arrived: the watch is open
    api.add_pod(NS, "elsewhere", node_name="n2")  # never seen
    api.add_pod(NS, "late", node_name="n1", phase="Pending")  # not yet
    api.set_pod_phase(NS, "late", "Running")  # ADDED
    api.set_pod_ready(NS, "late", False)  # MODIFIED
    api.set_pod_phase(NS, "early", "Succeeded")  # DELETED, as it was (Running)
    api.delete_pod(NS, "late")  # DELETED
    events = await asyncio.wait_for(task, 20)
    assert events == [
        ("ADDED", "early", "Running"),
        ("ADDED", "late", "Running"),
        ("MODIFIED", "late", "Running"),
        ("DELETED", "early", "Running"),
        ("DELETED", "late", "Running"),
    ]


async def test_create_resets_status_and_the_status_subresource_sets_it(
    api: ApiServerEmulator, ac: client.ApiClient
) -> None:
    v1: Any = client.CoreV1Api(ac)
    body = {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "x:1"}]},
        "status": {"phase": "Running"},
    }
    created = await v1.create_namespaced_pod(NS, body)
    assert (created.status.phase, created.status.qos_class) == ("Pending", "BestEffort")
    assert created.spec.restart_policy == "Always"
    await v1.patch_namespaced_pod("p", NS, {"status": {"phase": "Failed"}})  # ignored
    assert api.pod(NS, "p")["status"]["phase"] == "Pending"
    status = {
        "status": {"phase": "Running", "podIP": "198.18.2.9", "podIPs": [{"ip": "198.18.2.9"}]}
    }
    await v1.patch_namespaced_pod_status("p", NS, status)
    found = await v1.list_namespaced_pod(NS, field_selector="status.podIP=198.18.2.9")
    assert [p.metadata.name for p in found.items] == ["p"]
    with pytest.raises(client.ApiException) as info:
        await v1.patch_namespaced_pod("p", NS, {"spec": {"nodeName": "n2"}})
    assert info.value.status == 422
    deleted = await v1.delete_namespaced_pod("p", NS)
    assert deleted.metadata.name == "p"  # pods answer a delete with the pod, not a Status


async def test_services_and_their_endpoint_slices(
    api: ApiServerEmulator, ac: client.ApiClient
) -> None:
    v1: Any = client.CoreV1Api(ac)
    discovery: Any = client.DiscoveryV1Api(ac)
    names = api.add_deployment(
        NS, "web", replicas=2, nodes=["n1", "n2"], pod_ips=["198.18.2.1", "198.18.2.2"]
    )
    api.add_deployment(NS, "db", replicas=1, pod_ips=["198.18.3.1"])
    svc = await v1.create_namespaced_service(
        NS,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 9000, "protocol": "UDP"}]},
        },
    )
    assert svc.spec.cluster_ip.startswith("198.19.")
    await v1.create_namespaced_service(
        NS,
        {
            "metadata": {"name": "db"},
            "spec": {"selector": {"app": "db"}, "ports": [{"port": 5432}]},
        },
    )
    slices = await discovery.list_namespaced_endpoint_slice(
        NS, label_selector="kubernetes.io/service-name=web"
    )
    (web,) = slices.items
    assert web.address_type == "IPv4"
    assert [(p.port, p.protocol) for p in web.ports] == [(9000, "UDP")]
    by_pod = {e.target_ref.name: e for e in web.endpoints}
    assert sorted(by_pod) == sorted(names)
    assert (by_pod[names[0]].addresses, by_pod[names[0]].node_name) == (["198.18.2.1"], "n1")
    assert by_pod[names[0]].conditions.ready is True
    listing = await discovery.list_endpoint_slice_for_all_namespaces()
    assert len(listing.items) == 2

    # A watch on the slices sees a pod turn unready.
    rv = slices.metadata.resource_version
    api.set_pod_ready(NS, names[1], False)
    w = watch.Watch()
    seen = []
    async with w.stream(
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector="kubernetes.io/service-name=web",
        resource_version=rv,
        timeout_seconds=10,
    ) as stream:
        async for event in stream:
            seen.append(event["type"])
            if event["type"] == "MODIFIED":
                ready = {
                    e["targetRef"]["name"]: e["conditions"]["ready"]
                    for e in event["raw_object"]["endpoints"]
                }
                assert ready == {names[0]: True, names[1]: False}
                w.stop()
    assert seen == ["MODIFIED"]


async def test_token_review(api: ApiServerEmulator, ac: client.ApiClient) -> None:
    auth: Any = client.AuthenticationV1Api(ac)
    sa = "system:serviceaccount:detnet-system:detnet"
    api.add_token("good", username=sa, audiences=[AUD])

    async def review(token: str, *audiences: str) -> Any:
        spec = client.V1TokenReviewSpec(token=token, audiences=list(audiences) or None)
        return await auth.create_token_review(client.V1TokenReview(spec=spec))

    ok = await review("good", AUD)
    assert ok.status.authenticated is True
    assert ok.status.audiences == [AUD]
    assert ok.status.user.username == sa
    assert ok.status.user.groups == [
        "system:serviceaccounts",
        "system:serviceaccounts:detnet-system",
        "system:authenticated",
    ]
    for token, audiences in (("unknown", (AUD,)), ("good", ("another",)), ("good", ())):
        refused = await review(token, *audiences)
        assert not refused.status.authenticated, (token, audiences)
        assert refused.status.error.startswith("invalid bearer token")
    # The raw shape: a real server leaves "authenticated" out when it is false.
    status, body = await raw(
        api,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {"spec": {"token": "unknown", "audiences": [AUD]}},
    )
    assert (status, body["kind"], body["status"]) == (
        201,
        "TokenReview",
        {"user": {}, "error": "invalid bearer token"},
    )
    assert (await raw(api, "GET", "/apis/authentication.k8s.io/v1/tokenreviews"))[0] == 405
    with pytest.raises(client.ApiException) as info:
        await review("")
    assert info.value.status in (400, 422)  # client-side validation may refuse it first


async def test_token_request_then_review(api: ApiServerEmulator, ac: client.ApiClient) -> None:
    v1: Any = client.CoreV1Api(ac)
    auth: Any = client.AuthenticationV1Api(ac)
    await v1.create_namespaced_service_account(NS, {"metadata": {"name": "agent"}})
    api.add_pod(NS, "agent-x", node_name="n1")
    body = {
        "spec": {
            "audiences": [AUD],
            "expirationSeconds": 600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "agent-x"},
        }
    }
    issued = await v1.create_namespaced_service_account_token("agent", NS, body)
    token = issued.status.token
    assert token.count(".") == 2  # JWT-shaped, so clients can read its expiry
    spec = client.V1TokenReviewSpec(token=token, audiences=[AUD])
    ok = await auth.create_token_review(client.V1TokenReview(spec=spec))
    assert ok.status.user.username == f"system:serviceaccount:{NS}:agent"
    assert ok.status.user.extra["authentication.kubernetes.io/node-name"] == ["n1"]
    with pytest.raises(client.ApiException) as info:
        await v1.create_namespaced_service_account_token("ghost", NS, body)
    assert info.value.status == 404


async def test_delete_answers_and_cascades(api: ApiServerEmulator, ac: client.ApiClient) -> None:
    apps: Any = client.AppsV1Api(ac)
    api.add_deployment(NS, "web", replicas=2)
    answer = await apps.delete_namespaced_deployment("web", NS)
    assert (answer.kind, answer.status) == ("Status", "Success")
    assert api.pods(NS) == []  # ReplicaSet and pods went with it
    api.add_deployment(NS, "keep", replicas=1)
    await apps.delete_namespaced_deployment("keep", NS, body={"propagationPolicy": "Orphan"})
    assert len(api.objects("ReplicaSet", namespace=NS)) == 1
    v1: Any = client.CoreV1Api(ac)
    await v1.delete_collection_namespaced_pod(NS)
    assert api.pods(NS) == []


@requires_tool("kubectl", "kubectl")
async def test_kubectl_discovers_and_lists(api: ApiServerEmulator, tmp_path: Path) -> None:
    api.add_pod(NS, "on-n1", node_name="n1")
    api.add_pod(NS, "on-n2", node_name="n2")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(api.kubeconfig())

    async def kubectl(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, _ = await kubectl(
        "get", "pods", "-n", NS, "--field-selector", "spec.nodeName=n1", "-o", "name"
    )
    assert (rc, out.split()) == (0, ["pod/on-n1"])
    rc, out, _ = await kubectl("api-resources", "--api-group", "discovery.k8s.io", "-o", "name")
    assert (rc, out.split()) == (0, ["endpointslices.discovery.k8s.io"])
    rc, out, _ = await kubectl("get", "nodes", "-o", "name")
    assert (rc, out.split()) == (0, ["node/n1", "node/n2"])
    rc, _, err = await kubectl("get", "pods", "-n", NS, "--field-selector", "foo=bar")
    assert rc == 1
    assert "field label not supported: foo" in err
