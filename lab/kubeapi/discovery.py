"""The discovery documents of the emulated server, built from the resource table: what
kubectl and other discovery clients read before they call anything (``/api``,
``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``, ``/version``).

Only the legacy (unaggregated) form is served: a client asking for aggregated discovery
gets these documents as ``application/json`` and falls back to them, as it does with a
server that predates aggregation.
"""

from __future__ import annotations

from typing import Any

from detnet.lab.kubeapi.resources import RESOURCES, SUBRESOURCES

JsonObj = dict[str, Any]

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-detnet-emulator",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in RESOURCES:
        if r.group:
            versions = groups.setdefault(r.group, [])
            if r.version not in versions:
                versions.append(r.version)
    return groups


def _group(name: str, versions: list[str]) -> JsonObj:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def document(path: str, *, server_address: str) -> JsonObj | None:
    """The discovery document at ``path``, or None when it is not a discovery path."""
    path = "/" + path.strip("/")
    if path == "/version":
        return dict(VERSION)
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
            ],
        }
    if path == "/apis":
        groups = [_group(n, v) for n, v in sorted(_groups().items())]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    parts = path.strip("/").split("/")
    if parts[0] == "apis" and len(parts) == 2 and parts[1] in _groups():
        return {"kind": "APIGroup", "apiVersion": "v1", **_group(parts[1], _groups()[parts[1]])}
    if parts == ["api", "v1"]:
        group, version = "", "v1"
    elif parts[0] == "apis" and len(parts) == 3:
        group, version = parts[1], parts[2]
    else:
        return None
    served = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
    if not served:
        return None
    resources: list[JsonObj] = []
    for r in served:
        entry: JsonObj = {
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        resources.append(entry)
        for (plural, sub), verbs in SUBRESOURCES.items():
            if plural == r.plural:
                kind = "TokenRequest" if sub == "token" else r.kind
                resources.append(
                    {
                        "name": f"{plural}/{sub}",
                        "singularName": "",
                        "namespaced": r.namespaced,
                        "kind": kind,
                        "verbs": list(verbs),
                        **(
                            {"group": "authentication.k8s.io", "version": "v1"}
                            if sub == "token"
                            else {}
                        ),
                    }
                )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }
