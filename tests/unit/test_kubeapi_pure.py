"""The pure parts of the API server emulation, without sockets: label and field
selectors, object validation and the three patch formats."""

from __future__ import annotations

from typing import Any

import pytest

from detnet.lab.kubeapi import (
    ApiError,
    json_patch,
    merge_patch,
    selector_matches,
    strategic_merge_patch,
)
from detnet.lab.kubeapi.resources import BY_KIND
from detnet.lab.kubeapi.selectors import FieldSelector
from detnet.lab.kubeapi.validation import check_types, validate_object

POD = {
    "metadata": {"name": "web-1", "namespace": "ns"},
    "spec": {"nodeName": "n1", "restartPolicy": "Always"},
    "status": {"phase": "Running", "podIPs": [{"ip": "198.18.2.1"}]},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", True),
        ("app==web,tier=be", True),
        ("app!=web", False),
        ("app in (web, db)", True),
        ("app notin (web)", False),
        ("tier", True),
        ("!tier", False),
        ("!missing,app in (x,web)", True),
        ("", True),
        ("n>2", True),
        ("n<2", False),
        ("missing>0", False),
        ("app notin (db),tier", True),
    ],
)
def test_selector_matches(selector: str, expected: bool) -> None:
    assert selector_matches(selector, {"app": "web", "tier": "be", "n": "3"}) is expected


@pytest.mark.parametrize(
    "selector",
    ["app in web", "app in ()", "-bad-=x", "app=not a value", "a,,b", "n>x", "app in (a"],
)
def test_bad_label_selector_is_400(selector: str) -> None:
    with pytest.raises(ApiError) as info:
        selector_matches(selector, {})
    assert info.value.code == 400


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("spec.nodeName=n1", True),
        ("spec.nodeName==n1,status.phase=Running", True),
        ("spec.nodeName!=n1", False),
        ("spec.host=n1", True),  # the v1 client's old name for spec.nodeName
        ("status.podIP=198.18.2.1", True),  # read from podIPs[0]
        ("spec.hostNetwork=false", True),  # unset reads as false
        ("metadata.namespace=ns,metadata.name=web-1", True),
        ("spec.schedulerName=", True),  # unset reads as ""
        ("status.podIPs=198.18.2.1", False),  # selectable, but never set (as upstream)
        ("spec.nodeName=n1,", True),  # an empty term is ignored
        ("", True),
    ],
)
def test_pod_field_selectors(selector: str, expected: bool) -> None:
    pods = BY_KIND["Pod"]
    assert FieldSelector.parse(selector, pods).matches(pods, POD) is expected


def test_field_selector_escapes() -> None:
    cm = BY_KIND["ConfigMap"]
    obj = {"metadata": {"name": "a,b=c\\", "namespace": "ns"}}
    assert FieldSelector.parse(r"metadata.name=a\,b\=c\\", cm).matches(cm, obj)
    with pytest.raises(ApiError, match="escape"):
        FieldSelector.parse(r"metadata.name=a\x", cm)
    with pytest.raises(ApiError, match="can't understand"):
        FieldSelector.parse("metadata.name", cm)


@pytest.mark.parametrize(
    ("kind", "field", "message"),
    [
        ("Pod", "spec.containers", "field label not supported: spec.containers"),
        ("Node", "metadata.namespace", "field label not supported: metadata.namespace"),
        ("Service", "spec.ports", "field label not supported: spec.ports"),
        (
            "EndpointSlice",
            "addressType",
            '"addressType" is not a known field selector: only "metadata.name", '
            '"metadata.namespace"',
        ),
    ],
)
def test_unsupported_field_is_400_with_the_real_wording(
    kind: str, field: str, message: str
) -> None:
    with pytest.raises(ApiError) as info:
        FieldSelector.parse(f"{field}=x", BY_KIND[kind])
    assert (info.value.code, info.value.message) == (400, message)


def test_other_resources_field_values() -> None:
    node, rs, svc, ev = BY_KIND["Node"], BY_KIND["ReplicaSet"], BY_KIND["Service"], BY_KIND["Event"]
    assert FieldSelector.parse("spec.unschedulable=false", node).matches(node, {"metadata": {}})
    assert FieldSelector.parse("status.replicas=0", rs).matches(rs, {"metadata": {}})
    assert FieldSelector.parse("spec.type=ClusterIP", svc).matches(svc, {"metadata": {}})
    event = {"metadata": {}, "source": {"component": "detnet"}, "involvedObject": {"kind": "Pod"}}
    assert FieldSelector.parse("source=detnet,involvedObject.kind=Pod", ev).matches(ev, event)


@pytest.mark.parametrize(
    ("kind", "meta", "fragment"),
    [
        ("Pod", {"name": "Web"}, "RFC 1123 subdomain"),
        ("Service", {"name": "1web"}, "DNS-1035 label"),
        ("Pod", {"name": "p", "labels": {"app": "a b"}}, "a valid label"),
        ("Pod", {"name": "p", "labels": {"-x": "a"}}, "name part"),
        ("Pod", {"name": "p", "annotations": {"a/b/c": "x"}}, "prefix part"),
        ("Pod", {}, "name or generateName is required"),
    ],
)
def test_validation_refuses_what_the_real_server_refuses(
    kind: str, meta: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ApiError) as info:
        validate_object({"metadata": meta}, kind=kind)
    assert info.value.code == 422
    assert fragment in info.value.message


def test_validation_accepts_real_names() -> None:
    labels = {"kubernetes.io/service-name": "web", "pod-template-hash": "745856767f", "e": ""}
    validate_object({"metadata": {"name": "web.x-1", "labels": labels}}, kind="Pod")
    validate_object({"metadata": {"name": "web"}}, kind="Service")


def test_non_string_labels_are_a_decode_error() -> None:
    with pytest.raises(ApiError) as info:
        check_types({"metadata": {"annotations": {"a": 80}}})
    assert info.value.code == 400
    with pytest.raises(ApiError) as info:
        check_types({"metadata": {"labels": {"a": None}}}, code=422)
    assert info.value.code == 422


def test_merge_patch_rfc7386() -> None:
    doc = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [3]}) == {
        "a": {"c": 2, "d": 3},
        "l": [3],
    }


def test_strategic_merge_patch_merges_containers_by_name() -> None:
    doc = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}}
    patch = {"spec": {"containers": [{"name": "b", "image": "2"}, {"name": "c", "image": "3"}]}}
    out = strategic_merge_patch(doc, patch)
    assert out["spec"]["containers"] == [
        {"name": "a", "image": "1"},
        {"name": "b", "image": "2"},
        {"name": "c", "image": "3"},
    ]
    assert strategic_merge_patch({"m": {"x": 1}}, {"m": {"x": None}}) == {"m": {}}


def test_json_patch() -> None:
    doc = {"metadata": {"annotations": {"a": "1"}}}
    ops = [
        {"op": "add", "path": "/metadata/annotations/b~1c", "value": "2"},
        {"op": "remove", "path": "/metadata/annotations/a"},
    ]
    assert json_patch(doc, ops) == {"metadata": {"annotations": {"b/c": "2"}}}
