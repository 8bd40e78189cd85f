"""The resources the emulation serves, what each one is like on a real API server, and how
a request path names one of them.

A ``Resource`` carries what the real server's registry knows of a type: namespaced or
cluster-scoped, the verbs it serves, whether it has a ``status`` subresource, which
fields bump ``metadata.generation``, and the exact set of fields a field selector may
name (``fieldSelector=spec.nodeName=n1`` on pods; anything else is a 400, as on the real
server). Paths are ``/api/v1/...`` for the core group and ``/apis/<group>/<version>/...``
for the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detnet.lab.kubeapi.errors import ApiError

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool = True
    verbs: tuple[str, ...] = ALL_VERBS
    short_names: tuple[str, ...] = ()
    # Selectable fields beyond metadata.name (and metadata.namespace when namespaced).
    fields: tuple[str, ...] = ()
    status: bool = False  # has a status subresource: main-resource writes keep the status
    generation: tuple[str, ...] = ()  # top-level fields whose change bumps the generation
    returns_deleted: bool = False  # DELETE answers with the object instead of a Status

    @property
    def api_version(self) -> str:
        """``v1`` for the core group, ``<group>/<version>`` for the others."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The store's key prefix for objects of this resource."""
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def selectable(self) -> tuple[str, ...]:
        """Every field a field selector may name."""
        meta = ("metadata.name", "metadata.namespace") if self.namespaced else ("metadata.name",)
        return meta + self.fields


_POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.podIPs",
    "status.nominatedNodeName",
)
_EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)
_APPS = ("apps", "v1")

RESOURCES = (
    Resource(
        "", "v1", "pods", "Pod", "pod",
        short_names=("po",), fields=_POD_FIELDS, status=True, generation=("spec",),
        returns_deleted=True,
    ),
    Resource("", "v1", "events", "Event", "event", short_names=("ev",), fields=_EVENT_FIELDS),
    Resource(
        "", "v1", "nodes", "Node", "node",
        namespaced=False, short_names=("no",), fields=("spec.unschedulable",), status=True,
    ),
    Resource(
        "", "v1", "services", "Service", "service",
        short_names=("svc",), fields=("spec.clusterIP", "spec.type"), status=True,
        returns_deleted=True,
    ),
    Resource("", "v1", "configmaps", "ConfigMap", "configmap", short_names=("cm",)),
    Resource(
        "", "v1", "serviceaccounts", "ServiceAccount", "serviceaccount",
        short_names=("sa",), returns_deleted=True,
    ),
    Resource(
        *_APPS, "deployments", "Deployment", "deployment",
        short_names=("deploy",), status=True, generation=("spec",),
    ),
    Resource(
        *_APPS, "replicasets", "ReplicaSet", "replicaset",
        short_names=("rs",), fields=("status.replicas",), status=True, generation=("spec",),
    ),
    Resource(
        *_APPS, "statefulsets", "StatefulSet", "statefulset",
        short_names=("sts",), status=True, generation=("spec",),
    ),
    Resource(
        *_APPS, "daemonsets", "DaemonSet", "daemonset",
        short_names=("ds",), status=True, generation=("spec",),
    ),
    Resource(
        "discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", "endpointslice",
        generation=("addressType", "endpoints", "ports"),
    ),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", "lease"),
    Resource(
        "authentication.k8s.io", "v1", "tokenreviews", "TokenReview", "tokenreview",
        namespaced=False, verbs=("create",),
    ),
)  # fmt: skip
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}

# Subresources served, by plural: the verbs each one answers.
SUBRESOURCES: dict[tuple[str, str], tuple[str, ...]] = {
    **{(r.plural, "status"): ("get", "patch", "update") for r in RESOURCES if r.status},
    ("serviceaccounts", "token"): ("create",),
}


