"""The pods of this node (controller/agent/pods.py): what a list and watch events leave
in the cache, static pods by their mirror hash, hostNetwork not measurable."""

from __future__ import annotations

from typing import Any

from detnet.controller.agent.pods import MIRROR_ANNOTATION, NodePods, cgroup_keys, local_pod
from detnet.controller.kube.objects import WatchEvent

UID_A = "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad"
UID_B = "fd698699-eabf-4c23-92ef-cf0bbdb78261"


def pod(
    name: str,
    uid: str,
    *,
    node: str = "node-a",
    phase: str = "Running",
    rv: int = 1,
    host_network: bool = False,
    **meta: Any,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "be",
            "uid": uid,
            "resourceVersion": str(rv),
            **meta,
        },
        "spec": {"nodeName": node, **({"hostNetwork": True} if host_network else {})},
        "status": {"phase": phase},
    }


def test_a_list_then_events() -> None:
    pods = NodePods("node-a")
    assert not pods.synced
    pods.on_list([pod("a", UID_A, labels={"app": "web"}), pod("b", UID_B, node="node-b")])
    assert pods.synced
    assert list(pods.pods) == [UID_A]  # node-b's pod is not ours
    assert dict(pods.pods[UID_A].labels) == {"app": "web"}
    pods.on_event(WatchEvent("ADDED", pod("b", UID_B, rv=2)))
    assert set(pods.pods) == {UID_A, UID_B}
    pods.on_event(WatchEvent("DELETED", pod("a", UID_A, rv=3)))
    assert set(pods.pods) == {UID_B}
    pods.on_event(WatchEvent("MODIFIED", pod("b", UID_B, rv=4, phase="Succeeded")))
    assert not pods.pods  # finished: its containers are gone


def test_an_older_copy_does_not_replace_a_newer_one() -> None:
    pods = NodePods("node-a")
    pods.on_list([pod("a", UID_A, rv=5, labels={"v": "2"})])
    pods.on_event(WatchEvent("MODIFIED", pod("a", UID_A, rv=4, labels={"v": "1"})))
    assert pods.pods[UID_A].labels["v"] == "2"


def test_a_relist_replaces_everything() -> None:
    pods = NodePods("node-a")
    pods.on_list([pod("a", UID_A)])
    changes = pods.changes
    pods.on_list([pod("b", UID_B)])
    assert set(pods.pods) == {UID_B}
    assert pods.changes > changes


def test_static_pods_are_found_by_their_mirror_hash() -> None:
    mirror = "5F0E1A9B3C4D4E8F9A0B1C2D3E4F5A6B"
    p = local_pod(pod("etcd", UID_A, annotations={MIRROR_ANNOTATION: mirror}), node="node-a")
    assert p is not None
    assert p.uid == UID_A
    assert p.cgroup_uid == mirror.lower()


def test_host_network_pods_are_kept_but_not_measurable() -> None:
    pods = NodePods("node-a")
    pods.on_list([pod("a", UID_A), pod("h", UID_B, host_network=True)])
    assert not pods.pods[UID_B].measurable
    assert cgroup_keys(pods.pods.values()) == {UID_A: UID_A}


def test_objects_that_are_not_pods_of_the_node_are_ignored() -> None:
    pods = NodePods("node-a")
    broken: list[dict[str, Any]] = [
        {},
        {"metadata": "x"},
        {"metadata": {"name": "n", "namespace": "be"}},  # no uid
        {"metadata": {"name": "n", "namespace": "be", "uid": UID_A}},  # no node
        {"metadata": {"uid": UID_A, "name": 3, "namespace": "be"}, "spec": {"nodeName": "node-a"}},
    ]
    pods.on_list(broken)
    assert not pods.pods
    pods.on_event(WatchEvent("ADDED", {"metadata": {"uid": 7}}))
    assert not pods.pods


def test_odd_labels_are_dropped_not_fatal() -> None:
    p = local_pod(pod("a", UID_A, labels={"ok": "1", "bad": 2}), node="node-a")
    assert p is not None
    assert dict(p.labels) == {"ok": "1"}


def test_the_number_of_pods_is_bounded() -> None:
    pods = NodePods("node-a", max_pods=2)
    pods.on_list([pod(f"p{i}", f"{i:08d}-0000-0000-0000-000000000000") for i in range(3)])
    assert len(pods.pods) == 2
    assert pods.dropped == 1
