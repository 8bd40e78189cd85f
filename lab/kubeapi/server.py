"""The emulated API server's HTTP side: aiohttp routes for every served resource (get,
list, watch, create, update, patch, delete, deletecollection, the ``status`` and
``serviceaccounts/token`` subresources, TokenReview creation), discovery, programmable
faults and the record of requests. ``ApiServerEmulator`` is the public face: the cluster
state of ``Cluster`` served over HTTP on 127.0.0.1.

Routes are matched as ``"<verb> <path>"`` with shell wildcards, where verb is the
Kubernetes verb (get, list, watch, create, update, patch, delete, deletecollection), e.g.
``api.fail("patch /api/v1/namespaces/*/pods/*", 500, times=2)``.

Only aiohttp and the standard library are imported at module level; kubernetes-asyncio is
imported lazily by ``client_configuration()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from detnet.lab.kubeapi import discovery
from detnet.lab.kubeapi.auth import DEFAULT_AUDIENCES
from detnet.lab.kubeapi.cluster import Cluster
from detnet.lab.kubeapi.errors import ApiError, status_body
from detnet.lab.kubeapi.patch import clone, json_patch, merge_patch, strategic_merge_patch
from detnet.lab.kubeapi.resources import Resource, Route, check_verb, parse_path, verb_of
from detnet.lab.kubeapi.selectors import Selection
from detnet.lab.kubeapi.store import JsonObj
from detnet.lab.kubeapi.strategy import prepare_create, prepare_update
from detnet.lab.kubeapi.validation import check_types

DROP = "drop"
"""Pass as ``status`` to ``fail()`` to close the connection without any response."""

_Send = Callable[[str, JsonObj], Awaitable[None]]
_HEALTH = ("/healthz", "/livez", "/readyz")
_PATCHES: dict[str, Callable[[Any, Any], Any]] = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge_patch,
    "application/json-patch+json": json_patch,
}


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


def _true(value: str) -> bool:
    return value.lower() in ("true", "1")


def _list_item(obj: JsonObj) -> JsonObj:
    # Items of a real list response carry no kind/apiVersion: the list says them once.
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


class ApiServerEmulator(Cluster):
    """The emulated API server: ``async with ApiServerEmulator() as api: ... api.url``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        bookmark_interval_s: float = 0.5,
        history: int = 10_000,
        service_cidr: str = "198.19.240.0/20",
        api_audiences: Sequence[str] = DEFAULT_AUDIENCES,
    ) -> None:
        super().__init__(history=history, service_cidr=service_cidr, api_audiences=api_audiences)
        self._host = host
        self._bookmark_interval_s = bookmark_interval_s
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

    async def start(self, *, sock: socket.socket | None = None) -> None:
        """Listen on an ephemeral port of ``host``, or on ``sock``: a bound TCP socket
        made elsewhere (the cluster lab makes it inside its control-plane namespace)."""
        app = web.Application(client_max_size=3 * 1024 * 1024)  # the real server's limit
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        if sock is None:
            site: web.BaseSite = web.TCPSite(self._runner, self._host, 0)
            await site.start()
            host, port = self._host, self._runner.addresses[0][1]
        else:
            site = web.SockSite(self._runner, sock)
            await site.start()
            host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

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

        return Configuration(host=self.url)

    def kubeconfig(self, *, user: str = "detnet", token: str = "not-a-secret") -> str:
        """A kubeconfig document pointing at this server, for another process."""
        return (
            "apiVersion: v1\n"
            "kind: Config\n"
            f'clusters: [{{name: emulator, cluster: {{server: "{self.url}"}}}}]\n'
            f"users: [{{name: {user}, user: {{token: {json.dumps(token)}}}}}]\n"
            f"contexts: [{{name: emulator, context: {{cluster: emulator, user: {user}}}}}]\n"
            "current-context: emulator\n"
        )

    # --- faults ------------------------------------------------------------------

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

    # --- HTTP ----------------------------------------------------------------------

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
            route: Route | None = None
            doc = discovery.document(request.path, server_address=self.url.removeprefix("http://"))
            if doc is not None or request.path in _HEALTH:
                verb = "get"
            else:
                route = parse_path(request.path)
                verb = verb_of(request.method, route.name, _true(request.query.get("watch", "")))
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
            if route is None:
                if request.method != "GET":
                    raise ApiError(405, f"{request.method} is not allowed on {request.path}")
                return web.json_response(doc) if doc is not None else web.Response(text="ok")
            check_verb(route, verb, request.method)
            return await self._serve(request, verb, route, body)
        except ApiError as err:
            return web.json_response(
                status_body(err.code, err.message, name=err.name, kind=err.kind), status=err.code
            )

    def _selection(self, request: web.Request, res: Resource) -> Selection:
        return Selection.parse(
            res,
            labels=request.query.get("labelSelector", ""),
            fields=request.query.get("fieldSelector", ""),
        )

    async def _serve(
        self, request: web.Request, verb: str, route: Route, body: Any
    ) -> web.StreamResponse:
        res, ns, name = route.res, route.namespace, route.name
        if verb == "watch":
            return await self._watch(request, res, ns, self._selection(request, res))
        if verb == "list":
            # ``limit`` is not honoured: the API lets a server return everything at once.
            if request.query.get("continue"):
                raise ApiError(400, "continue key is not valid: this server never issued one")
            selection = self._selection(request, res)
            items = self._store.select(res, ns, selection.predicate(res))
            return web.json_response(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {"resourceVersion": str(self._store.rv)},
                    "items": [_list_item(o) for o in items],
                }
            )
        ns = ns or ""
        if verb == "get":
            return web.json_response(self._store.get(res, ns, name))
        if verb == "create":
            return web.json_response(self._create(route, body), status=201)
        if verb in ("update", "patch"):
            return web.json_response(self._update(request, route, body, verb=verb))
        if verb == "delete":
            return web.json_response(self._delete(res, ns, name, body))
        if verb == "deletecollection":
            selection = self._selection(request, res)
            for obj in list(self._store.select(res, route.namespace, selection.predicate(res))):
                meta = obj["metadata"]
                self._delete(res, meta.get("namespace", ""), meta["name"], body)
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
            )
        raise ApiError(405, f"{request.method} is not allowed here")

    def _create(self, route: Route, body: Any) -> JsonObj:
        res, ns = route.res, route.namespace or ""
        if res.kind == "TokenReview":
            return self.review_token(body)
        if route.subresource == "token":
            return self.token_request(ns, route.name, body)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be an object")
        if body.get("kind") not in (None, "", res.kind):
            raise ApiError(400, f"a {body.get('kind')} cannot be created as {res.plural}")
        check_types(body)
        return self._store_object(res, ns, prepare_create(res, body, namespace=ns))

    def _update(self, request: web.Request, route: Route, body: Any, *, verb: str) -> JsonObj:
        res, ns, name = route.res, route.namespace or "", route.name
        old = self._store.get(res, ns, name)
        if verb == "update":
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "the body's metadata.name must match the URL")
            check_types(body)
            new = body
        else:
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            apply = _PATCHES.get(ctype)
            if apply is None:
                raise ApiError(415, f"the body of the request was in an unknown format: {ctype}")
            new = apply(clone(old), body)  # the patch functions share subtrees
            if not isinstance(new, dict):
                raise ApiError(422, "a patch must leave an object")
            check_types(new, code=422)
            # A resourceVersion in the patch is a precondition, as on the real server.
            meta = new.setdefault("metadata", {})
            if meta.get("resourceVersion") == old["metadata"]["resourceVersion"]:
                meta.pop("resourceVersion", None)
            meta["name"] = name
        return self._store_object(
            res, ns, prepare_update(res, new, old, subresource=route.subresource), replace=True
        )

    def _delete(self, res: Resource, ns: str, name: str, options: Any) -> JsonObj:
        obj = self._store.get(res, ns, name)
        options = options if isinstance(options, dict) else {}
        pre = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if pre.get(field) and pre[field] != obj["metadata"].get(field):
                raise ApiError(
                    409,
                    f"Precondition failed: {field} in precondition: {pre[field]}, "
                    f"{field} in object meta: {obj['metadata'].get(field)}",
                    name=name,
                    kind=res.plural,
                )
        if options.get("propagationPolicy") == "Orphan" or options.get("orphanDependents"):
            self._gc.orphan(obj["metadata"]["uid"])
        gone = self._store.delete(res, ns, name)
        if res.returns_deleted:
            return gone
        details = {
            "name": name,
            "group": res.group,
            "kind": res.plural,
            "uid": obj["metadata"]["uid"],
        }
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    # --- watch ---------------------------------------------------------------------

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None, selection: Selection
    ) -> web.StreamResponse:
        try:
            timeout = float(request.query.get("timeoutSeconds", "1800"))
        except ValueError as exc:
            raise ApiError(400, f"timeoutSeconds must be a number: {exc}") from exc
        bookmarks = _true(request.query.get("allowWatchBookmarks", ""))
        rv_param = request.query.get("resourceVersion", "")
        if rv_param not in ("", "0") and not rv_param.isdigit():
            raise ApiError(400, f"resourceVersion must be a number, got {rv_param!r}")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(type_: str, obj: JsonObj) -> None:
            await resp.write(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

        selected = selection.predicate(res)
        if rv_param in ("", "0"):
            # No resourceVersion: synthetic ADDED events for what exists, then changes.
            since = self._store.rv
            for obj in self._store.select(res, ns, selected):
                await send("ADDED", obj)
        else:
            since = int(rv_param)
            if self._store.expired(since):
                await send(
                    "ERROR",
                    status_body(410, f"too old resource version: {since} ({self._store.rv})"),
                )
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
                selected=selected,
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
        selected: Callable[[JsonObj], bool],
        bookmarks: bool,
    ) -> None:
        next_bookmark = time.monotonic() + self._bookmark_interval_s
        while not self._closing:
            wake.clear()
            for ev in self._store.events_since(since):
                since = ev.rv
                kind_key, n, _ = ev.key
                if kind_key != res.key or ns not in (None, n):
                    continue
                seen = ev.seen_by(selected)
                if seen is not None:
                    await send(*seen)
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
