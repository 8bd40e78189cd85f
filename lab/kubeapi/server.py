"""An in-process emulation of the Kubernetes API server, for tests and the benchmarks.

It speaks the real REST protocol over HTTP on 127.0.0.1 so the real kubernetes-asyncio
client talks to it unchanged: pods, events, apps/v1 workloads and coordination.k8s.io/v1
leases; get/list/watch/create/update/patch/delete; label selectors (equality and
set-based); watch from a resourceVersion with bookmarks and 410 Gone for compacted
versions; RFC 7386 merge patch, a strategic merge patch (maps merge, null deletes, lists
of named items merge by key) and RFC 6902 JSON patch; optimistic concurrency (409 on a
stale resourceVersion); Status error bodies. Faults are programmable per route
(``fail()``), and every request is recorded so a test can assert what was (not) sent.

Routes are matched as ``"<verb> <path>"`` with shell wildcards, where verb is the
Kubernetes verb (get, list, watch, create, update, patch, delete), e.g.
``api.fail("patch /api/v1/namespaces/*/pods/*", 500, times=2)``.

Only aiohttp and the standard library are imported at module level; kubernetes-asyncio is
imported lazily by ``client_configuration()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

JsonObj = dict[str, Any]

# (group, version, plural) -> (kind, apiVersion)
_RESOURCES: dict[tuple[str, str, str], tuple[str, str]] = {
    ("", "v1", "pods"): ("Pod", "v1"),
    ("", "v1", "events"): ("Event", "v1"),
    ("apps", "v1", "deployments"): ("Deployment", "apps/v1"),
    ("apps", "v1", "statefulsets"): ("StatefulSet", "apps/v1"),
    ("apps", "v1", "daemonsets"): ("DaemonSet", "apps/v1"),
    ("coordination.k8s.io", "v1", "leases"): ("Lease", "coordination.k8s.io/v1"),
}
_PLURAL_OF_KIND = {kind: key for key, (kind, _) in _RESOURCES.items()}

# Strategic merge patch: list fields whose items merge by a key (the rest are replaced).
_SMP_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}

DROP = "drop"
"""Pass as ``status`` to ``fail()`` to close the connection without any response."""


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it."""

    method: str
    verb: str
    path: str
    query: Mapping[str, str]
    content_type: str
    body: Any  # parsed JSON, or None
    at: float = 0.0  # wall-clock time.time() of arrival: comparable with other processes' logs
    user_agent: str = ""  # tells the clients of several processes apart


@dataclass
class _Fault:
    pattern: str
    status: int | str
    times: int
    retry_after: float | None


@dataclass
class _WatchEvent:
    rv: int
    type: str
    key: tuple[str, str, str]  # (plural key "group/version/plural", namespace, name)
    obj: JsonObj


@dataclass
class _Store:
    objects: dict[tuple[str, str, str], JsonObj] = field(default_factory=dict)


