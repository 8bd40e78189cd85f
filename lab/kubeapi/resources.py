"""The resources the emulation serves and how a request path names one of them.

A ``Resource`` is the (group, version, plural) of a REST path with its kind; paths are
``/api/v1/...`` for the core group and ``/apis/<group>/<version>/...`` for the others."""

from __future__ import annotations

import re
from dataclasses import dataclass

from detnet.lab.kubeapi.errors import ApiError


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        """``v1`` for the core group, ``<group>/<version>`` for the others."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The store's key prefix for objects of this resource."""
        return f"{self.group}/{self.version}/{self.plural}"


RESOURCES = (
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "events", "Event"),
    Resource("apps", "v1", "deployments", "Deployment"),
    Resource("apps", "v1", "statefulsets", "StatefulSet"),
    Resource("apps", "v1", "daemonsets", "DaemonSet"),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
)
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}

_PATH_RE = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def parse_path(path: str) -> tuple[Resource, str | None, str, str]:
    """(resource, namespace or None, name or "", subresource or "") of a request path."""
    m = _PATH_RE.match(path)
    if not m:
        raise ApiError(404, f"the server could not find the requested resource ({path})")
    group = m.group("group") or ""
    version = m.group("core") or m.group("version")
    res = BY_PATH.get((group, version, m.group("plural")))
    if res is None:
        raise ApiError(404, f"the server could not find the requested resource ({path})")
    return res, m.group("ns"), m.group("name") or "", m.group("sub") or ""


def verb_of(method: str, name: str, watch: bool) -> str:
    """The Kubernetes verb (get, list, watch, create, update, patch, delete) of a request."""
    if method == "GET":
        return "get" if name else ("watch" if watch else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )
