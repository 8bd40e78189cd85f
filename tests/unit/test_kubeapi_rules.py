"""The API server emulation's rules, without sockets: what a watch with a selector sees of
each change, what the registry does to objects on the way in, TokenReview answers, and
the discovery documents."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from detnet.lab.kubeapi import ApiError
from detnet.lab.kubeapi.auth import BoundObject, Identity, Tokens
from detnet.lab.kubeapi.discovery import document
from detnet.lab.kubeapi.resources import BY_KIND, parse_path
from detnet.lab.kubeapi.store import WatchEvent
from detnet.lab.kubeapi.strategy import (
    allocate_cluster_ip,
    apply_defaults,
    pod_qos,
    prepare_create,
    prepare_update,
)

PODS = BY_KIND["Pod"]


def _obj(rv: int, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "p", "resourceVersion": str(rv), "labels": labels}}


def _web(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"]["labels"].get("app") == "web")


@pytest.mark.parametrize(
    ("type_", "prev", "now", "seen"),
    [
        ("ADDED", None, {"app": "web"}, "ADDED"),
        ("ADDED", None, {"app": "db"}, None),
        ("MODIFIED", {"app": "web"}, {"app": "web"}, "MODIFIED"),
        ("MODIFIED", {"app": "db"}, {"app": "web"}, "ADDED"),  # moved into the selection
        ("MODIFIED", {"app": "web"}, {"app": "db"}, "DELETED"),  # moved out of it
        ("MODIFIED", {"app": "db"}, {"app": "db"}, None),
        ("DELETED", {"app": "web"}, {"app": "web"}, "DELETED"),
        ("DELETED", {"app": "db"}, {"app": "db"}, None),
    ],
)
def test_what_a_selecting_watch_sees(
    type_: str, prev: dict[str, str] | None, now: dict[str, str], seen: str | None
) -> None:
    ev = WatchEvent(
        7, type_, (PODS.key, "ns", "p"), _obj(7, **now), _obj(6, **prev) if prev else None
    )
    got = ev.seen_by(_web)
    assert (got[0] if got else None) == seen
    if got and seen == "DELETED":
        # As the real watch cache: the object as it was, at the event's resourceVersion.
        assert got[1]["metadata"]["labels"] == (prev or now)
        assert got[1]["metadata"]["resourceVersion"] == "7"


def test_paths_cluster_scoped_and_namespaced() -> None:
    assert parse_path("/api/v1/nodes/n1").res.kind == "Node"
    route = parse_path("/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices")
    assert (route.res.kind, route.namespace, route.name) == ("EndpointSlice", "ns", "")
    assert parse_path("/api/v1/pods").namespace is None  # every namespace
    assert parse_path("/api/v1/namespaces/ns/pods/p/status").subresource == "status"
    for bad in (
        "/api/v1/namespaces/ns/nodes",  # a Node has no namespace
        "/api/v1/pods/p",  # a pod's name needs its namespace
        "/api/v1/namespaces/ns/configmaps/c/status",  # no such subresource
        "/apis/apps/v1/namespaces/ns/widgets",
        "/api/v1/namespaces//pods",
    ):
        with pytest.raises(ApiError) as info:
            parse_path(bad)
        assert info.value.code == 404, bad


def test_create_resets_what_a_client_may_not_set() -> None:
    body = {
        "metadata": {"name": "p", "uid": "mine", "resourceVersion": "9"},
        "spec": {
            "containers": [{"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]
        },
        "status": {"phase": "Running", "podIP": "198.18.0.9"},
    }
    pod = prepare_create(PODS, body, namespace="ns")
    assert pod["status"] == {"phase": "Pending", "qosClass": "Guaranteed"}
    assert "uid" not in pod["metadata"]
    assert "resourceVersion" not in pod["metadata"]
    node = prepare_create(
        BY_KIND["Node"], {"metadata": {"name": "n"}, "status": {"x": 1}}, namespace=""
    )
    assert node["status"] == {"x": 1}  # a kubelet registers its Node with its status
    with pytest.raises(ApiError) as info:
        prepare_create(PODS, {"metadata": {"name": "p", "namespace": "other"}}, namespace="ns")
    assert info.value.code == 400


def test_qos_classes() -> None:
    assert pod_qos({"containers": [{"name": "a"}]}) == "BestEffort"
    assert (
        pod_qos({"containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}]})
        == "Burstable"
    )


def _stored_pod() -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "uid": "u1", "resourceVersion": "5", "labels": {"a": "1"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "i:1"}]},
        "status": {"phase": "Running"},
    }


def test_main_resource_writes_keep_the_status_and_status_writes_keep_the_rest() -> None:
    old = _stored_pod()
    new = copy.deepcopy(old)
    new["status"]["phase"] = "Failed"
    new["metadata"]["labels"] = {"a": "2"}
    new["spec"]["containers"][0]["image"] = "i:2"  # one of the few mutable pod fields
    main = prepare_update(PODS, copy.deepcopy(new), old, subresource="")
    assert (main["status"], main["metadata"]["labels"]) == ({"phase": "Running"}, {"a": "2"})
    status = prepare_update(PODS, new, old, subresource="status")
    assert (status["status"], status["metadata"]["labels"]) == ({"phase": "Failed"}, {"a": "1"})
    assert status["spec"] == old["spec"]


def test_pod_spec_is_immutable_but_for_images() -> None:
    old = _stored_pod()
    new = copy.deepcopy(old)
    new["spec"]["nodeName"] = "n2"
    with pytest.raises(ApiError, match="pod updates may not change fields") as info:
        prepare_update(PODS, new, old, subresource="")
    assert info.value.code == 422
    new["metadata"]["uid"] = "u2"
    with pytest.raises(ApiError, match="Precondition failed: UID"):
        prepare_update(PODS, new, old, subresource="")


def test_service_defaults_and_cluster_ip() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    apply_defaults(
        BY_KIND["Service"], svc, service_cidr="198.19.240.0/29", used_ips=["198.19.240.2"]
    )
    spec = svc["spec"]
    assert spec["clusterIP"] == "198.19.240.3"  # .1 is the kubernetes Service's, .2 is taken
    assert spec["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert (spec["type"], spec["clusterIPs"], spec["ipFamilies"]) == (
        "ClusterIP",
        ["198.19.240.3"],
        ["IPv4"],
    )
    with pytest.raises(ApiError, match=r"range 198\.19\.240\.0/30 is full") as info:
        allocate_cluster_ip("198.19.240.0/30", ["198.19.240.2"])
    assert info.value.code == 500
    changed = copy.deepcopy(svc)
    changed["spec"]["clusterIP"] = "198.19.240.4"
    with pytest.raises(ApiError, match="immutable"):
        prepare_update(BY_KIND["Service"], changed, svc, subresource="")
    omitted = copy.deepcopy(svc)
    del omitted["spec"]["clusterIP"], omitted["spec"]["clusterIPs"]
    kept = prepare_update(BY_KIND["Service"], omitted, svc, subresource="")
    assert kept["spec"]["clusterIP"] == "198.19.240.3"  # an update that leaves it out keeps it


# --- TokenReview ------------------------------------------------------------------------

AUD = "detnet-agent"


def _review(
    tokens: Tokens, token: str, *audiences: str, alive: bool = True, now: float = 0.0
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    if audiences:
        body["spec"]["audiences"] = list(audiences)
    return tokens.review(
        body, api_audiences=["https://kubernetes.default.svc"], now=now, alive=lambda b: alive
    )


def test_token_review_answers() -> None:
    tokens = Tokens()
    sa = "system:serviceaccount:detnet-system:detnet"
    tokens.add(
        "t1", Identity(username=sa, uid="u-sa", groups=("g1", "g2"), audiences=(AUD, "other"))
    )
    ok = _review(tokens, "t1", "x", AUD)
    assert ok["status"] == {
        "authenticated": True,
        "user": {"username": sa, "uid": "u-sa", "groups": ["g1", "g2"]},
        "audiences": [AUD],  # the intersection, in the order asked
    }
    assert (ok["kind"], ok["apiVersion"], ok["spec"]["token"]) == (
        "TokenReview",
        "authentication.k8s.io/v1",
        "t1",
    )
    unknown = _review(tokens, "nope", AUD)
    # As the real server: "authenticated" is left out (false, omitempty), user is {}.
    assert unknown["status"] == {"user": {}, "error": "invalid bearer token"}
    wrong = _review(tokens, "t1", "someone-else")
    assert "authenticated" not in wrong["status"]
    assert wrong["status"]["error"] == (
        'invalid bearer token, token audiences ["detnet-agent" "other"] is invalid for the '
        'target audiences ["someone-else"]'
    )
    # No audiences asked: the API server's own, which this token is not for.
    assert "authenticated" not in _review(tokens, "t1")["status"]
    tokens.revoke("t1")
    assert "authenticated" not in _review(tokens, "t1", AUD)["status"]


def test_token_review_expiry_and_bound_objects() -> None:
    tokens = Tokens()
    bound = (BoundObject("Pod", "ns", "p", "u"),)
    tokens.add("t", Identity(username="u", audiences=(AUD,), expires_at=100.0, bound=bound))
    assert _review(tokens, "t", AUD, now=99.0)["status"]["authenticated"] is True
    assert "expired" in _review(tokens, "t", AUD, now=100.0)["status"]["error"]
    assert "invalidated" in _review(tokens, "t", AUD, now=1.0, alive=False)["status"]["error"]
    with pytest.raises(ApiError, match="token is required") as info:
        _review(tokens, "", AUD)
    assert info.value.code == 400


# --- discovery --------------------------------------------------------------------------


def test_discovery_documents() -> None:
    api = document("/api", server_address="127.0.0.1:1")
    assert api is not None
    assert api["kind"] == "APIVersions"
    assert api["versions"] == ["v1"]
    groups = document("/apis", server_address="")
    assert groups is not None
    names = [g["name"] for g in groups["groups"]]
    assert names == sorted(names)
    assert "discovery.k8s.io" in names
    assert "authentication.k8s.io" in names
    core = document("/api/v1", server_address="")
    assert core is not None
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["nodes"]["namespaced"] is False
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert by_name["serviceaccounts/token"]["kind"] == "TokenRequest"
    auth = document("/apis/authentication.k8s.io/v1", server_address="")
    assert auth is not None
    assert auth["resources"][0]["verbs"] == ["create"]
    assert document("/apis/nope/v1", server_address="") is None
    assert document("/api/v1/pods", server_address="") is None
