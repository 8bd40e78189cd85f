"""The two controllers of a real control plane the emulation runs, because what clients
watch depends on them: the EndpointSlice controller (a Service with a selector gets
slices listing its pods' addresses, readiness and nodes, kept in step with every pod
change) and the garbage collector (deleting an owner deletes what its
``ownerReferences`` point to: Deployment -> ReplicaSet -> pods, Service -> slices).

Both observe the store and act synchronously on each change, so a watcher sees the pod
event and then the slice event it causes, in resourceVersion order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from detnet.lab.kubeapi import builders
from detnet.lab.kubeapi.patch import clone
from detnet.lab.kubeapi.resources import BY_KIND, Resource
from detnet.lab.kubeapi.store import JsonObj, Key, Store, WatchEvent

_PODS, _SERVICES, _NODES = BY_KIND["Pod"], BY_KIND["Service"], BY_KIND["Node"]
_SLICES = BY_KIND["EndpointSlice"]
MAX_ENDPOINTS_PER_SLICE = 100  # the real controller's default (--max-endpoints-per-slice)
ZONE_LABEL = "topology.kubernetes.io/zone"

_Ports = tuple[tuple[str, int, str], ...]  # (name, port, protocol) of a slice


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _pod_ip(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    ips = status.get("podIPs") or []
    return str(ips[0].get("ip", "")) if ips else str(status.get("podIP") or "")


def _resolve_ports(service: Mapping[str, Any], pod: Mapping[str, Any]) -> _Ports:
    """The service's ports as this pod serves them; a named targetPort the pod does not
    declare leaves that port out, as the real controller does."""
    declared = {
        p.get("name"): p.get("containerPort")
        for c in (pod.get("spec") or {}).get("containers") or []
        for p in c.get("ports") or []
        if p.get("name")
    }
    out = []
    for port in (service.get("spec") or {}).get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        number = declared.get(target) if isinstance(target, str) else target
        if isinstance(number, int):
            out.append((str(port.get("name") or ""), number, str(port.get("protocol") or "TCP")))
    return tuple(out)


def _slice_ports(obj: Mapping[str, Any]) -> _Ports:
    return tuple(
        (str(p.get("name") or ""), int(p["port"]), str(p.get("protocol") or "TCP"))
        for p in obj.get("ports") or []
    )


class EndpointSliceController:
    """Keeps the slices of every Service with a selector in step with its pods."""

    def __init__(self, store: Store) -> None:
        self._store = store
        store.observers.append(self.observe)

    def observe(self, ev: WatchEvent) -> None:
        """Reconcile the Services a change can affect."""
        kind_key, ns, name = ev.key
        if kind_key == _SERVICES.key:
            self.reconcile(ns, name)
        elif kind_key == _PODS.key:
            for svc in self._store.select(_SERVICES, ns):
                self.reconcile(ns, svc["metadata"]["name"])
        elif kind_key == _NODES.key:  # a node's zone shows in its endpoints
            for svc in self._store.select(_SERVICES, None):
                self.reconcile(svc["metadata"]["namespace"], svc["metadata"]["name"])

    def _endpoint(self, service: Mapping[str, Any], pod: JsonObj) -> JsonObj:
        publish = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
        terminating = bool(pod["metadata"].get("deletionTimestamp"))
        serving = _ready(pod) or publish
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        node = self._store.find(_NODES, "", node_name) if node_name else None
        zone = ((node or {}).get("metadata", {}).get("labels") or {}).get(ZONE_LABEL, "")
        ep = builders.endpoint(
            _pod_ip(pod),
            ready=serving and not terminating,
            serving=serving,
            terminating=terminating,
            node_name=node_name,
            zone=zone,
            target=pod,
        )
        spec = pod.get("spec") or {}
        if spec.get("hostname") and spec.get("subdomain") == service["metadata"]["name"]:
            ep["hostname"] = spec["hostname"]
        return ep

    def _desired(self, service: JsonObj) -> list[tuple[_Ports, list[JsonObj]]]:
        selector = service["spec"]["selector"]
        ns = service["metadata"]["namespace"]
        groups: dict[_Ports, list[JsonObj]] = defaultdict(list)
        for pod in self._store.select(_PODS, ns):
            labels = pod["metadata"].get("labels") or {}
            if any(labels.get(k) != v for k, v in selector.items()):
                continue
            if not _pod_ip(pod) or (pod.get("status") or {}).get("phase") in (
                "Succeeded",
                "Failed",
            ):
                continue
            groups[_resolve_ports(service, pod)].append(self._endpoint(service, pod))
        desired = [
            (ports, eps[i : i + MAX_ENDPOINTS_PER_SLICE])
            for ports, eps in sorted(groups.items())
            for i in range(0, len(eps), MAX_ENDPOINTS_PER_SLICE)
        ]
        return desired or [((), [])]  # a placeholder slice says "no endpoints", not "unknown"

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring the controller's slices of Service ``namespace/name`` in line with it."""
        service = self._store.find(_SERVICES, namespace, name)
        mine = [
            s
            for s in self._store.select(_SLICES, namespace)
            if (s["metadata"].get("labels") or {}).get(builders.SERVICE_NAME_LABEL) == name
            and (s["metadata"].get("labels") or {}).get(builders.MANAGED_BY_LABEL)
            == builders.MANAGED_BY_CONTROLLER
        ]
        if service is None or not (service.get("spec") or {}).get("selector"):
            for s in mine:
                self._store.delete(_SLICES, namespace, s["metadata"]["name"])
            return
        labels = {
            **(service["metadata"].get("labels") or {}),
            builders.SERVICE_NAME_LABEL: name,
            builders.MANAGED_BY_LABEL: builders.MANAGED_BY_CONTROLLER,
        }
        for ports, endpoints in self._desired(service):
            slot = next((s for s in mine if _slice_ports(s) == ports), mine[0] if mine else None)
            body = builders.endpoint_slice(
                namespace,
                name,
                endpoints=endpoints,
                ports=[{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
                managed_by=builders.MANAGED_BY_CONTROLLER,
                owner=service,
            )
            body["metadata"]["labels"] = labels
            # What the real server returns for an empty list that went through etcd.
            body["endpoints"] = body["endpoints"] or None
            body["ports"] = body["ports"] or None
            if slot is None:
                self._store.create(_SLICES, namespace, body)
                continue
            mine.remove(slot)
            new = clone(slot)
            new["metadata"]["labels"] = labels
            new["metadata"]["ownerReferences"] = body["metadata"]["ownerReferences"]
            new.update(endpoints=body["endpoints"], ports=body["ports"], addressType="IPv4")
            self._store.replace(_SLICES, namespace, new)  # a no-op when nothing changed
        for s in mine:
            self._store.delete(_SLICES, namespace, s["metadata"]["name"])


class GarbageCollector:
    """Deletes an object once every owner its ``ownerReferences`` name is gone."""

    def __init__(self, store: Store, resources: Mapping[str, Resource]) -> None:
        self._store = store
        self._resources = resources  # by Resource.key
        self._dependents: dict[str, set[Key]] = defaultdict(set)  # owner uid -> keys
        store.observers.append(self.observe)

    def observe(self, ev: WatchEvent) -> None:
        """Track who owns what; on a deletion, collect the orphans."""
        for ref in (ev.prev or {}).get("metadata", {}).get("ownerReferences") or []:
            self._dependents[ref.get("uid", "")].discard(ev.key)
        if ev.type != "DELETED":
            for ref in ev.obj["metadata"].get("ownerReferences") or []:
                self._dependents[ref.get("uid", "")].add(ev.key)
            return
        for key in sorted(self._dependents.pop(ev.obj["metadata"]["uid"], set())):
            res = self._resources[key[0]]
            dependent = self._store.find(res, key[1], key[2])
            if dependent is None:
                continue
            refs = dependent["metadata"].get("ownerReferences") or []
            alive = [
                r for r in refs if r.get("uid") != ev.obj["metadata"]["uid"] and self._exists(r)
            ]
            if alive:
                new = clone(dependent)
                new["metadata"]["ownerReferences"] = alive
                self._store.replace(res, key[1], new)
            else:
                self._store.delete(res, key[1], key[2])

    def _exists(self, ref: Mapping[str, Any]) -> bool:
        uid = ref.get("uid")
        return any(obj["metadata"].get("uid") == uid for _, obj in self._store.all_objects())

    def orphan(self, uid: str) -> None:
        """Remove references to owner ``uid`` (``propagationPolicy: Orphan``)."""
        for key in sorted(self._dependents.pop(uid, set())):
            res = self._resources[key[0]]
            dependent = self._store.find(res, key[1], key[2])
            if dependent is None:
                continue
            new = clone(dependent)
            refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            self._store.replace(res, key[1], new)
