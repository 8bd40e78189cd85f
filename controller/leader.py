"""Lease-based leader election (coordination.k8s.io/v1 Lease), so only one replica patches.

Semantics follow client-go's leaderelection: a candidate takes the lease when it does
not exist, is held by nobody (released) or its holder has not renewed it for
``lease_duration_s`` as *observed locally* (no clock comparison between machines); every
write carries the lease's resourceVersion, so of two candidates racing only one wins
(409 for the other). The leader renews every ``retry_period_s`` and gives up
leadership — cancelling the work — when it could not renew for ``renew_deadline_s``,
which is shorter than the lease duration, so the work stops before anyone else can take
over. ``release()`` (on SIGTERM) stops the work, then clears the holder so the other
replica takes over at once instead of after a lease duration.

We do not use ``kubernetes_asyncio.leaderelection``: it cannot release the lease, has no
way to stop, wants periods of at least one second and writes local time marked as UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from detnet.controller.kube.api import KubeClient
from detnet.controller.retry import (
    ApiErrorHook,
    Conflict,
    KubernetesApiError,
    NotFound,
    RetryPolicy,
)

log = logging.getLogger(__name__)

# No retries inside a lease call: the election's own period is the retry, and a call
# that retried could outlast the renew deadline it is racing against.
_ONE_ATTEMPT = RetryPolicy(attempts=1)


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """One candidate for a Lease; ``run(work)`` runs ``work`` only while leading.

    Give it the process's shared ``kube`` client (its QPS limiter then counts the lease
    calls too, which never queue behind other calls), or an ``api_client`` (and
    ``on_api_error``) to build one of its own."""

    def __init__(
        self,
        *,
        kube: KubeClient | None = None,
        api_client: client.ApiClient | None = None,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15,
        renew_deadline_s: float = 10,
        retry_period_s: float = 2,
        on_api_error: ApiErrorHook | None = None,
    ) -> None:
        if not lease_duration_s > renew_deadline_s > retry_period_s > 0:
            raise ValueError(
                "need lease_duration_s > renew_deadline_s > retry_period_s > 0, got "
                f"{lease_duration_s}, {renew_deadline_s}, {retry_period_s}"
            )
        if not identity:
            raise ValueError("identity must not be empty (use the pod name)")
        if kube is None:
            if api_client is None:
                raise ValueError("need kube= or api_client=")
            kube = KubeClient(api_client, on_api_error=on_api_error)
        elif api_client is not None or on_api_error is not None:
            raise ValueError("with kube=, the client and its error hook are the kube client's")
        self._kube = kube
        self._api: Any = client.CoordinationV1Api(kube.api_client)  # raw dicts, see _call
        self._ns, self._name, self._identity = namespace, name, identity
        self._duration, self._deadline, self._period = (
            lease_duration_s,
            renew_deadline_s,
            retry_period_s,
        )
        self._callbacks: list[Callable[[bool], None]] = []
        self._leader = False
        self._stop = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()
        self._done.set()
        # What we last saw of the lease, and when (monotonic) it last changed.
        self._observed: tuple[str, str] | None = None  # (holder, renewTime)
        self._observed_at = 0.0
        self._lease: dict[str, Any] | None = None

    @property
    def is_leader(self) -> bool:
        """True while this candidate holds the lease."""
        return self._leader

    @property
    def identity(self) -> str:
        """This candidate's identity (the holderIdentity it writes)."""
        return self._identity

    def on_change(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(is_leader)`` on every change of leadership."""
        self._callbacks.append(callback)

    def _set_leader(self, leader: bool) -> None:
        if leader != self._leader:
            self._leader = leader
            log.info(
                "%s %s leadership of %s/%s",
                self._identity,
                "acquired" if leader else "lost",
                self._ns,
                self._name,
            )
            for callback in self._callbacks:
                callback(leader)

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Campaign; while leading run ``work()``, cancelling it when leadership is lost.

        Returns when ``release()`` is called (after the work finished and the lease was
        released) or when ``work`` returns by itself; re-raises what ``work`` raises."""
        if self._running:
            raise RuntimeError("LeaseElector.run() is already running")
        self._running = True
        self._done.clear()
        self._stop.clear()
        try:
            while not self._stop.is_set():
                if not await self._try_acquire_or_renew():
                    await self._sleep(self._period * random.uniform(1.0, 1.2))
                    continue
                self._set_leader(True)
                task = asyncio.create_task(self._run_work(work), name="leader-work")
                try:
                    await self._lead(task)
                finally:
                    if not task.done():
                        task.cancel()
                    # Let the work finish its cleanup (in-flight patches) before anyone
                    # else can lead: we still hold the lease while we wait.
                    await asyncio.gather(task, return_exceptions=True)
                    self._set_leader(False)
                if task.done() and not task.cancelled():
                    exc = task.exception()
                    if exc is not None:
                        raise exc
                    self._stop.set()  # the work is done: nothing left to lead for
        finally:
            with contextlib.suppress(Exception):
                await self._give_up()
            self._set_leader(False)
            self._running = False
            self._done.set()

    async def release(self) -> None:
        """Stop campaigning: cancel the work, wait for it, and release the lease."""
        self._stop.set()
        await self._done.wait()

    # --- internals ----------------------------------------------------------------

    async def _run_work(self, work: Callable[[], Awaitable[None]]) -> None:
        await work()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _lead(self, task: asyncio.Task[None]) -> None:
        """Renew until the work ends, we are told to stop, or the renew deadline passes."""
        last_renew = time.monotonic()
        while not self._stop.is_set() and not task.done():
            sleeper = asyncio.create_task(self._sleep(self._period))
            await asyncio.wait({sleeper, task}, return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            await asyncio.gather(sleeper, return_exceptions=True)
            if self._stop.is_set() or task.done():
                return
            try:
                renewed = await asyncio.wait_for(
                    self._try_acquire_or_renew(),
                    timeout=max(0.001, self._deadline - (time.monotonic() - last_renew)),
                )
            except TimeoutError:
                renewed = False
            if renewed:
                last_renew = time.monotonic()
            elif self._lease_lost() or time.monotonic() - last_renew >= self._deadline:
                log.warning("%s could not renew the lease: stepping down", self._identity)
                return

    def _lease_lost(self) -> bool:
        return self._observed is not None and self._observed[0] not in ("", self._identity)

    async def _call(self, what: str, op: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
        """One API call through the shared client, raw JSON, one attempt, ahead of any
        queued patches; raises our classified (and counted) errors."""
        return await self._kube.call(what, op, retry=_ONE_ATTEMPT, urgent=True)

    def _spec(self, *, acquire: bool, transitions: int) -> dict[str, Any]:
        now = _micro_time()
        spec: dict[str, Any] = {
            "holderIdentity": self._identity,
            "leaseDurationSeconds": max(1, round(self._duration)),
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = now
        return spec

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        seen = (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""))
        if seen != self._observed:
            self._observed, self._observed_at = seen, time.monotonic()
        self._lease = lease

    async def _try_acquire_or_renew(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=self._period)
        what = f"lease {self._ns}/{self._name}"
        try:
            try:
                lease = await self._call(
                    f"read {what}",
                    lambda: self._api.read_namespaced_lease(
                        self._name, self._ns, _preload_content=False, _request_timeout=timeout
                    ),
                )
            except NotFound:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self._name, "namespace": self._ns},
                    "spec": self._spec(acquire=True, transitions=0),
                }
                lease = await self._call(
                    f"create {what}",
                    lambda: self._api.create_namespaced_lease(
                        self._ns, body, _preload_content=False, _request_timeout=timeout
                    ),
                )
                self._observe(lease)
                return True
            self._observe(lease)
            spec = lease.get("spec") or {}
            holder = str(spec.get("holderIdentity") or "")
            expired = time.monotonic() - self._observed_at >= float(
                spec.get("leaseDurationSeconds") or self._duration
            )
            if holder not in ("", self._identity) and not expired:
                return False
            transitions = int(spec.get("leaseTransitions") or 0)
            mine = holder == self._identity
            new_spec = self._spec(acquire=not mine, transitions=transitions + (0 if mine else 1))
            if mine and spec.get("acquireTime"):
                new_spec["acquireTime"] = spec["acquireTime"]
            body = {**lease, "spec": {**spec, **new_spec}}  # keeps metadata.resourceVersion
            updated = await self._call(
                f"update {what}",
                lambda: self._api.replace_namespaced_lease(
                    self._name, self._ns, body, _preload_content=False, _request_timeout=timeout
                ),
            )
            self._observe(updated)
            return True
        except Conflict:
            return False  # another candidate wrote first
        except KubernetesApiError as exc:
            log.warning("%s: %s", self._identity, exc)
            return False

    async def _give_up(self) -> None:
        """Clear the holder if we hold the lease, so a standby takes over at once."""
        lease = self._lease
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self._identity:
            return
        spec = {
            **(lease.get("spec") or {}),
            "holderIdentity": None,
            "leaseDurationSeconds": 1,
            "renewTime": _micro_time(),
        }
        body = {**lease, "spec": spec}
        timeout = aiohttp.ClientTimeout(total=self._period)
        updated = await self._call(
            f"release lease {self._ns}/{self._name}",
            lambda: self._api.replace_namespaced_lease(
                self._name, self._ns, body, _preload_content=False, _request_timeout=timeout
            ),
        )
        self._lease = updated
        log.info("%s released lease %s/%s", self._identity, self._ns, self._name)
