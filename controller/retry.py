"""Kubernetes API errors in our own small hierarchy, and the one retry loop for them.

kubernetes-asyncio raises ``ApiException`` (any HTTP status) or aiohttp/asyncio errors
(transport). ``classify()`` turns each into an ``EnforcementError`` subclass with a
message a user can act on; ``call_with_retry()`` retries what may succeed on a second try
(5xx, 429 honouring ``Retry-After``, timeouts, connection errors) on a capped exponential
backoff with jitter, and never what cannot (404, 409, 410, 422, 4xx in general).
Every failed attempt is counted through ``on_api_error(code)`` (the loop feeds
``detnet_api_errors_total{code}``): the HTTP status as a string, ``"connection"`` for
transport errors and timeouts.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException

from detnet.controller.errors import EnforcementError

log = logging.getLogger(__name__)

T = TypeVar("T")
ApiErrorHook = Callable[[str], None]


class KubernetesApiError(EnforcementError):
    """A Kubernetes API call that failed; ``code`` is the metric label."""

    def __init__(self, message: str, *, code: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class NotFound(KubernetesApiError):
    """404: the object does not exist (not retried)."""


class Conflict(KubernetesApiError):
    """409: stale resourceVersion or already exists (re-read, do not blindly retry)."""


class Gone(KubernetesApiError):
    """410: a watch's resourceVersion is too old; re-list."""


class Unprocessable(KubernetesApiError):
    """422: the server rejected the object as invalid (not retried)."""


class Forbidden(KubernetesApiError):
    """401/403: the service account lacks a permission (see docs/kubernetes.md, RBAC)."""


class TooManyRequests(KubernetesApiError):
    """429: the server asked us to slow down (retried after ``Retry-After``)."""


class ApiUnavailable(KubernetesApiError):
    """5xx, timeouts and connection errors: the API server could not be reached or failed."""


_BY_STATUS: dict[int, type[KubernetesApiError]] = {
    401: Forbidden,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Unprocessable,
    429: TooManyRequests,
}

RETRYABLE: tuple[type[KubernetesApiError], ...] = (TooManyRequests, ApiUnavailable)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "no message")


async def read_json(resp: aiohttp.ClientResponse, *, what: str) -> dict[str, Any]:
    """The JSON object of a raw (``_preload_content=False``) API response.

    We skip kubernetes-asyncio's model round trip, so a non-2xx status is raised here as
    the ApiException the client would have raised (``classify`` handles both alike)."""
    try:
        data = await resp.read()
        if not 200 <= resp.status <= 299:
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body, exc.headers = data, resp.headers
            raise exc
    finally:
        resp.release()
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise EnforcementError(f"{what}: the API server sent invalid JSON") from exc
    if not isinstance(obj, dict):
        raise EnforcementError(f"{what}: the API server sent {type(obj).__name__}, not an object")
    return obj


def classify(exc: BaseException, *, what: str) -> KubernetesApiError:
    """Our error for ``exc`` raised while doing ``what`` (e.g. "patch pod be/web-0")."""
    if isinstance(exc, KubernetesApiError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        headers: Any = exc.headers or {}
        retry_after = parse_retry_after(headers.get("Retry-After"))
        cls = _BY_STATUS.get(status)
        if cls is None:
            cls = ApiUnavailable if status >= 500 or status == 0 else KubernetesApiError
        hint = ""
        if cls is Forbidden:
            hint = " (grant the RBAC permission listed in docs/kubernetes.md)"
        return cls(
            f"{what}: HTTP {status} {_status_message(exc)}{hint}",
            code=str(status),
            retry_after_s=retry_after,
        )
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ClientError | OSError):
        return ApiUnavailable(
            f"{what}: API server unreachable ({type(exc).__name__}: {exc})", code="connection"
        )
    raise TypeError(f"not an API error: {exc!r}") from exc


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter: try ``attempts`` times in all."""

    attempts: int = 6
    base_s: float = 0.05
    cap_s: float = 5.0
    max_retry_after_s: float = 30.0  # never sleep longer than this on a server's say-so

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): half fixed, half random."""
        delay = min(self.cap_s, self.base_s * (2 ** (attempt - 1)))
        return delay / 2 + random.uniform(0, delay / 2)


async def call_with_retry(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    policy: RetryPolicy | None = None,
    on_api_error: ApiErrorHook | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> T:
    """Run ``op()`` until it succeeds, retrying transient API failures.

    Raises the classified error (a ``KubernetesApiError``) at once when it is not
    retryable, or the last one when the attempts are used up."""
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except (TimeoutError, ApiException, aiohttp.ClientError, OSError) as exc:
            err = classify(exc, what=what)
            cause: BaseException = exc
        except KubernetesApiError as exc:
            err, cause = exc, exc.__cause__ or exc
        if on_api_error is not None:
            on_api_error(err.code)
        if not isinstance(err, RETRYABLE) or attempt >= policy.attempts:
            if isinstance(err, RETRYABLE) and attempt > 1:
                err = type(err)(
                    f"{err} (gave up after {attempt} attempts)",
                    code=err.code,
                    retry_after_s=err.retry_after_s,
                )
            if cause is err:
                raise err
            raise err from cause
        delay = policy.backoff(attempt)
        if err.retry_after_s is not None:
            delay = max(delay, min(err.retry_after_s, policy.max_retry_after_s))
        log.debug("%s failed (%s); retry %d in %.3fs", what, err.code, attempt, delay)
        await sleep(delay)
