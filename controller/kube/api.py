"""The one way detnet calls the API server: client configuration, an ``ApiClient`` that
names the caller, a client-side QPS limiter, and ``KubeClient``, which puts every call
through that limiter, the retry loop (``controller/retry.py``) and the raw-JSON reader.

The enforcer and the leader elector of one process share a ``KubeClient``, so their
requests together stay within the configured QPS; the lease's calls go first (see
``QpsLimiter.acquire``) so a burst of pod patches can never cost us the lease.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from detnet import native
from detnet.controller.errors import EnforcementError
from detnet.controller.kube import DEFAULT_BURST, DEFAULT_QPS
from detnet.controller.kube.objects import JsonObj
from detnet.controller.retry import (
    ApiErrorHook,
    KubernetesApiError,
    RetryPolicy,
    call_with_retry,
    classify,
    read_json,
)

USER_AGENT_PREFIX = "detnet/"

# What kubernetes-asyncio raises for a kubeconfig it cannot use: besides its own
# ConfigException, YAML errors, and TypeError/KeyError/AssertionError for a file of the
# wrong shape (it walks the YAML without checking types, and asserts on some fields).
_BAD_KUBECONFIG: tuple[type[BaseException], ...] = (
    config.ConfigException,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    AssertionError,
    yaml.YAMLError,
)


async def load_client_configuration(
    *, kubeconfig: str | None = None, context: str | None = None
) -> client.Configuration:
    """In-cluster config when running in a pod, else the kubeconfig (``KUBECONFIG`` or
    ``~/.kube/config``); EnforcementError when neither is usable."""
    conf = client.Configuration()
    try:
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            config.load_incluster_config(client_configuration=conf)
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
            await config.load_kube_config(
                config_file=path, context=context, client_configuration=conf
            )
    except _BAD_KUBECONFIG as exc:
        detail = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise EnforcementError(
            f"no Kubernetes access: not in a pod and no usable kubeconfig ({detail})"
        ) from exc
    return conf


def default_identity() -> str:
    """Who this process is to the API server: the pod name (``POD_NAME``, set from the
    downward API), else host and process id."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def new_api_client(configuration: client.Configuration, *, identity: str) -> client.ApiClient:
    """An ``ApiClient`` whose requests carry ``User-Agent: detnet/<identity>``, so the
    API server's audit log (and the tests) can tell the replicas' requests apart."""
    api = client.ApiClient(configuration)
    api.user_agent = f"{USER_AGENT_PREFIX}{identity}"
    return api


class QpsLimiter:
    """Client-side rate limit: ``qps`` requests per second, bursts up to ``burst``.

    The asyncio side of ``detnet.native.TokenBucket`` (the bucket arithmetic, sans-I/O):
    a caller that finds no token sleeps until the bucket says one is there."""

    def __init__(
        self,
        *,
        qps: float,
        burst: int,
        clock: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._bucket = native.TokenBucket(rate=qps, burst=burst, now_ns=clock())
        self._clock, self._sleep = clock, sleep
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self._bucket.rate

    @property
    def burst(self) -> int:
        """The bucket's size."""
        return int(self._bucket.burst)

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait for one token, first come first served (the lock queues the waiters).

        ``urgent`` takes it at once, borrowing from the bucket when it is empty: the
        queued callers wait for the debt, so the total rate still holds. For the lease,
        which must renew within its deadline however many patches are queued (client-go
        gives leader election a client of its own for the same reason)."""
        if urgent:
            self._bucket.borrow(self._clock())
            return
        async with self._lock:
            while not self._bucket.take(self._clock()):
                await self._sleep(self._bucket.wait_ns(self._clock()) / 1e9)


class KubeClient:
    """An ``ApiClient`` with the limiter, retry policy and error counter that every
    call of this process goes through. Whoever created ``api_client`` closes it."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        retry: RetryPolicy | None = None,
        on_api_error: ApiErrorHook | None = None,
    ) -> None:
        self.api_client = api_client
        self.bucket = QpsLimiter(qps=qps, burst=burst)
        self.retry = retry or RetryPolicy()
        self._on_api_error = on_api_error

    async def call(
        self,
        what: str,
        op: Callable[[], Awaitable[Any]],
        *,
        retry: RetryPolicy | None = None,
        urgent: bool = False,
    ) -> JsonObj:
        """One API call (limiter, retries) whose response is read as a JSON object.

        ``op`` must pass ``_preload_content=False``: we read raw JSON, skipping the
        model round trip, and raise ApiException ourselves for a non-2xx status.
        ``what`` (e.g. "patch pod be/web-0") starts every error message."""

        async def attempt() -> JsonObj:
            await self.bucket.acquire(urgent=urgent)
            return await read_json(await op(), what=what)

        return await call_with_retry(
            attempt, what=what, policy=retry or self.retry, on_api_error=self._on_api_error
        )

    async def stream(self, what: str, op: Callable[[], Awaitable[Any]]) -> aiohttp.ClientResponse:
        """Open a streaming response (a watch), not retried: the caller decides how to
        resume. Raises the classified, counted error for a non-2xx status; the caller
        must ``release()`` the response."""
        await self.bucket.acquire()
        try:
            resp: aiohttp.ClientResponse = await op()
        except (TimeoutError, ApiException, aiohttp.ClientError, OSError) as exc:
            raise self.failed(exc, what=what) from exc
        if not 200 <= resp.status <= 299:
            refused = ApiException(status=resp.status, reason=resp.reason)
            try:
                refused.body, refused.headers = await resp.read(), resp.headers
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass  # the status says enough
            finally:
                resp.release()
            raise self.failed(refused, what=what) from refused
        return resp

    def failed(self, exc: BaseException, *, what: str) -> KubernetesApiError:
        """Classify and count an API failure seen outside ``call()`` (a watch stream
        that broke, an ERROR event); returns the error to raise."""
        err = classify(exc, what=what)
        if self._on_api_error is not None:
            self._on_api_error(err.code)
        return err
