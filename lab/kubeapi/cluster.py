"""The state of the emulated cluster as tests and the lab arrange and read it, without
HTTP: generic ``put``/``get``/``objects``/``patch``/``delete`` on any served kind, and
shortcuts for what tests build most (pods on nodes with IPs, workloads with their
ReplicaSets and owned pods, Services whose EndpointSlices follow their pods, tokens).

Writes here skip the create/update rules of requests (a test may set a pod's status
directly) but not validation or defaults, and they reach watchers and the controllers
exactly as writes over HTTP do. Everything returned is a copy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from detnet.lab.kubeapi import builders
from detnet.lab.kubeapi.auth import (
    DEFAULT_AUDIENCES,
    BoundObject,
    Identity,
    Tokens,
    default_groups,
    token_request,
)
from detnet.lab.kubeapi.controllers import EndpointSliceController, GarbageCollector
from detnet.lab.kubeapi.patch import clone, merge_patch
from detnet.lab.kubeapi.resources import RESOURCES, Resource, resource_of_kind
from detnet.lab.kubeapi.selectors import Selection
from detnet.lab.kubeapi.store import JsonObj, Store, random_suffix
from detnet.lab.kubeapi.strategy import apply_defaults, check_object, service_ip_taken

_PODS, _NODES = resource_of_kind("Pod"), resource_of_kind("Node")
_SERVICES, _SLICES = resource_of_kind("Service"), resource_of_kind("EndpointSlice")
_WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def _namespace_for(res: Resource, namespace: str) -> str:
    if res.namespaced and not namespace:
        raise ValueError(f"{res.kind} is namespaced: give a namespace")
    if not res.namespaced and namespace:
        raise ValueError(f"{res.kind} is cluster-scoped: it has no namespace")
    return namespace


class Cluster:
    """The objects of the emulated cluster, its controllers and its tokens."""

    def __init__(
        self,
        *,
        history: int = 10_000,
        service_cidr: str = "198.19.240.0/20",
        api_audiences: Sequence[str] = DEFAULT_AUDIENCES,
    ) -> None:
        self._store = Store(history=history)
        self._service_cidr = service_cidr
        self.api_audiences = tuple(api_audiences)
        self._tokens = Tokens()
        EndpointSliceController(self._store)
        self._gc = GarbageCollector(self._store, {r.key: r for r in RESOURCES})

    # --- generic -----------------------------------------------------------------------

    def _used_ips(self, except_name: tuple[str, str] | None = None) -> list[str]:
        return [
            ip
            for s in self._store.select(_SERVICES, None)
            if (s["metadata"]["namespace"], s["metadata"]["name"]) != except_name
            for ip in [(s.get("spec") or {}).get("clusterIP")]
            if ip
        ]

    def _store_object(
        self,
        res: Resource,
        ns: str,
        obj: JsonObj,
        *,
        uid: str | None = None,
        replace: bool | None = False,
    ) -> JsonObj:
        """Create (``replace=False``), replace (True) or either (None) an object, with the
        defaults and checks every stored object gets; takes ownership of ``obj``."""
        name = obj.get("metadata", {}).get("name", "")
        old = self._store.find(res, ns, name) if name and replace is not False else None
        if replace and old is None:
            self._store.get(res, ns, name)  # the 404
        used = self._used_ips((ns, name))
        if old is None and res is _SERVICES:
            service_ip_taken(obj, used)
        apply_defaults(res, obj, service_cidr=self._service_cidr, used_ips=used)
        check_object(res, obj)
        if old is None:
            return self._store.create(res, ns, obj, uid=uid)
        return self._store.replace(res, ns, obj)

    def put(self, obj: Mapping[str, Any]) -> JsonObj:
        """Create ``obj`` (any served kind, found by ``kind``), or replace the stored one
        of that name unconditionally; return the stored copy."""
        res = resource_of_kind(str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        ns = _namespace_for(res, str(meta.get("namespace") or ""))
        body = clone(dict(obj))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        return clone(self._store_object(res, ns, body, uid=meta.get("uid"), replace=None))

    def find(self, kind: str, name: str, *, namespace: str = "") -> JsonObj | None:
        """A copy of an object, or None."""
        res = resource_of_kind(kind)
        return clone(self._store.find(res, _namespace_for(res, namespace), name))

    def get(self, kind: str, name: str, *, namespace: str = "") -> JsonObj:
        """A copy of an object; KeyError when there is none."""
        obj = self.find(kind, name, namespace=namespace)
        if obj is None:
            raise KeyError(f"no {kind} {namespace + '/' if namespace else ''}{name}")
        return obj

    def objects(
        self,
        kind: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[JsonObj]:
        """Copies of the objects of ``kind`` (in ``namespace``, or all), sorted by
        namespace and name, that the selectors select (ApiError 400 for a bad one)."""
        res = resource_of_kind(kind)
        selection = Selection.parse(res, labels=label_selector, fields=field_selector)
        return clone(self._store.select(res, namespace, selection.predicate(res)))

    def patch(
        self, kind: str, name: str, patch: Mapping[str, Any], *, namespace: str = ""
    ) -> JsonObj:
        """Apply an RFC 7386 merge patch to any part of an object, status included."""
        new = merge_patch(self.get(kind, name, namespace=namespace), patch)
        res = resource_of_kind(kind)
        new["metadata"]["name"] = name
        new["metadata"].pop("resourceVersion", None)
        return clone(self._store_object(res, namespace, new, replace=True))

    def delete(self, kind: str, name: str, *, namespace: str = "", orphan: bool = False) -> None:
        """Delete an object (KeyError when absent); what it owns goes too, unless ``orphan``."""
        obj = self.get(kind, name, namespace=namespace)
        if orphan:
            self._gc.orphan(obj["metadata"]["uid"])
        self._store.delete(resource_of_kind(kind), namespace, name)

    def owner_reference(self, kind: str, name: str, *, namespace: str = "") -> JsonObj:
        """The controller ``ownerReferences`` item for a stored object."""
        return builders.owner_reference(self.get(kind, name, namespace=namespace))

    def compact(self) -> None:
        """Forget the watch history: a watch from any older resourceVersion gets 410."""
        self._store.compact()

    # --- nodes and pods ------------------------------------------------------------------

    def add_node(
        self,
        name: str,
        *,
        internal_ip: str = "",
        labels: Mapping[str, str] | None = None,
        ready: bool = True,
        unschedulable: bool = False,
        pod_cidr: str = "",
        uid: str | None = None,
    ) -> JsonObj:
        """Register a Node (Ready by default) as its kubelet would."""
        node = builders.node(
            name,
            internal_ip=internal_ip,
            labels=labels,
            ready=ready,
            unschedulable=unschedulable,
            pod_cidr=pod_cidr,
        )
        return clone(self._store_object(_NODES, "", node, uid=uid))

    def set_node_ready(self, name: str, ready: bool) -> JsonObj:
        """Set a Node's Ready condition (True, or Unknown as when its kubelet stops)."""
        node = self.get("Node", name)
        others = [c for c in node["status"].get("conditions") or [] if c.get("type") != "Ready"]
        node["status"]["conditions"] = [builders.node_ready_condition(ready), *others]
        return clone(self._store_object(_NODES, "", node, replace=True))

    def _host_ip(self, node_name: str) -> str:
        node = self._store.find(_NODES, "", node_name) if node_name else None
        for addr in ((node or {}).get("status") or {}).get("addresses") or []:
            if addr.get("type") == "InternalIP":
                return str(addr.get("address", ""))
        return ""

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
        ready: bool | None = None,
        node_name: str = "",
        pod_ip: str = "",
        uid: str | None = None,
        owner_references: Sequence[Mapping[str, Any]] = (),
        containers: Sequence[Mapping[str, Any]] | None = None,
        service_account: str = "default",
    ) -> JsonObj:
        """Create a pod as its kubelet reports it (default Running and Ready; its hostIP
        is its node's InternalIP) and return a copy."""
        pod = builders.pod(
            namespace,
            name,
            labels=labels,
            annotations=annotations,
            phase=phase,
            ready=ready,
            node_name=node_name,
            pod_ip=pod_ip,
            host_ip=self._host_ip(node_name),
            owner_references=owner_references,
            containers=containers,
            service_account=service_account,
        )
        return clone(self._store_object(_PODS, namespace, pod, uid=uid))

    def _set_pod_status(
        self, namespace: str, name: str, *, phase: str | None, ready: bool | None
    ) -> JsonObj:
        pod = self.get("Pod", name, namespace=namespace)
        status = pod.get("status") or {}
        phase = phase or status.get("phase", "Pending")
        pod["status"] = builders.pod_status(
            pod["spec"],
            phase=phase,
            ready=phase == "Running" if ready is None else ready,
            pod_ip=str(status.get("podIP") or ""),
            host_ip=str(status.get("hostIP") or self._host_ip(pod["spec"].get("nodeName", ""))),
            previous=status,
        )
        return clone(self._store_object(_PODS, namespace, pod, replace=True))

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> JsonObj:
        """Move a pod to ``phase`` (e.g. Pending -> Running), Ready when Running, as the
        kubelet would."""
        return self._set_pod_status(namespace, name, phase=phase, ready=None)

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> JsonObj:
        """Set a pod's Ready condition (its readiness probe passing or failing)."""
        return self._set_pod_status(namespace, name, phase=None, ready=ready)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod."""
        self.delete("Pod", name, namespace=namespace)

    def pod(self, namespace: str, name: str) -> JsonObj:
        """A copy of a pod (KeyError when absent)."""
        return self.get("Pod", name, namespace=namespace)

    def pods(self, namespace: str) -> list[JsonObj]:
        """Copies of every pod in ``namespace``."""
        return self.objects("Pod", namespace=namespace)

    # --- workloads ----------------------------------------------------------------------

    def add_deployment(
        self,
        namespace: str,
        name: str,
        *,
        replicas: int = 3,
        labels: Mapping[str, str] | None = None,
        kind: str = "Deployment",
        annotations: Mapping[str, str] | None = None,
        nodes: Sequence[str] = (),
        pod_ips: Sequence[str] = (),
    ) -> list[str]:
        """Create a Deployment (with its ReplicaSet), StatefulSet or DaemonSet selecting
        ``labels`` (default ``app=<name>``) and its ``replicas`` Running pods, named and
        owned as their controllers make them, spread round-robin over ``nodes`` with
        ``pod_ips`` in order; return the pod names."""
        if kind not in _WORKLOAD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(_WORKLOAD_KINDS)}, got {kind!r}")
        if pod_ips and len(pod_ips) != replicas:
            raise ValueError(f"pod_ips has {len(pod_ips)} addresses for {replicas} replicas")
        labels = dict(labels or {"app": name})
        res = resource_of_kind(kind)
        spec = builders.workload(
            kind, namespace, name, replicas=replicas, labels=labels, annotations=annotations
        )
        owner = self._store_object(res, namespace, spec)
        pod_labels = dict(labels)
        revision = f"{name}-{builders.template_hash(owner['spec']['template'])}"
        if kind == "Deployment":
            owner = self._store_object(
                resource_of_kind("ReplicaSet"), namespace, builders.replica_set(owner)
            )
            pod_labels = dict(owner["spec"]["template"]["metadata"]["labels"])
        else:
            pod_labels["controller-revision-hash"] = revision
            if kind == "DaemonSet":
                pod_labels["pod-template-generation"] = "1"
        names = []
        for i in range(replicas):
            if kind == "StatefulSet":
                pod_name = f"{name}-{i}"
                extra = {
                    "statefulset.kubernetes.io/pod-name": pod_name,
                    "apps.kubernetes.io/pod-index": str(i),
                }
            else:
                prefix = owner["metadata"]["name"]
                pod_name = f"{prefix}-{_unused_suffix(self, namespace, prefix)}"
                extra = {}
            self.add_pod(
                namespace,
                pod_name,
                labels={**pod_labels, **extra},
                annotations=annotations,
                node_name=nodes[i % len(nodes)] if nodes else "",
                pod_ip=pod_ips[i] if pod_ips else "",
                owner_references=[builders.owner_reference(owner)],
            )
            names.append(pod_name)
        return names

    def workload(self, kind: str, namespace: str, name: str) -> JsonObj:
        """A copy of a Deployment/StatefulSet/DaemonSet/ReplicaSet."""
        return self.get(kind, name, namespace=namespace)

    def lease(self, namespace: str, name: str) -> JsonObj | None:
        """A copy of a Lease, or None."""
        return self.find("Lease", name, namespace=namespace)

    def events(self, namespace: str | None = None) -> list[JsonObj]:
        """Copies of the Events created, oldest first (optionally only in ``namespace``)."""
        return [
            clone(e)
            for e in self._store.in_order(resource_of_kind("Event"))
            if namespace in (None, e["metadata"]["namespace"])
        ]

    # --- services ------------------------------------------------------------------------

    def add_service(
        self,
        namespace: str,
        name: str,
        *,
        selector: Mapping[str, str] | None = None,
        ports: Sequence[int | Mapping[str, Any]] = (80,),
        cluster_ip: str = "",
        labels: Mapping[str, str] | None = None,
        publish_not_ready: bool = False,
    ) -> JsonObj:
        """Create a Service (a cluster IP from ``service_cidr`` unless given, or "None"
        for a headless one). With a ``selector`` the EndpointSlice controller keeps its
        slices in step with the matching pods; without one, add slices yourself."""
        svc = builders.service(
            namespace,
            name,
            selector=selector,
            ports=ports,
            cluster_ip=cluster_ip,
            labels=labels,
            publish_not_ready=publish_not_ready,
        )
        return clone(self._store_object(_SERVICES, namespace, svc))

    def add_endpoint_slice(
        self,
        namespace: str,
        service: str,
        *,
        endpoints: Sequence[Mapping[str, Any]],
        ports: Sequence[Mapping[str, Any]] = (),
        address_type: str = "IPv4",
        name: str = "",
    ) -> JsonObj:
        """Create an EndpointSlice of ``service`` by hand (see ``builders.endpoint``), as a
        controller other than the built-in one would."""
        owner = self._store.find(_SERVICES, namespace, service)
        body = builders.endpoint_slice(
            namespace,
            service,
            endpoints=endpoints,
            ports=ports,
            address_type=address_type,
            name=name,
            owner=owner,
        )
        return clone(self._store_object(_SLICES, namespace, body))

    # --- tokens --------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        *,
        username: str,
        audiences: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
        uid: str | None = None,
        extra: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Make TokenReviews of ``token`` authenticate ``username`` for ``audiences``
        (default: the API server's). A ``system:serviceaccount:NS:NAME`` user gets the
        ServiceAccount groups and, when that ServiceAccount exists, its uid."""
        if uid is None and username.startswith("system:serviceaccount:"):
            ns, _, sa = username.removeprefix("system:serviceaccount:").partition(":")
            account = self._store.find(resource_of_kind("ServiceAccount"), ns, sa)
            uid = account["metadata"]["uid"] if account else ""
        identity = Identity(
            username=username,
            uid=uid or "",
            groups=tuple(groups) if groups is not None else default_groups(username),
            audiences=tuple(audiences) if audiences is not None else self.api_audiences,
            extra={k: tuple(v) for k, v in (extra or {}).items()},
        )
        self._tokens.add(token, identity)

    def revoke_token(self, token: str) -> None:
        """Make ``token`` unauthenticated from now on."""
        self._tokens.revoke(token)

    def review_token(self, body: Any) -> JsonObj:
        """The TokenReview the server answers to a created ``body``."""
        return self._tokens.review(
            body, api_audiences=self.api_audiences, now=time.time(), alive=self._alive
        )

    def _alive(self, bound: BoundObject) -> bool:
        obj = self._store.find(resource_of_kind(bound.kind), bound.namespace, bound.name)
        return obj is not None and obj["metadata"]["uid"] == bound.uid

    def token_request(self, namespace: str, name: str, body: Any) -> JsonObj:
        """The TokenRequest the server answers to a ``serviceaccounts/<name>/token``
        create (see ``auth.token_request``); the token it carries now authenticates."""
        account = self._store.get(resource_of_kind("ServiceAccount"), namespace, name)
        answer, token, identity = token_request(
            body,
            account=account,
            find_pod=lambda pod: self._store.get(_PODS, namespace, pod),
            find_node=lambda node: self._store.find(_NODES, "", node),
            api_audiences=self.api_audiences,
            now=time.time(),
        )
        self._tokens.add(token, identity)
        return answer

    def issue_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] | None = None,
        expiration_seconds: int = 3600,
        pod: str = "",
    ) -> str:
        """Mint a token for an existing ServiceAccount the way the kubelet asks for a
        projected one (bound to ``pod`` when given); return the token."""
        spec: JsonObj = {"expirationSeconds": expiration_seconds}
        if audiences is not None:
            spec["audiences"] = list(audiences)
        if pod:
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod}
        answer = self.token_request(namespace, service_account, {"spec": spec})
        return str(answer["status"]["token"])


def _unused_suffix(cluster: Cluster, namespace: str, prefix: str) -> str:
    while True:
        suffix = random_suffix()
        if cluster.find("Pod", f"{prefix}-{suffix}", namespace=namespace) is None:
            return suffix
