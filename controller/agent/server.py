"""``GET /v1/usage``: the agent's one API route, served by the engine's bounded HTTP
server (``engine/httpserver.py``: connection table, header and idle deadlines, line
and header limits) beside ``/healthz``, ``/readyz`` and ``/metrics``.

Every request is authenticated first (``auth.py``: 401, 403, 503), so a client without
a valid token learns nothing, not even whether its query would parse. Then the query:
``namespace`` (a DNS label) and ``selector`` (a label selector,
``controller/kube/selectors.py``), each at most once; anything else is a 400 with a
one-line reason. The answer is the latest snapshot, filtered, in the shape of
``wire.py``; 503 before the first sample after the pod list synced.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from detnet.controller.agent.auth import AUDIENCE, AuthDecision
from detnet.controller.agent.sampler import Snapshot
from detnet.controller.agent.wire import PodEncoder, PodUsage, encode_document
from detnet.controller.kube.selectors import LabelSelector, SelectorError, parse_selector
from detnet.engine.parse import escape, show

log = logging.getLogger(__name__)

USAGE_PATH = "/v1/usage"
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PARAMS = ("namespace", "selector")


class QueryError(ValueError):
    """A query string the usage route does not accept; the message says why."""


@dataclass(frozen=True)
class UsageQuery:
    """What a request asks for: pods of one namespace (None: all), matching a selector."""

    namespace: str | None = None
    selector: LabelSelector = field(default_factory=LabelSelector)


def parse_query(params: Mapping[str, str], keys: list[str]) -> UsageQuery:
    """The query from a request's parameters (``keys``: every key as sent, repeats
    included); QueryError otherwise."""
    for key in keys:
        if key not in _PARAMS:
            raise QueryError(f"unknown parameter {show(key)} (use namespace, selector)")
        if keys.count(key) > 1:
            raise QueryError(f"parameter {key} given more than once")
    namespace = params.get("namespace")
    if namespace is not None and not _NAMESPACE.fullmatch(namespace):
        raise QueryError(f"namespace {show(namespace)}: not a namespace name")
    try:
        selector = parse_selector(params.get("selector", ""))
    except SelectorError as exc:
        raise QueryError(f"selector: {exc}") from exc
    return UsageQuery(namespace=namespace, selector=selector)


def selected(snapshot: Snapshot, query: UsageQuery) -> list[int]:
    """The indexes of the pods of ``snapshot`` that ``query`` asks for."""
    ns, sel = query.namespace, query.selector
    return [
        i
        for i, s in enumerate(snapshot.pods)
        if (ns is None or s.pod.namespace == ns) and (sel.empty or sel.matches(s.pod.labels))
    ]


def select(snapshot: Snapshot, query: UsageQuery) -> list[PodUsage]:
    """The pods of ``snapshot`` that ``query`` asks for, as the wire writes them."""
    out = []
    for i in selected(snapshot, query):
        s = snapshot.pods[i]
        pod = s.pod
        r = s.rates
        out.append(
            PodUsage(
                namespace=pod.namespace,
                name=pod.name,
                uid=pod.uid,
                egress_bps=r.egress_bps,
                ingress_bps=r.ingress_bps,
                egress_bps_1s=r.egress_bps_1s,
                ingress_bps_1s=r.ingress_bps_1s,
            )
        )
    return out


_CHALLENGE = f'Bearer realm="{AUDIENCE}"'


class UsageRoute:
    """The handler of ``/v1/usage``; ``requests`` counts the answers by status code."""

    def __init__(
        self,
        *,
        snapshot: Callable[[], Awaitable[Snapshot | None]],
        authenticate: Callable[[str | None], Awaitable[AuthDecision]],
    ) -> None:
        self._snapshot = snapshot
        self._authenticate = authenticate
        self.requests: Counter[str] = Counter()
        # The snapshot last encoded, and each of its pods as JSON: requests between two
        # ticks (and filtered ones) reuse them. Only this server's thread touches it.
        self._encoded: tuple[Snapshot, list[bytes]] | None = None
        self._encoder = PodEncoder()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request."""
        resp = await self._answer(request)
        self.requests[str(resp.status)] += 1
        return resp

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        decision = await self._authenticate(request.headers.get("Authorization"))
        if decision.status == 401:
            challenge = (
                _CHALLENGE
                if decision.reason == "no_token"
                else (f'{_CHALLENGE}, error="invalid_token"')
            )
            return _text(401, "a valid bearer token is needed", {"WWW-Authenticate": challenge})
        if decision.status == 403:
            log.info("usage refused to %s: not on the allow list", escape(decision.subject)[:200])
            return _text(403, "this service account may not read usage")
        if decision.status != 200:
            return _text(503, "cannot check the token now; retry", {"Retry-After": "1"})
        try:
            query = parse_query(request.query, [k for k, _ in request.query.items()])
        except QueryError as exc:
            return _text(400, str(exc))
        snap = await self._snapshot()
        if snap is None:
            return _text(503, "no sample yet", {"Retry-After": "1"})
        if self._encoded is None or self._encoded[0] is not snap:
            enc = self._encoder.encode
            fragments = [enc(s.pod.namespace, s.pod.name, s.pod.uid, s.rates) for s in snap.pods]
            self._encoded = (snap, fragments)
        fragments = self._encoded[1]
        chosen = (
            fragments
            if query.namespace is None and query.selector.empty
            else [fragments[i] for i in selected(snap, query)]
        )
        body = encode_document(node=snap.node, at=snap.at, interval_s=snap.interval_s, pods=chosen)
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )


def _text(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=dict(headers or {}))
