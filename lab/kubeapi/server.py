"""The emulated API server's HTTP side: aiohttp routes, programmable faults, the record of
requests, watch streams, and the helpers tests use to set up and read the cluster state.

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
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from detnet.lab.kubeapi.errors import ApiError, status_body
from detnet.lab.kubeapi.patch import json_patch, merge_patch, strategic_merge_patch
from detnet.lab.kubeapi.resources import BY_KIND, BY_PATH, Resource, parse_path, verb_of
from detnet.lab.kubeapi.selectors import selector_matches
from detnet.lab.kubeapi.store import JsonObj, Store

DROP = "drop"
"""Pass as ``status`` to ``fail()`` to close the connection without any response."""

_PODS = BY_PATH[("", "v1", "pods")]
_EVENTS = BY_PATH[("", "v1", "events")]
_LEASES = BY_PATH[("coordination.k8s.io", "v1", "leases")]

_Send = Callable[[str, JsonObj], Awaitable[None]]


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
        self._store = Store(history=history)
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
        self._store.wake_all()
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
        return copy.deepcopy(self._store.create(_PODS, namespace, pod))

    def set_pod_phase(self, namespace: str, name: str, phase: str) -> None:
        """Move a pod to ``phase`` (e.g. Pending -> Running), as the kubelet would."""
        new = copy.deepcopy(self._store.get(_PODS, namespace, name))
        new["status"] = {**new.get("status", {}), "phase": phase}
        self._store.replace(_PODS, namespace, new)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod."""
        self._store.delete(_PODS, namespace, name)

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
        res = BY_KIND[kind]
        labels = dict(labels or {"app": name})
        workload: JsonObj = {
            "apiVersion": res.api_version,
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
        self._store.create(res, namespace, workload)
        suffix = uuid.uuid4().hex[:5]
        names = []
        for i in range(replicas):
            pod_name = f"{name}-{suffix}-{i}"
            self.add_pod(namespace, pod_name, labels=labels, annotations=annotations)
            names.append(pod_name)
        return names

    def pod(self, namespace: str, name: str) -> JsonObj:
        """A copy of a pod (ApiError 404 when absent)."""
        return copy.deepcopy(self._store.get(_PODS, namespace, name))

    def pods(self, namespace: str) -> list[JsonObj]:
        """Copies of every pod in ``namespace``."""
        return [copy.deepcopy(o) for o in self._store.list(_PODS, namespace, "")]

    def workload(self, kind: str, namespace: str, name: str) -> JsonObj:
        """A copy of a Deployment/StatefulSet/DaemonSet."""
        return copy.deepcopy(self._store.get(BY_KIND[kind], namespace, name))

    def lease(self, namespace: str, name: str) -> JsonObj | None:
        """A copy of a Lease, or None."""
        return copy.deepcopy(self._store.find(_LEASES, namespace, name))

    def events(self, namespace: str | None = None) -> list[JsonObj]:
        """Copies of the Events created, oldest first (optionally only in ``namespace``)."""
        return [
            copy.deepcopy(o)
            for (r, ns, _), o in self._store.objects.items()
            if r == _EVENTS.key and namespace in (None, ns)
        ]

    def compact(self) -> None:
        """Forget the watch history: a watch from any older resourceVersion gets 410."""
        self._store.compact()

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
            res, ns, name, subresource = parse_path(request.path)
            verb = verb_of(
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
        res: Resource,
        ns: str | None,
        name: str,
        body: Any,
    ) -> web.StreamResponse:
        if verb == "watch":
            return await self._watch(request, res, ns)
        if verb == "list":
            items = self._store.list(res, ns, request.query.get("labelSelector", ""))
            return web.json_response(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(self._store.rv)},
                    "items": items,
                }
            )
        if ns is None:
            raise ApiError(405, f"{verb} needs a namespace")
        if verb == "get":
            return web.json_response(self._store.get(res, ns, name))
        if verb == "create":
            if not isinstance(body, dict):
                raise ApiError(400, "body must be an object")
            return web.json_response(self._store.create(res, ns, body), status=201)
        if verb == "update":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "the body's metadata.name must match the URL")
            return web.json_response(self._store.replace(res, ns, body))
        if verb == "patch":
            return web.json_response(self._patch(request, res, ns, name, body))
        if verb == "delete":
            return web.json_response(self._store.delete(res, ns, name))
        raise ApiError(405, f"{request.method} is not allowed here")

    def _patch(self, request: web.Request, res: Resource, ns: str, name: str, body: Any) -> JsonObj:
        old = self._store.get(res, ns, name)
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
        return self._store.replace(res, ns, new)

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None
    ) -> web.StreamResponse:
        selector = request.query.get("labelSelector", "")
        selector_matches(selector, {})  # a bad selector fails before the stream starts
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = request.query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        rv_param = request.query.get("resourceVersion", "")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(type_: str, obj: JsonObj) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        if rv_param in ("", "0"):
            # No resourceVersion: synthetic ADDED events for what exists, then changes.
            since = self._store.rv
            for obj in self._store.list(res, ns, selector):
                await send("ADDED", obj)
        else:
            since = int(rv_param)
            if self._store.expired(since):
                await send("ERROR", status_body(410, f"too old resource version: {since}"))
                await resp.write_eof()
                return resp
        wake = self._store.subscribe()
        try:
            await self._stream(
                send,
                wake,
                since=since,
                deadline=time.monotonic() + timeout,
                res=res,
                ns=ns,
                selector=selector,
                bookmarks=bookmarks,
            )
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away: that ends a watch
        finally:
            self._store.unsubscribe(wake)
        return resp

    async def _stream(
        self,
        send: _Send,
        wake: asyncio.Event,
        *,
        since: int,
        deadline: float,
        res: Resource,
        ns: str | None,
        selector: str,
        bookmarks: bool,
    ) -> None:
        next_bookmark = time.monotonic() + self._bookmark_interval_s
        while not self._closing:
            wake.clear()
            for ev in self._store.events_since(since):
                since = ev.rv
                r, n, _ = ev.key
                labels = ev.obj["metadata"].get("labels") or {}
                if r == res.key and ns in (None, n) and selector_matches(selector, labels):
                    await send(ev.type, ev.obj)
            now = time.monotonic()
            if now >= deadline:
                break
            if bookmarks and now >= next_bookmark:
                since = max(since, self._store.rv)
                meta = {"resourceVersion": str(since)}
                await send(
                    "BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
                )
                next_bookmark = now + self._bookmark_interval_s
            wait = min(deadline, next_bookmark if bookmarks else deadline) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=max(wait, 0.001))
