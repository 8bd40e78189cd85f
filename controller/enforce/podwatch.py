"""The Kubernetes enforcer's view of one workload's pods, sans-I/O: a cache fed by a
list+watch (``kube/listwatch.py``) and patch responses, and which pods need a patch to
carry a limit. No API calls and no clock here; the enforcer does the I/O.

Every method that can change what a pod needs returns the names of the pods to patch:
the Running (not terminating) pods whose ``kubernetes.io/egress-bandwidth`` differs from
the limit, judged on the newest copy of each pod the cache holds (a stale event does not
bring back an annotation a newer patch response already showed). A limit is one value
for every pod, or a function of the pod (per-node limits: the value of its node).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from detnet.controller.kube.objects import (
    JsonObj,
    WatchEvent,
    annotations_of,
    metadata_of,
    name_of,
    resource_version,
)

EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
# The annotation value a pod should carry: one for all, or per pod; None: no limit.
Limit = str | None | Callable[[Mapping[str, Any]], str | None]


def value_for(limit: Limit, pod: Mapping[str, Any]) -> str | None:
    """The value ``pod`` should carry under ``limit``."""
    return limit(pod) if callable(limit) else limit


def node_of(pod: Mapping[str, Any]) -> str | None:
    """The node a pod is scheduled on (``spec.nodeName``), None before scheduling."""
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, Mapping) else None
    return node if isinstance(node, str) and node else None


def scheduled(pod: Mapping[str, Any]) -> bool:
    """On a node, not finished and not being deleted: a pod that sends or will."""
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return (
        node_of(pod) is not None
        and phase in ("Pending", "Running")
        and not metadata_of(pod).get("deletionTimestamp")
    )


def running(pod: Mapping[str, Any]) -> bool:
    """Running and not being deleted: a pod Cilium shapes and a patch can reach."""
    status = pod.get("status")
    phase = status.get("phase") if isinstance(status, Mapping) else None
    return phase == "Running" and not metadata_of(pod).get("deletionTimestamp")


def needs_limit(pod: Mapping[str, Any], limit: Limit) -> bool:
    """True when ``pod`` is running and does not carry its value under ``limit``
    (None: there is no limit yet, so nothing needs one)."""
    if not running(pod):
        return False
    value = value_for(limit, pod)
    return value is not None and annotations_of(pod).get(EGRESS_ANNOTATION) != value


@dataclass
class PodCache:
    """The pods of one workload as last seen, by name. ``synced`` once a list filled it
    (before that, an empty cache means "not known", not "no pods")."""

    pods: dict[str, JsonObj] = field(default_factory=dict)
    synced: bool = False

    def replace(self, items: Iterable[JsonObj]) -> None:
        """A list result: the cache becomes exactly its (named) items."""
        self.pods = {name: pod for pod in items if (name := name_of(pod))}
        self.synced = True

    def put(self, pod: JsonObj) -> bool:
        """Store ``pod`` unless the cache holds a newer copy (by resourceVersion; equal
        versions: the later copy wins). Returns whether it was stored."""
        name = name_of(pod)
        if not name:
            return False
        old = self.pods.get(name)
        if old is not None and resource_version(pod) < resource_version(old):
            return False
        self.pods[name] = pod
        return True

    def discard(self, name: str) -> None:
        """Forget a pod (deleted; a patch got 404)."""
        self.pods.pop(name, None)

    def apply_event(self, event: WatchEvent, *, limit_value: Limit) -> list[str]:
        """Fold one watch event in; the pods to patch to ``limit_value`` (None: none).

        BOOKMARK and ERROR change no pod (the list+watch loop reads their
        resourceVersion and status); neither does an event for an unnamed object."""
        name = name_of(event.object)
        if not name or event.type not in ("ADDED", "MODIFIED", "DELETED"):
            return []
        if event.type == "DELETED":
            self.discard(name)
            return []
        self.put(event.object)
        return [name] if needs_limit(self.pods[name], limit_value) else []

    def reconcile(self, value: Limit) -> list[str]:
        """Every cached pod to patch to its ``value`` (None: none), in cache order."""
        return [name for name, pod in self.pods.items() if needs_limit(pod, value)]

    def carrying(self, value: Limit) -> int:
        """How many running pods carry exactly their ``value`` (None: no annotation)."""
        return sum(
            1
            for pod in self.pods.values()
            if running(pod) and annotations_of(pod).get(EGRESS_ANNOTATION) == value_for(value, pod)
        )