def resource_of_kind(kind: str) -> Resource:
    """The resource of a kind (``Pod``, ``EndpointSlice``...); ValueError for another."""
    try:
        return BY_KIND[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not emulated (one of: {', '.join(BY_KIND)})") from None


# --- field selectors: the value of each selectable field ----------------------------


def _path(obj: Mapping[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _text(value: Any) -> str:
    # Go's fmt of the field: bools as true/false, numbers plainly, absent as "".
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pod_ip(pod: Mapping[str, Any]) -> str:
    # The real server reads podIPs[0] (the v1 podIP is folded into podIPs on the way in).
    ips = _path(pod, "status.podIPs")
    if isinstance(ips, list) and ips and isinstance(ips[0], Mapping):
        return _text(ips[0].get("ip"))
    return _text(_path(pod, "status.podIP"))


# Fields whose value is not simply the text at their path.
_SPECIAL: dict[tuple[str, str], Callable[[Mapping[str, Any]], str]] = {
    ("Pod", "spec.hostNetwork"): lambda o: _text(bool(_path(o, "spec.hostNetwork"))),
    ("Pod", "status.podIP"): _pod_ip,
    # Selectable but never set in the real server's field set: it matches only "".
    ("Pod", "status.podIPs"): lambda o: "",
    ("Node", "spec.unschedulable"): lambda o: _text(bool(_path(o, "spec.unschedulable"))),
    ("ReplicaSet", "status.replicas"): lambda o: _text(_path(o, "status.replicas") or 0),
    ("Service", "spec.type"): lambda o: _text(_path(o, "spec.type") or "ClusterIP"),
    ("Event", "source"): lambda o: _text(_path(o, "source.component")),
}


def field_value(res: Resource, obj: Mapping[str, Any], name: str) -> str:
    """The value a field selector compares for field ``name`` of ``obj``."""
    special = _SPECIAL.get((res.kind, name))
    return special(obj) if special else _text(_path(obj, name))


def check_field(res: Resource, name: str) -> str:
    """The field a selector names, as the server reads it; ApiError(400) if unsupported."""
    if res.kind == "Pod" and name == "spec.host":
        return "spec.nodeName"  # the real server still accepts the v1 client's old name
    if name in res.selectable:
        return name
    if res.fields or not res.namespaced:
        # Types with their own conversion function answer like this...
        raise ApiError(400, f"field label not supported: {name}")
    # ...the others with the generic one.
    raise ApiError(
        400, f'"{name}" is not a known field selector: only "metadata.name", "metadata.namespace"'
    )


# --- request paths ----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What a request path names."""

    res: Resource
    namespace: str | None  # None: cluster-scoped, or across all namespaces
    name: str
    subresource: str


def _not_found(path: str) -> ApiError:
    return ApiError(404, f"the server could not find the requested resource ({path})")


def parse_path(path: str) -> Route:
    """The resource, namespace, name and subresource of a request path (404 otherwise)."""
    segs = path.strip("/").split("/")
    if len(segs) >= 2 and segs[0] == "api":
        group, version, rest = "", segs[1], segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        group, version, rest = segs[1], segs[2], segs[3:]
    else:
        raise _not_found(path)
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not 1 <= len(rest) <= 3 or not all(rest) or (namespace is not None and not namespace):
        raise _not_found(path)
    res = BY_PATH.get((group, version, rest[0]))
    if res is None:
        raise _not_found(path)
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    if res.namespaced:
        if name and namespace is None:
            raise _not_found(path)  # /api/v1/pods/NAME is no route: a name needs a namespace
    elif namespace is not None:
        raise _not_found(path)
    if sub and (res.plural, sub) not in SUBRESOURCES:
        raise _not_found(path)
    return Route(res, namespace, name, sub)


def verb_of(method: str, name: str, watch: bool) -> str:
    """The Kubernetes verb (get, list, watch, create, update, patch, delete,
    deletecollection) of a request."""
    if method == "GET":
        return "get" if name else ("watch" if watch else "list")
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def check_verb(route: Route, verb: str, method: str) -> None:
    """405, as the real server answers a method the resource does not serve."""
    allowed = SUBRESOURCES[(route.res.plural, route.subresource)] if route.subresource else None
    if allowed is None:
        allowed = route.res.verbs
    if route.res.namespaced and route.namespace is None:
        allowed = tuple(v for v in allowed if v in ("list", "watch"))  # across namespaces
    # POST to a named object is no create (the real server has no such route either).
    if verb not in allowed or (verb == "create" and route.name and not route.subresource):
        raise ApiError(
            405, f"the server does not allow this method on the requested resource ({method})"
        )
