"""What the real server's registry does to an object on its way in, per resource: the
defaults it fills (a Service's cluster IP, a pod's restart policy), what a client may not
set (the status on create, server-owned metadata), what a write to the main resource
keeps (the status, when there is a status subresource) and what a write to ``/status``
keeps (everything else), and the checks beyond metadata (a running pod's spec is
immutable but for a few fields; an EndpointSlice's shape).

Defaults apply to every object stored, including the ones tests put in directly; the
create and update rules only to requests over HTTP, the way clients see them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from detnet.lab.kubeapi.errors import ApiError
from detnet.lab.kubeapi.patch import clone
from detnet.lab.kubeapi.resources import Resource

JsonObj = dict[str, Any]

_SERVER_OWNED = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
)


def _invalid(kind: str, name: str, message: str) -> ApiError:
    return ApiError(422, f'{kind} "{name}" is invalid: {message}', name=name, kind=kind)


# --- defaults ---------------------------------------------------------------------------


def allocate_cluster_ip(cidr: str, used: Iterable[str]) -> str:
    """The first free address of ``cidr`` after the one the ``kubernetes`` Service takes."""
    net = ipaddress.ip_network(cidr)
    taken = set(used)
    for i, ip in enumerate(net.hosts()):
        if i > 0 and str(ip) not in taken:
            return str(ip)
    raise ApiError(500, f"failed to allocate a serviceIP: range {cidr} is full")


def _default_ports(ports: Any, *, service: bool) -> None:
    for port in ports if isinstance(ports, list) else ():
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
            if service and "port" in port:
                port.setdefault("targetPort", port["port"])


def apply_defaults(
    res: Resource, obj: JsonObj, *, service_cidr: str, used_ips: Iterable[str]
) -> None:
    """Fill the defaults the real server fills, in place."""
    spec = obj.get("spec")
    if res.kind == "Pod" and isinstance(spec, dict):
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        spec["serviceAccountName"] = spec["serviceAccount"] = account
        for container in spec.get("containers") or []:
            if isinstance(container, dict):
                _default_ports(container.get("ports"), service=False)
    elif res.kind == "Service" and isinstance(spec, dict):
        kind = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        _default_ports(spec.get("ports"), service=True)
        if kind != "ExternalName":
            if not spec.get("clusterIP"):
                spec["clusterIP"] = allocate_cluster_ip(service_cidr, used_ips)
            if spec["clusterIP"] != "None":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
    elif res.kind in ("Deployment", "ReplicaSet", "StatefulSet") and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
    elif res.kind == "EndpointSlice":
        _default_ports(obj.get("ports"), service=False)


def check_object(res: Resource, obj: JsonObj) -> None:
    """The checks beyond metadata that our clients could trip over."""
    name = obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get("generateName", "")
    if res.kind == "EndpointSlice":
        if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            raise _invalid(
                res.kind,
                name,
                'addressType: Unsupported value: supported values: "FQDN", "IPv4", "IPv6"',
            )
        endpoints = obj.get("endpoints") or []
        if not isinstance(endpoints, list) or len(endpoints) > 1000:
            raise _invalid(res.kind, name, "endpoints: Too many: must have at most 1000 items")
        for i, ep in enumerate(endpoints):
            addresses = ep.get("addresses") if isinstance(ep, dict) else None
            if not isinstance(addresses, list) or not 1 <= len(addresses) <= 100:
                raise _invalid(
                    res.kind,
                    name,
                    f"endpoints[{i}].addresses: Required value: must contain at least 1 address",
                )
    elif res.kind == "Service":
        ip = (obj.get("spec") or {}).get("clusterIP")
        if ip not in (None, "", "None"):
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise _invalid(
                    res.kind,
                    name,
                    f'spec.clusterIP: Invalid value: "{ip}": must be a valid IP address',
                ) from None


def service_ip_taken(obj: JsonObj, used: Iterable[str]) -> None:
    """409-like 422 of the real allocator when a Service asks for an address in use."""
    ip = (obj.get("spec") or {}).get("clusterIP")
    if ip not in (None, "", "None") and ip in set(used):
        name = obj["metadata"]["name"]
        raise _invalid(
            "Service",
            name,
            f'spec.clusterIPs: Invalid value: ["{ip}"]: failed to allocate IP {ip}: '
            "provided IP is already allocated",
        )


# --- create and update over HTTP ------------------------------------------------------------


def pod_qos(spec: Any) -> str:
    """The QoS class the server gives a pod: Guaranteed, Burstable or BestEffort."""
    containers = [c for c in (spec or {}).get("containers") or [] if isinstance(c, dict)]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits = r.get("limits") or {}
        requests = {**limits, **(r.get("requests") or {})}
        if not all(k in limits and requests.get(k) == limits[k] for k in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def prepare_create(res: Resource, body: JsonObj, *, namespace: str) -> JsonObj:
    """The object a create request stores: no server-owned metadata, the status reset
    where the client may not set it (a pod starts Pending). Takes ownership of ``body``."""
    obj = body
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise ApiError(400, "metadata must be an object")
    if res.namespaced and meta.get("namespace") not in (None, "", namespace):
        raise ApiError(
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
        )
    for owned in _SERVER_OWNED:
        meta.pop(owned, None)
    if res.kind == "Pod":
        obj["status"] = {"phase": "Pending", "qosClass": pod_qos(obj.get("spec"))}
    elif res.status and res.kind != "Node":  # a kubelet registers its Node with a status
        obj["status"] = {}
    return obj


def _pod_spec_fixed(spec: Any) -> Any:
    """A pod spec without the fields an update may change (a shallow view)."""
    mutable = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")
    fixed = {k: v for k, v in spec.items() if k not in mutable} if isinstance(spec, dict) else {}
    for key in ("containers", "initContainers"):
        if isinstance(fixed.get(key), list):
            fixed[key] = [
                {k: v for k, v in c.items() if k != "image"} if isinstance(c, dict) else c
                for c in fixed[key]
            ]
    return fixed


def _keep_cluster_ip(new: JsonObj, old: JsonObj) -> None:
    # An update that leaves the cluster IP out keeps it; one that changes it is refused.
    old_spec, spec = old.get("spec") or {}, new.setdefault("spec", {})
    for key in ("clusterIP", "clusterIPs"):
        if key not in old_spec:
            continue
        if not spec.get(key):
            spec[key] = clone(old_spec[key])
        elif spec[key] != old_spec[key]:
            raise _invalid(
                "Service", old["metadata"]["name"], f"spec.{key}: Invalid value: field is immutable"
            )


def prepare_update(res: Resource, body: JsonObj, old: JsonObj, *, subresource: str) -> JsonObj:
    """The object an update (or patch) request stores, from the body (taken over) and
    the stored object."""
    new = body
    if subresource == "status":
        # A status write changes the status and nothing else (it may carry a precondition).
        kept = clone(old)
        kept["status"] = new.get("status", {})
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if rv:
            kept["metadata"]["resourceVersion"] = rv
        else:
            kept["metadata"].pop("resourceVersion", None)
        return kept
    meta = new.setdefault("metadata", {})
    for owned in ("creationTimestamp", "generation", "deletionTimestamp", "managedFields"):
        if owned in old["metadata"]:
            meta[owned] = old["metadata"][owned]
        else:
            meta.pop(owned, None)
    uid = meta.get("uid")
    if uid and uid != old["metadata"]["uid"]:
        raise ApiError(
            409,
            f"Precondition failed: UID in precondition: {uid}, "
            f"UID in object meta: {old['metadata']['uid']}",
            name=old["metadata"]["name"],
            kind=res.plural,
        )
    if res.status:
        if "status" in old:
            new["status"] = clone(old["status"])
        else:
            new.pop("status", None)
    if res.kind == "Service":
        _keep_cluster_ip(new, old)
    if res.kind == "Pod" and _pod_spec_fixed(new.get("spec")) != _pod_spec_fixed(old.get("spec")):
        raise _invalid(
            "Pod",
            old["metadata"]["name"],
            "spec: Forbidden: pod updates may not change fields other than "
            "`spec.containers[*].image`,`spec.initContainers[*].image`,"
            "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing "
            "tolerations),`spec.terminationGracePeriodSeconds`",
        )
    return new
