"""The emulated cluster without HTTP: the helpers' objects, the EndpointSlice controller,
the garbage collector, and a watch with selectors checked against a reference model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.lab.kubeapi import ApiError
from detnet.lab.kubeapi.builders import endpoint
from detnet.lab.kubeapi.cluster import Cluster
from detnet.lab.kubeapi.resources import BY_KIND
from detnet.lab.kubeapi.selectors import Selection

NS = "ns"


def _slices(c: Cluster, service: str) -> list[dict[str, Any]]:
    return c.objects(
        "EndpointSlice", namespace=NS, label_selector=f"kubernetes.io/service-name={service}"
    )


def _endpoints(c: Cluster, service: str) -> dict[str, dict[str, Any]]:
    """Pod name -> endpoint, over every slice of ``service``."""
    return {ep["targetRef"]["name"]: ep for s in _slices(c, service) for ep in s["endpoints"] or []}


def test_deployment_chain_names_owners_and_placement() -> None:
    c = Cluster()
    c.add_node("n1", internal_ip="198.18.1.1")
    c.add_node("n2", internal_ip="198.18.1.2")
    names = c.add_deployment(
        NS,
        "web",
        replicas=3,
        nodes=["n1", "n2"],
        pod_ips=["198.18.2.1", "198.18.2.2", "198.18.2.3"],
    )
    dep = c.get("Deployment", "web", namespace=NS)
    (rs,) = c.objects("ReplicaSet", namespace=NS)
    pod_hash = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"web-{pod_hash}"
    assert rs["metadata"]["ownerReferences"][0]["uid"] == dep["metadata"]["uid"]
    assert rs["status"]["replicas"] == 3
    pods = [c.pod(NS, n) for n in names]
    for i, pod in enumerate(pods):
        assert pod["metadata"]["name"].startswith(f"web-{pod_hash}-")
        assert pod["metadata"]["labels"] == {"app": "web", "pod-template-hash": pod_hash}
        assert pod["metadata"]["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
        assert pod["spec"]["nodeName"] == ["n1", "n2"][i % 2]
        assert pod["status"]["podIP"] == f"198.18.2.{i + 1}"
        assert pod["status"]["hostIP"] == ["198.18.1.1", "198.18.1.2"][i % 2]
    on_n1 = c.objects("Pod", field_selector="spec.nodeName=n1")
    assert sorted(p["metadata"]["name"] for p in on_n1) == sorted([names[0], names[2]])
    with pytest.raises(ValueError, match="2 addresses for 3 replicas"):
        c.add_deployment(NS, "db", replicas=3, pod_ips=["198.18.3.1", "198.18.3.2"])


def test_statefulset_pods_are_numbered() -> None:
    c = Cluster()
    names = c.add_deployment(NS, "db", replicas=2, kind="StatefulSet")
    assert names == ["db-0", "db-1"]
    assert c.pod(NS, "db-1")["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] == "db-1"


def test_pod_phase_and_readiness() -> None:
    c = Cluster()
    pod = c.add_pod(
        NS, "p", phase="Pending", node_name="n1", uid="11111111-2222-3333-4444-555555555555"
    )
    assert pod["metadata"]["uid"] == "11111111-2222-3333-4444-555555555555"
    assert pod["status"]["phase"] == "Pending"
    running = c.set_pod_phase(NS, "p", "Running")
    ready = {x["type"]: x["status"] for x in running["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert running["status"]["containerStatuses"][0]["state"].keys() == {"running"}
    unready = c.set_pod_ready(NS, "p", False)
    assert {x["type"]: x["status"] for x in unready["status"]["conditions"]}["Ready"] == "False"
    assert (
        unready["status"]["containerStatuses"][0]["containerID"]
        == running["status"]["containerStatuses"][0]["containerID"]
    )
    with pytest.raises(KeyError):
        c.pod(NS, "ghost")


def test_endpoint_slices_follow_the_pods() -> None:
    c = Cluster()
    c.add_node("n1", labels={"topology.kubernetes.io/zone": "z1"})
    names = c.add_deployment(
        NS, "web", replicas=2, nodes=["n1"], pod_ips=["198.18.2.1", "198.18.2.2"]
    )
    c.add_pod(NS, "no-ip", labels={"app": "web"})  # not yet given an address: not listed
    svc = c.add_service(
        NS, "web", selector={"app": "web"}, ports=[{"name": "udp", "port": 9000, "protocol": "UDP"}]
    )
    (slice_,) = _slices(c, "web")
    assert (
        slice_["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
        == "endpointslice-controller.k8s.io"
    )
    assert slice_["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
    assert slice_["ports"] == [{"name": "udp", "port": 9000, "protocol": "UDP"}]
    eps = _endpoints(c, "web")
    assert sorted(eps) == sorted(names)
    assert eps[names[0]]["addresses"] == ["198.18.2.1"]
    assert (eps[names[0]]["nodeName"], eps[names[0]]["zone"]) == ("n1", "z1")
    assert eps[names[0]]["conditions"] == {"ready": True, "serving": True, "terminating": False}

    c.set_pod_ready(NS, names[0], False)
    assert _endpoints(c, "web")[names[0]]["conditions"]["ready"] is False
    c.delete_pod(NS, names[1])
    assert sorted(_endpoints(c, "web")) == [names[0]]
    c.set_pod_phase(NS, names[0], "Succeeded")  # terminal pods leave the slice
    (empty,) = _slices(c, "web")
    assert (empty["metadata"]["name"], empty["endpoints"]) == (slice_["metadata"]["name"], None)
    c.delete("Service", "web", namespace=NS)
    assert _slices(c, "web") == []


def test_named_target_ports_and_slice_size() -> None:
    c = Cluster()
    c.add_service(
        NS, "big", selector={"app": "big"}, ports=[{"name": "p", "port": 80, "targetPort": "http"}]
    )
    for i in range(101):
        port = 8080 if i < 100 else 9090
        c.add_pod(
            NS,
            f"big-{i}",
            labels={"app": "big"},
            pod_ip=f"198.18.4.{i + 1}",
            containers=[
                {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": port}]}
            ],
        )
    slices = _slices(c, "big")
    by_port = sorted((s["ports"][0]["port"], len(s["endpoints"])) for s in slices)
    assert by_port == [(8080, 100), (9090, 1)]  # one slice per port mapping, at most 100


def test_hand_made_slices_for_a_service_without_selector() -> None:
    c = Cluster()
    c.add_service(NS, "ext", ports=[53])
    pod = c.add_pod(NS, "p", pod_ip="198.18.5.1")
    c.add_endpoint_slice(
        NS,
        "ext",
        endpoints=[endpoint("198.18.5.1", node_name="n1", target=pod)],
        ports=[{"name": "", "port": 53, "protocol": "UDP"}],
    )
    (slice_,) = _slices(c, "ext")
    assert slice_["endpoints"][0]["targetRef"]["uid"] == pod["metadata"]["uid"]
    with pytest.raises(ApiError, match="addresses"):
        c.add_endpoint_slice(NS, "ext", endpoints=[{"addresses": []}])


def test_garbage_collection_and_orphans() -> None:
    c = Cluster()
    c.add_deployment(NS, "web", replicas=2)
    c.delete("Deployment", "web", namespace=NS)
    assert c.objects("ReplicaSet", namespace=NS) == []
    assert c.pods(NS) == []
    names = c.add_deployment(NS, "db", replicas=1)
    (rs,) = c.objects("ReplicaSet", namespace=NS)
    c.delete("ReplicaSet", rs["metadata"]["name"], namespace=NS, orphan=True)
    assert "ownerReferences" not in c.pod(NS, names[0])["metadata"]


def test_put_and_patch_any_kind() -> None:
    c = Cluster()
    cm = c.put(
        {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {"name": "c", "namespace": NS},
            "data": {"a": "1"},
        }
    )
    again = c.put({**cm, "data": {"a": "2"}})
    assert again["metadata"]["uid"] == cm["metadata"]["uid"]
    assert int(again["metadata"]["resourceVersion"]) > int(cm["metadata"]["resourceVersion"])
    node = c.add_node("n1")
    patched = c.patch("Node", "n1", {"spec": {"unschedulable": True}})
    assert patched["metadata"]["uid"] == node["metadata"]["uid"]
    assert [
        n["metadata"]["name"] for n in c.objects("Node", field_selector="spec.unschedulable=true")
    ] == ["n1"]
    with pytest.raises(ValueError, match="cluster-scoped"):
        c.get("Node", "n1", namespace=NS)
    with pytest.raises(ValueError, match="not emulated"):
        c.get("Widget", "w")


def test_issued_tokens_die_with_their_pod() -> None:
    c = Cluster(api_audiences=["https://kubernetes.default.svc"])
    c.put(
        {
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": {"name": "detnet", "namespace": NS},
        }
    )
    c.add_node("n1")
    c.add_pod(NS, "agent", node_name="n1")
    token = c.issue_token(NS, "detnet", audiences=["detnet-agent"], pod="agent")
    review = c.review_token({"spec": {"token": token, "audiences": ["detnet-agent"]}})
    user = review["status"]["user"]
    assert user["username"] == "system:serviceaccount:ns:detnet"
    assert user["groups"] == [
        "system:serviceaccounts",
        "system:serviceaccounts:ns",
        "system:authenticated",
    ]
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["agent"]
    assert user["extra"]["authentication.kubernetes.io/node-name"] == ["n1"]
    c.delete_pod(NS, "agent")
    assert (
        "authenticated"
        not in c.review_token({"spec": {"token": token, "audiences": ["detnet-agent"]}})["status"]
    )
    with pytest.raises(ApiError, match="less than 10 minutes"):
        c.issue_token(NS, "detnet", expiration_seconds=60)


# --- a watch with selectors against a reference model ------------------------------------

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "relabel", "phase", "delete"]),
        st.integers(min_value=0, max_value=3),
        st.sampled_from(["web", "db"]),
        st.sampled_from(["Running", "Pending", "Succeeded"]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_a_watch_with_selectors_keeps_a_cache_equal_to_a_fresh_list(
    ops: list[tuple[str, int, str, str]],
) -> None:
    """Folding what a selecting watch sees into a cache (ADDED/MODIFIED put, DELETED
    remove) always gives what a list with the same selectors returns: the guarantee an
    informer relies on, across objects moving into and out of the selection."""
    c = Cluster()
    start = c._store.rv
    pods = BY_KIND["Pod"]
    selection = Selection.parse(pods, labels="app=web", fields="status.phase=Running")
    for op, i, app, phase in ops:
        name = f"p{i}"
        exists = c.find("Pod", name, namespace=NS) is not None
        if op == "add" and not exists:
            c.add_pod(NS, name, labels={"app": app}, phase=phase)
        elif op == "relabel" and exists:
            c.patch("Pod", name, {"metadata": {"labels": {"app": app}}}, namespace=NS)
        elif op == "phase" and exists:
            c.set_pod_phase(NS, name, phase)
        elif op == "delete" and exists:
            c.delete_pod(NS, name)
    cache: dict[str, dict[str, Any]] = {}
    for ev in c._store.events_since(start):
        if ev.key[0] != pods.key:
            continue
        seen = ev.seen_by(selection.predicate(pods))
        if seen is None:
            continue
        type_, obj = seen
        if type_ == "DELETED":
            assert obj["metadata"]["name"] in cache
            del cache[obj["metadata"]["name"]]
        else:
            assert (type_ == "ADDED") == (obj["metadata"]["name"] not in cache)
            cache[obj["metadata"]["name"]] = obj
    listed = c.objects(
        "Pod", namespace=NS, label_selector="app=web", field_selector="status.phase=Running"
    )
    assert cache == {p["metadata"]["name"]: p for p in listed}
