"""The pods of this node, as the API server lists them: a sans-I/O reducer fed by a
``ListWatch`` of ``pods`` with ``fieldSelector=spec.nodeName=NODE``
(``kube/listwatch.py`` does the I/O).

A pod is kept from the moment it is bound to the node until it is deleted or reaches a
terminal phase (Succeeded, Failed: its containers are gone). Which cgroup names it: its
``metadata.uid``, except for a static pod, whose cgroup carries the hash kubelet gave
the manifest (the mirror pod's ``kubernetes.io/config.mirror`` annotation), not the
mirror pod's UID. ``hostNetwork`` pods share the node's network namespace: their
counters would be the node's, so they are not measurable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from detnet.controller.kube.objects import JsonObj, WatchEvent, metadata_of, resource_version

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
TERMINAL_PHASES = ("Succeeded", "Failed")
MAX_PODS = 5000  # kubelet's own ceiling is a few hundred pods per node


@dataclass(frozen=True)
class LocalPod:
    """One pod of this node, as much of it as the agent needs."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    host_network: bool = False
    cgroup_uid: str = ""  # what its cgroup path carries: uid, or a static pod's hash

    @property
    def measurable(self) -> bool:
        """False for hostNetwork pods: their interfaces are the node's."""
        return not self.host_network


def local_pod(obj: Mapping[str, Any], *, node: str) -> LocalPod | None:
    """The pod of an API object when it is a live pod of ``node``, else None."""
    meta = metadata_of(obj)
    spec, status = obj.get("spec"), obj.get("status")
    spec = spec if isinstance(spec, Mapping) else {}
    status = status if isinstance(status, Mapping) else {}
    uid, name, ns = meta.get("uid"), meta.get("name"), meta.get("namespace")
    if not (isinstance(uid, str) and uid and isinstance(name, str) and isinstance(ns, str)):
        return None
    if spec.get("nodeName") != node or status.get("phase") in TERMINAL_PHASES:
        return None
    raw_labels = meta.get("labels")
    labels = {
        k: v
        for k, v in (raw_labels.items() if isinstance(raw_labels, Mapping) else ())
        if isinstance(k, str) and isinstance(v, str)
    }
    annotations = meta.get("annotations")
    mirror = annotations.get(MIRROR_ANNOTATION) if isinstance(annotations, Mapping) else None
    cgroup_uid = mirror if isinstance(mirror, str) and mirror else uid
    return LocalPod(
        namespace=ns,
        name=name,
        uid=uid,
        labels=MappingProxyType(labels),
        host_network=spec.get("hostNetwork") is True,
        cgroup_uid=cgroup_uid.lower(),
    )


class NodePods:
    """The live pods of one node by UID; a ``WatchSink``. ``synced`` once a list has
    filled it (before that, no pods means "not known yet")."""

    def __init__(self, node: str, *, max_pods: int = MAX_PODS) -> None:
        self.node = node
        self.synced = False
        self.dropped = 0  # pods beyond max_pods, not tracked
        self._max = max_pods
        self._pods: dict[str, LocalPod] = {}
        self._versions: dict[str, int] = {}
        self.changes = 0  # bumps on every change: cheap "did anything move?" for callers

    @property
    def pods(self) -> Mapping[str, LocalPod]:
        """The pods by UID (a read-only view)."""
        return MappingProxyType(self._pods)

    def on_list(self, items: list[JsonObj]) -> None:
        """A (re-)list: exactly these pods now."""
        self._pods.clear()
        self._versions.clear()
        for obj in items:
            self._put(obj)
        self.synced = True
        self.changes += 1

    def on_event(self, event: WatchEvent) -> None:
        """One ADDED/MODIFIED/DELETED event."""
        uid = metadata_of(event.object).get("uid")
        if not isinstance(uid, str) or not uid:
            return
        if event.type == "DELETED":
            self._drop(uid)
        elif event.type in ("ADDED", "MODIFIED"):
            if resource_version(event.object) < self._versions.get(uid, 0):
                return  # an older copy than the one held
            self._put(event.object)
        self.changes += 1

    def on_watch_end(self) -> None:
        """Nothing to resync: the agent keeps no state beyond the pods."""

    def _put(self, obj: JsonObj) -> None:
        pod = local_pod(obj, node=self.node)
        uid = metadata_of(obj).get("uid")
        if pod is None:
            if isinstance(uid, str):
                self._drop(uid)  # finished, or moved off this node
            return
        if pod.uid not in self._pods and len(self._pods) >= self._max:
            self.dropped += 1
            return
        self._pods[pod.uid] = pod
        self._versions[pod.uid] = resource_version(obj)

    def _drop(self, uid: str) -> None:
        self._pods.pop(uid, None)
        self._versions.pop(uid, None)


def cgroup_keys(pods: Iterable[LocalPod]) -> dict[str, str]:
    """``{cgroup uid: pod uid}`` of the measurable pods."""
    return {p.cgroup_uid: p.uid for p in pods if p.measurable}