class ApiError(Exception):
    """An API error the emulator turns into a Status response."""

    def __init__(self, code: int, message: str, *, name: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.name = name
        self.kind = kind


def status_body(code: int, message: str, *, name: str = "", kind: str = "") -> JsonObj:
    """A Kubernetes ``Status`` failure object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "details": {"name": name, "kind": kind},
        "code": code,
    }


# --- label selectors -----------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a Kubernetes label selector string.

    Raises ApiError(400) for a selector that does not parse."""
    for req in _split_selector(selector or ""):
        if m := _SET_RE.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            present = key in labels and labels[key] in values
            if (op == "in" and not present) or (op == "notin" and present):
                return False
        elif m := _EQ_RE.match(req):
            key, op, value = m.groups()
            equal = labels.get(key) == value
            if (op == "!=" and equal) or (op != "!=" and not equal):
                return False
        elif m := _EXISTS_RE.match(req):
            negate, key = m.groups()
            if (key in labels) == bool(negate):
                return False
        else:
            raise ApiError(400, f"unable to parse requirement: {req!r}")
    return True


# --- patches ------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field_name: str = "") -> Any:
    """The subset of Kubernetes' strategic merge patch we need: maps merge, null deletes,
    lists of named items (containers, volumes, env...) merge by their key, other lists
    are replaced."""
    if isinstance(patch, dict):
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value, key)
        return result
    merge_key = _SMP_MERGE_KEYS.get(field_name)
    if isinstance(patch, list) and merge_key and isinstance(target, list):
        merged = [copy.deepcopy(item) for item in target]
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                raise ApiError(422, f"{field_name}: item without merge key {merge_key!r}")
            for i, old in enumerate(merged):
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]:
                    merged[i] = strategic_merge_patch(old, item)
                    break
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace and test."""
    if not isinstance(ops, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        parts = _pointer(str(op.get("path", "")))
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.get(p)
            if parent is None:
                raise ApiError(422, f"path {op.get('path')!r} does not exist")
        last, kind = parts[-1], op.get("op")
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, f"test failed at {op.get('path')!r}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if kind == "add":
                    parent.insert(idx, op.get("value"))
                else:
                    parent[idx] = op.get("value")
            else:
                if kind == "replace" and last not in parent:
                    raise ApiError(422, f"path {op.get('path')!r} does not exist")
                parent[last] = op.get("value")
        elif kind == "remove":
            try:
                del parent[int(last) if isinstance(parent, list) else last]
            except (KeyError, IndexError) as exc:
                raise ApiError(422, f"path {op.get('path')!r} does not exist") from exc
        else:
            raise ApiError(422, f"unsupported JSON patch op {kind!r}")
    return doc


def _validate(obj: JsonObj, kind: str) -> None:
    """The validation the real server does that our clients could trip over."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ApiError(422, f"{kind}: metadata.name is required", kind=kind)
    for what in ("labels", "annotations"):
        values = meta.get(what) or {}
        if not isinstance(values, dict):
            raise ApiError(422, f"metadata.{what} must be a map", name=meta["name"], kind=kind)
        for k, v in values.items():
            if not isinstance(v, str):
                raise ApiError(
                    422,
                    f"metadata.{what}[{k}]: Invalid value: must be a string",
                    name=meta["name"],
                    kind=kind,
                )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiServerEmulator:
    """The emulated API server: ``async with ApiServerEmulator() as api: ... api.url``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        bookmark_interval_s: float = 0.5,
        history: int = 10_000,
    ) -> None:
        self._host = host
        self._bookmark_interval_s = bookmark_interval_s
        self._store = _Store()
        self._rv = 1
        self._log: deque[_WatchEvent] = deque(maxlen=history)
        self._floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._waiters: set[asyncio.Event] = set()  # one per open watch
        self._faults: list[_Fault] = []
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.requests: list[RecordedRequest] = []
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> ApiServerEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on an ephemeral port of ``host``."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"

    async def close(self) -> None:
        """End open watches and stop listening."""
        self._closing = True
        for waiter in self._waiters:
            waiter.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def client_configuration(self) -> Any:
        """A kubernetes_asyncio ``Configuration`` pointing at this server."""
        from kubernetes_asyncio.client import Configuration

        conf = Configuration(host=self.url)
        return conf

    def kubeconfig(self, *, user: str = "detnet") -> str:
        """A kubeconfig document pointing at this server, for another process."""
        return (
            "apiVersion: v1\n"
            "kind: Config\n"
            f'clusters: [{{name: emulator, cluster: {{server: "{self.url}"}}}}]\n'
            f"users: [{{name: {user}, user: {{token: not-a-secret}}}}]\n"
            f"contexts: [{{name: emulator, context: {{cluster: emulator, user: {user}}}}}]\n"
            "current-context: emulator\n"
        )

    # --- test API ----------------------------------------------------------------

    def fail(
        self,
        route_pattern: str,
        status: int | str,
        *,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``"<verb> <path>"`` pattern with
        ``status`` (an HTTP code, or ``DROP`` to close the connection unanswered).

        A 410 on a watch is sent the way the server does it: an ERROR event in the stream."""
        self._faults.append(_Fault(route_pattern, status, times, retry_after))

    def clear_faults(self) -> None:
        """Forget every fault not yet used."""
        self._faults.clear()

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        phase: str = "Running",
    ) -> JsonObj:
        """Create a pod (default Running) and return a copy of it."""
        pod: JsonObj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels or {}),
                "annotations": dict(annotations or {}),
            },
            "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
            "status": {"phase": phase},
        }
        return copy.deepcopy(self._create(("", "v1", "pods"), namespace, pod))

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        """Move a pod to ``phase`` (e.g. Pending -> Running), as the kubelet would."""
        obj = self._get(("", "v1", "pods"), namespace, name)
        new = copy.deepcopy(obj)
        new["status"] = {**new.get("status", {}), "phase": phase}
        self._put(("", "v1", "pods"), namespace, new)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod."""
        self._delete(("", "v1", "pods"), namespace, name)

    def add_deployment(
        self,
        namespace: str,
        name: str,
        *,
        replicas: int = 3,
        labels: Mapping[str, str] | None = None,
        kind: str = "Deployment",
        annotations: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Create a Deployment (or StatefulSet/DaemonSet via ``kind``) selecting
        ``labels`` (default ``app=<name>``) and its ``replicas`` Running pods; return the
        pod names."""
        plural = _PLURAL_OF_KIND[kind]
        labels = dict(labels or {"app": name})
        workload: JsonObj = {
            "apiVersion": _RESOURCES[plural][1],
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels), "annotations": dict(annotations or {})},
                    "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
                },
            },
        }
        if kind == "DaemonSet":
            del workload["spec"]["replicas"]
        self._create(plural, namespace, workload)
        suffix = uuid.uuid4().hex[:5]
        names = []
        for i in range(replicas):
            pod_name = f"{name}-{suffix}-{i}"
            self.add_pod(namespace, pod_name, labels=labels, annotations=annotations)
            names.append(pod_name)
        return names

    def pod(self, namespace: str, name: str) -> JsonObj:
        """A copy of a pod (KeyError when absent)."""
        return copy.deepcopy(self._get(("", "v1", "pods"), namespace, name))

    def pods(self, namespace: str) -> list[JsonObj]:
        """Copies of every pod in ``namespace``."""
        return [
            copy.deepcopy(o)
            for (r, ns, _), o in sorted(self._store.objects.items())
            if r == "/v1/pods" and ns == namespace
        ]

    def workload(self, kind: str, namespace: str, name: str) -> JsonObj:
        """A copy of a Deployment/StatefulSet/DaemonSet."""
        return copy.deepcopy(self._get(_PLURAL_OF_KIND[kind], namespace, name))

    def lease(self, namespace: str, name: str) -> JsonObj | None:
        """A copy of a Lease, or None."""
        key = _key(("coordination.k8s.io", "v1", "leases"), namespace, name)
        obj = self._store.objects.get(key)
        return copy.deepcopy(obj) if obj else None

    def events(self, namespace: str | None = None) -> list[JsonObj]:
        """Copies of the Events created (optionally only in ``namespace``)."""
        return [
            copy.deepcopy(o)
            for (r, ns, _), o in self._store.objects.items()
            if r == "/v1/events" and namespace in (None, ns)
        ]

    def compact(self) -> None:
        """Forget the watch history: a watch from any older resourceVersion gets 410."""
        self._floor = self._rv + 1
        self._log.clear()

    # --- the store -------------------------------------------------------------

    def _bump(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, type_: str, key: tuple[str, str, str], obj: JsonObj) -> None:
        self._log.append(_WatchEvent(int(obj["metadata"]["resourceVersion"]), type_, key, obj))
        for waiter in self._waiters:
            waiter.set()

    def _get(self, res: tuple[str, str, str], ns: str, name: str) -> JsonObj:
        obj = self._store.objects.get(_key(res, ns, name))
        if obj is None:
            raise ApiError(404, f'{res[2]} "{name}" not found', name=name, kind=res[2])
        return obj

    def _create(self, res: tuple[str, str, str], ns: str, obj: JsonObj) -> JsonObj:
        kind, api_version = _RESOURCES[res]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        _validate(obj, kind)
        key = _key(res, ns, meta["name"])
        if key in self._store.objects:
            raise ApiError(
                409, f'{res[2]} "{meta["name"]}" already exists', name=meta["name"], kind=res[2]
            )
        obj["kind"], obj["apiVersion"] = kind, api_version
        meta.update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=str(self._bump()),
        )
        if res[0] == "apps":
            meta.setdefault("generation", 1)
        self._store.objects[key] = obj
        self._emit("ADDED", key, obj)
        return obj

    def _put(self, res: tuple[str, str, str], ns: str, obj: JsonObj) -> JsonObj:
        kind, api_version = _RESOURCES[res]
        _validate(obj, kind)
        name = obj["metadata"]["name"]
        old = self._get(res, ns, name)
        want_rv = obj["metadata"].get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {res[2]} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                name=name,
                kind=res[2],
            )
        new = copy.deepcopy(obj)
        new["kind"], new["apiVersion"] = kind, api_version
        for immutable in ("uid", "creationTimestamp", "namespace"):
            new["metadata"][immutable] = old["metadata"].get(immutable, ns)
        if new == old:
            return old  # no-op writes do not bump the resourceVersion, as on a real server
        if "generation" in old["metadata"]:
            spec_changed = new.get("spec") != old.get("spec")
            new["metadata"]["generation"] = old["metadata"]["generation"] + int(spec_changed)
        new["metadata"]["resourceVersion"] = str(self._bump())
        key = _key(res, ns, name)
        self._store.objects[key] = new
        self._emit("MODIFIED", key, new)
        return new

    def _delete(self, res: tuple[str, str, str], ns: str, name: str) -> JsonObj:
        obj = self._get(res, ns, name)
        key = _key(res, ns, name)
        del self._store.objects[key]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._emit("DELETED", key, gone)
        return gone

    def _list(self, res: tuple[str, str, str], ns: str | None, selector: str) -> list[JsonObj]:
        prefix = _key(res, "", "")[0]
        return [
            o
            for (r, n, _), o in sorted(self._store.objects.items())
            if r == prefix
            and ns in (None, n)
            and selector_matches(selector, o["metadata"].get("labels") or {})
        ]

    # --- HTTP ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        try:
            body: Any = None
            raw = await request.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise ApiError(400, f"request body is not JSON: {exc}") from exc
            res, ns, name, subresource = _parse_path(request.path)
            verb = _verb(
                request.method, name, request.query.get("watch", "").lower() in ("true", "1")
            )
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    verb=verb,
                    path=request.path,
                    query=dict(request.query),
                    content_type=request.headers.get("Content-Type", ""),
                    body=body,
                    at=arrived,
                    user_agent=request.headers.get("User-Agent", ""),
                )
            )
            fault = self._take_fault(f"{verb} {request.path}")
            if fault is not None:
                return await self._inject(request, fault, verb)
            if subresource:
                raise ApiError(404, f"subresource {subresource!r} is not emulated")
            return await self._serve(request, verb, res, ns, name, body)
        except ApiError as err:
            return web.json_response(
                status_body(err.code, err.message, name=err.name, kind=err.kind), status=err.code
            )

    def _take_fault(self, route: str) -> _Fault | None:
        for fault in self._faults:
            if fault.times > 0 and fnmatch.fnmatchcase(route, fault.pattern):
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _inject(self, request: web.Request, fault: _Fault, verb: str) -> web.StreamResponse:
        if fault.status == DROP:
            assert request.transport is not None
            request.transport.close()
            # The handler's answer goes nowhere: the client sees the connection close.
            raise asyncio.CancelledError
        code = int(fault.status)
        if verb == "watch" and code == 410:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            event = {"type": "ERROR", "object": status_body(410, "too old resource version")}
            await resp.write(json.dumps(event).encode() + b"\n")
            await resp.write_eof()
            return resp
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        return web.json_response(
            status_body(code, f"injected fault {code}"), status=code, headers=headers
        )

    async def _serve(
        self,
        request: web.Request,
        verb: str,
        res: tuple[str, str, str],
        ns: str | None,
        name: str,
        body: Any,
    ) -> web.StreamResponse:
        kind, api_version = _RESOURCES[res]
        if verb == "watch":
            return await self._watch(request, res, ns)
        if verb == "list":
            items = self._list(res, ns, request.query.get("labelSelector", ""))
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self._rv)},
                    "items": items,
                }
            )
        if ns is None:
            raise ApiError(405, f"{verb} needs a namespace")
        if verb == "get":
            return web.json_response(self._get(res, ns, name))
        if verb == "create":
            if not isinstance(body, dict):
                raise ApiError(400, "body must be an object")
            return web.json_response(self._create(res, ns, body), status=201)
        if verb == "update":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "the body's metadata.name must match the URL")
            return web.json_response(self._put(res, ns, body))
        if verb == "patch":
            return web.json_response(self._patch(request, res, ns, name, body))
        if verb == "delete":
            return web.json_response(self._delete(res, ns, name))
        raise ApiError(405, f"{request.method} is not allowed here")

    def _patch(
        self, request: web.Request, res: tuple[str, str, str], ns: str, name: str, body: Any
    ) -> JsonObj:
        old = self._get(res, ns, name)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        if ctype == "application/merge-patch+json":
            new = merge_patch(old, body)
        elif ctype == "application/strategic-merge-patch+json":
            new = strategic_merge_patch(old, body)
        elif ctype == "application/json-patch+json":
            new = json_patch(old, body)
        else:
            raise ApiError(415, f"the body of the request was in an unknown format: {ctype}")
        if not isinstance(new, dict):
            raise ApiError(422, "a patch must leave an object")
        # A resourceVersion in the patch is a precondition, as on the real server.
        patch_rv = (new.get("metadata") or {}).get("resourceVersion")
        if patch_rv != old["metadata"]["resourceVersion"]:
            new.setdefault("metadata", {})["resourceVersion"] = patch_rv
        else:
            new["metadata"].pop("resourceVersion", None)
        new.setdefault("metadata", {})["name"] = name
        return self._put(res, ns, new)

    async def _watch(
        self, request: web.Request, res: tuple[str, str, str], ns: str | None
    ) -> web.StreamResponse:
        selector = request.query.get("labelSelector", "")
        selector_matches(selector, {})  # a bad selector fails before the stream starts
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        rv_param = request.query.get("resourceVersion", "")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        prefix = _key(res, "", "")[0]
        kind, api_version = _RESOURCES[res]

        async def send(type_: str, obj: JsonObj) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if rv_param in ("", "0"):
            # No resourceVersion: synthetic ADDED events for what exists, then changes.
            since = self._rv
            for obj in self._list(res, ns, selector):
                await send("ADDED", obj)
        else:
            since = int(rv_param)
            if since < self._floor or since > self._rv:
                await send("ERROR", status_body(410, f"too old resource version: {since}"))
                await resp.write_eof()
                return resp
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + self._bookmark_interval_s
        wake = asyncio.Event()
        self._waiters.add(wake)
        try:
            await self._stream(
                send,
                wake,
                since=since,
                deadline=deadline,
                next_bookmark=next_bookmark,
                prefix=prefix,
                ns=ns,
                selector=selector,
                bookmark_kind=(kind, api_version) if bookmarks else None,
            )
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away: that ends a watch
        finally:
            self._waiters.discard(wake)
        return resp

    async def _stream(
        self,
        send: Any,
        wake: asyncio.Event,
        *,
        since: int,
        deadline: float,
        next_bookmark: float,
        prefix: str,
        ns: str | None,
        selector: str,
        bookmark_kind: tuple[str, str] | None,
    ) -> None:
        while not self._closing:
            wake.clear()
            # The log is in resourceVersion order: walk back to the first unseen event
            # instead of scanning the whole history on every wake (O(new), not O(history)).
            fresh: list[_WatchEvent] = []
            for ev in reversed(self._log):
                if ev.rv <= since:
                    break
                fresh.append(ev)
            for ev in reversed(fresh):
                since = ev.rv
                r, n, _ = ev.key
                labels = ev.obj["metadata"].get("labels") or {}
                if r == prefix and ns in (None, n) and selector_matches(selector, labels):
                    await send(ev.type, ev.obj)
            now = time.monotonic()
            if now >= deadline:
                break
            if bookmark_kind is not None and now >= next_bookmark:
                since = max(since, self._rv)
                kind, api_version = bookmark_kind
                meta = {"resourceVersion": str(since)}
                await send("BOOKMARK", {"kind": kind, "apiVersion": api_version, "metadata": meta})
                next_bookmark = now + self._bookmark_interval_s
            wait = min(deadline, next_bookmark if bookmark_kind else deadline) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(wait, 0.001))


def _key(res: tuple[str, str, str], ns: str, name: str) -> tuple[str, str, str]:
    return (f"{res[0]}/{res[1]}/{res[2]}", ns, name)


_PATH_RE = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def _parse_path(path: str) -> tuple[tuple[str, str, str], str | None, str, str]:
    m = _PATH_RE.match(path)
    if not m:
        raise ApiError(404, f"the server could not find the requested resource ({path})")
    group = m.group("group") or ""
    version = m.group("core") or m.group("version")
    res = (group, version, m.group("plural"))
    if res not in _RESOURCES:
        raise ApiError(404, f"the server could not find the requested resource ({path})")
    return res, m.group("ns"), m.group("name") or "", m.group("sub") or ""


def _verb(method: str, name: str, watch: bool) -> str:
    if method == "GET":
        return "get" if name else ("watch" if watch else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )
