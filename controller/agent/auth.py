"""Who may read ``/v1/usage``: a bearer token that the API server vouches for (a
``TokenReview`` with the audience ``detnet-agent``) and whose service account is on the
allow list. No or a malformed token, or one the API server rejects: 401. A valid token
of any other account: 403. The API server unreachable: 503 (the caller may retry; a
failure to check is never cached as a "no").

Results are cached by a hash of the token (the token itself is not kept): a "yes" for
``positive_ttl_s`` but never past the token's own ``exp``, a "no" for
``negative_ttl_s``; at most ``max_entries``, least recently used first out. At most
``max_in_flight`` reviews run at once, and concurrent requests with one token share one
review, so a flood of made-up tokens costs the API server a bounded rate, not one call
per request.

The cache and the decision are sans-I/O (time comes from the injected clocks); the
review itself is an injected coroutine (``token_reviewer`` makes the real one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from detnet.controller.errors import ControllerError
from detnet.engine.parse import ParseError, show

if TYPE_CHECKING:
    from detnet.controller.kube.api import KubeClient

AUDIENCE = "detnet-agent"
CONTROLLER_ACCOUNT = ("detnet-system", "detnet-controller")
MAX_TOKEN_CHARS = 16 * 1024  # a projected service-account JWT is 1-2 KiB
# RFC 6750 b64token; the scheme is case-insensitive (RFC 7235).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")
_SA_PREFIX = "system:serviceaccount:"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class ReviewUnavailable(ControllerError):
    """The token could not be checked now (API server unreachable or refusing)."""


@dataclass(frozen=True)
class Review:
    """What the API server said about a token."""

    authenticated: bool
    username: str = ""
    error: str = ""


@dataclass(frozen=True)
class AuthDecision:
    """The answer to one request: ``status`` 200, 401, 403 or 503; ``reason`` for the
    log and the metrics (``ok``, ``no_token``, ``malformed``, ``invalid``,
    ``forbidden``, ``unavailable``, ``busy``); ``subject`` the account when known."""

    status: int
    reason: str
    subject: str = ""


Reviewer = Callable[[str], Awaitable[Review]]


def parse_account(text: str) -> tuple[str, str]:
    """``NAMESPACE:SERVICEACCOUNT`` -> (namespace, name); ParseError otherwise."""
    ns, sep, name = text.partition(":")
    if not sep or not _DNS1123_LABEL.fullmatch(ns) or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise ParseError(
            "expected NAMESPACE:SERVICEACCOUNT (lower-case DNS names, e.g. "
            "detnet-system:detnet-controller)"
        )
    return ns, name


def service_account(username: str) -> tuple[str, str] | None:
    """(namespace, name) of ``system:serviceaccount:NS:NAME``; None for other users."""
    if not username.startswith(_SA_PREFIX):
        return None
    ns, sep, name = username[len(_SA_PREFIX) :].partition(":")
    return (ns, name) if sep and ns and name and ":" not in name else None


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), unverified: only ever used to cache a
    reviewed token for less time. None for a token that is not a JWT with one."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > MAX_TOKEN_CHARS:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def review_from_response(obj: Mapping[str, Any], *, audience: str) -> Review:
    """A ``Review`` from a TokenReview response. The API server answers with the
    audiences it found the token valid for; one that does not name ours is a no
    (kube docs: a reviewer that sets audiences must check them)."""
    status = obj.get("status")
    if not isinstance(status, Mapping):
        return Review(authenticated=False, error="no status in the TokenReview response")
    error = status.get("error")
    error = error if isinstance(error, str) else ""
    if status.get("authenticated") is not True:
        return Review(authenticated=False, error=error or "not authenticated")
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audience not in audiences:
        return Review(authenticated=False, error=f"token is not for the audience {audience}")
    user = status.get("user")
    username = user.get("username") if isinstance(user, Mapping) else None
    if not isinstance(username, str) or not username:
        return Review(authenticated=False, error="no username in the TokenReview response")
    return Review(authenticated=True, username=username)


class ReviewCache:
    """Reviews by token hash, with expiry and a size bound (sans-I/O: pass ``now``)."""

    def __init__(self, *, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, Review]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, *, now: float) -> Review | None:
        """The cached review, None when absent or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, review = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return review

    def put(self, key: bytes, review: Review, *, now: float, ttl_s: float) -> None:
        """Keep ``review`` for ``ttl_s`` (nothing when it is not positive)."""
        if ttl_s <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (now + ttl_s, review)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class Authenticator:
    """Decides each request from its ``Authorization`` header (module docstring).
    Runs on one event loop; ``counts`` holds the decisions by reason and
    ``reviews`` the TokenReviews made."""

    def __init__(
        self,
        *,
        review: Reviewer,
        allow: Collection[tuple[str, str]] = (CONTROLLER_ACCOUNT,),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        positive_ttl_s: float = 30.0,
        negative_ttl_s: float = 5.0,
        max_entries: int = 1024,
        max_in_flight: int = 8,
        review_timeout_s: float = 2.0,
    ) -> None:
        if not allow:
            raise ValueError("the allow list is empty: nobody could read usage")
        self._review = review
        self.allow = frozenset(allow)
        self._clock, self._wall = clock, wall
        self._positive_ttl_s = positive_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_in_flight = max_in_flight
        self._timeout_s = review_timeout_s
        self.cache = ReviewCache(max_entries=max_entries)
        self._in_flight: dict[bytes, asyncio.Future[Review]] = {}
        self.counts: Counter[str] = Counter()
        self.reviews = 0
        self.cache_hits = 0

    async def authenticate(self, header: str | None) -> AuthDecision:
        """The decision for one request's ``Authorization`` header (None: absent)."""
        decision = await self._decide(header)
        self.counts[decision.reason] += 1
        return decision

    async def _decide(self, header: str | None) -> AuthDecision:
        if not header:
            return AuthDecision(401, "no_token")
        if len(header) > MAX_TOKEN_CHARS + 16 or not (m := _BEARER.fullmatch(header)):
            return AuthDecision(401, "malformed")
        token = m.group(1)
        key = hashlib.sha256(token.encode()).digest()
        review = self.cache.get(key, now=self._clock())
        if review is not None:
            self.cache_hits += 1
        else:
            try:
                review = await self._shared_review(key, token)
            except ReviewUnavailable:
                return AuthDecision(503, "unavailable")
            except _Busy:
                return AuthDecision(503, "busy")
        if not review.authenticated:
            return AuthDecision(401, "invalid")
        account = service_account(review.username)
        if account is None or account not in self.allow:
            return AuthDecision(403, "forbidden", review.username)
        return AuthDecision(200, "ok", f"{account[0]}:{account[1]}")

    async def _shared_review(self, key: bytes, token: str) -> Review:
        pending = self._in_flight.get(key)
        if pending is None:
            if len(self._in_flight) >= self._max_in_flight:
                raise _Busy
            pending = asyncio.ensure_future(self._review_and_cache(key, token))
            self._in_flight[key] = pending
            pending.add_done_callback(lambda f: self._finished(key, f))
        # Shielded: one caller going away must not cancel the review the others await.
        return await asyncio.shield(pending)

    def _finished(self, key: bytes, future: asyncio.Future[Review]) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here: every waiter may have gone away

    async def _review_and_cache(self, key: bytes, token: str) -> Review:
        self.reviews += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                review = await self._review(token)
        except TimeoutError as exc:
            raise ReviewUnavailable(f"no TokenReview answer within {self._timeout_s} s") from exc
        now = self._clock()
        if review.authenticated:
            ttl = self._positive_ttl_s
            exp = token_expiry(token)
            if exp is not None:
                ttl = min(ttl, exp - self._wall())
        else:
            ttl = self._negative_ttl_s
        self.cache.put(key, review, now=now, ttl_s=ttl)
        return review


class _Busy(Exception):
    """Too many distinct tokens under review at once."""


def token_reviewer(kube: KubeClient, *, audience: str = AUDIENCE) -> Reviewer:
    """The real reviewer: ``POST /apis/authentication.k8s.io/v1/tokenreviews`` through
    ``kube`` (its limiter and a short retry); ReviewUnavailable when that fails."""
    from kubernetes_asyncio.client import AuthenticationV1Api

    from detnet.controller.errors import EnforcementError
    from detnet.controller.retry import RetryPolicy

    api = AuthenticationV1Api(kube.api_client)
    retry = RetryPolicy(attempts=2, base_s=0.05, cap_s=0.2)

    async def review(token: str) -> Review:
        # A plain dict: the client sends it as JSON as it is (no model round trip).
        body: Any = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        try:
            obj = await kube.call(
                "create tokenreview",
                lambda: api.create_token_review(body, _preload_content=False),
                retry=retry,
            )
        except EnforcementError as exc:
            raise ReviewUnavailable(str(exc)) from exc
        return review_from_response(obj, audience=audience)

    return review


def describe_allow(allow: Collection[tuple[str, str]]) -> str:
    """The allow list for a log line."""
    return ", ".join(show(f"{ns}:{sa}") for ns, sa in sorted(allow))
