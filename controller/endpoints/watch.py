"""The I/O side of an app's endpoints: a ``get`` of its Service and a list of its slices
at start, then one list+watch of its EndpointSlices (``discovery.k8s.io/v1``, ``-l
kubernetes.io/service-name=NAME`` in the Service's namespace) through ``ListWatch``
(resume, 410 re-list, bookmarks), feeding a ``SliceCache`` and an ``EndpointFeed``;
every change in the endpoints to probe reaches ``on_change`` as an ``EndpointDiff``.

Events are folded in as they are read and the endpoints are recomputed once per batch
(``call_soon``: the events one read of the stream brings), so a new endpoint reaches the
callback within a loop iteration of its slice event; only removals of endpoints that
left every slice wait (``feed.py``). The callback is a plain function called on the
event loop: it must not block, and what it starts is its own.

The Service's ``get`` (RBAC: ``services get``) makes a missing Service a clear error
naming the app at start, and gives the address family to probe a dual-stack Service over
(its first ``ipFamilies``). The first list does the same for a missing
``endpointslices`` rule, and delivers the initial set before ``start()`` returns. A
Service without a selector works: its EndpointSlices are whoever wrote them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from detnet.controller.endpoints.feed import DEFAULT_REMOVAL_GRACE_NS, EndpointDiff, EndpointFeed
from detnet.controller.endpoints.service import ServiceRef
from detnet.controller.endpoints.slices import (
    ADDRESS_FAMILIES,
    SERVICE_NAME_LABEL,
    AddressFamily,
    EndpointSpec,
    ProbeEndpoint,
    Skipped,
    SliceCache,
)
from detnet.controller.errors import ControllerError
from detnet.controller.kube.api import KubeClient
from detnet.controller.kube.listwatch import ListWatch
from detnet.controller.kube.objects import JsonObj, WatchEvent
from detnet.controller.retry import KubernetesApiError, NotFound
from detnet.engine.targets import Protocol

log = logging.getLogger(__name__)

EndpointCallback = Callable[[EndpointDiff], None]
_MAX_NOTES = 20  # new skip reasons logged at once; the rest are counted
# libuv (uvloop) rounds a timer to the nearest millisecond: wake a little late rather
# than early, so a held removal is due when the timer fires.
_TIMER_SLACK_S = 0.001


class EndpointsError(ControllerError):
    """An app's Service or its EndpointSlices cannot be used (missing, forbidden...)."""


@dataclass(frozen=True, kw_only=True)
class ServiceInfo:
    """What the start needs of a Service: its ``ref``, whether it has a ``selector``
    (without one, its slices are written by hand or by another controller) and the
    ``family`` its endpoints are probed over."""

    ref: ServiceRef
    selector: bool
    family: AddressFamily


def service_info(obj: Mapping[str, Any], ref: ServiceRef) -> ServiceInfo:
    """The ``ServiceInfo`` of a Service object (pure)."""
    spec = obj.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    families = spec.get("ipFamilies")
    first = families[0] if isinstance(families, list) and families else "IPv4"
    family: AddressFamily = first if first in ADDRESS_FAMILIES else "IPv4"
    return ServiceInfo(ref=ref, selector=bool(spec.get("selector")), family=family)


async def read_service(
    kube: KubeClient, ref: ServiceRef, *, app: str, timeout_s: float = 10.0
) -> ServiceInfo:
    """``get`` the Service of critical app ``app``; EndpointsError naming the app when
    it does not exist or cannot be read."""
    what = f"get service {ref}"
    try:
        obj = await kube.call(
            what,
            lambda: client.CoreV1Api(kube.api_client).read_namespaced_service(
                ref.name,
                ref.namespace,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=timeout_s),
            ),
        )
    except NotFound as exc:
        raise EndpointsError(
            f"critical app {app}: Service {ref} does not exist "
            f"(service: {ref.dns_name}; check its name and namespace)"
        ) from exc
    except KubernetesApiError as exc:
        raise EndpointsError(f"critical app {app}: {exc}") from exc
    return service_info(obj, ref)


class EndpointWatch:
    """The probe endpoints of one critical app, kept in step with its EndpointSlices.

    ``start()`` reads the Service and lists its slices (EndpointsError when either
    fails), delivering the first ``EndpointDiff`` (``initial``); ``run()`` then lists
    and watches until cancelled, calling ``on_change`` with every change after it."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        app: str,
        service: ServiceRef,
        port: int | str,
        protocol: Protocol,
        on_change: EndpointCallback,
        removal_grace_ns: int = DEFAULT_REMOVAL_GRACE_NS,
        watch_timeout_s: int = 60,
        inactivity_timeout_s: float = 90.0,
        resync_s: float = 300.0,
        request_timeout_s: float = 10.0,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.app, self.service = app, service
        self._kube = kube
        self._port, self._protocol = port, protocol
        self._spec = EndpointSpec(app=app, port=port, protocol=protocol)  # checks them
        self._on_change = on_change
        self._request_timeout_s = request_timeout_s
        self._feed = EndpointFeed(app, removal_grace_ns=removal_grace_ns)
        self._cache: SliceCache | None = None
        self._clock = clock
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._notes: set[tuple[str, str]] = set()
        self._synced = False
        self.info: ServiceInfo | None = None
        self._listwatch = ListWatch(
            kube=kube,
            list_call=client.DiscoveryV1Api(kube.api_client).list_namespaced_endpoint_slice,
            args=(service.namespace,),
            what=f"endpointslices {service.namespace} -l {SERVICE_NAME_LABEL}={service.name}",
            label_selector=f"{SERVICE_NAME_LABEL}={service.name}",
            watch_timeout_s=watch_timeout_s,
            inactivity_timeout_s=inactivity_timeout_s,
            resync_s=resync_s,
            request_timeout_s=request_timeout_s,
        )

    @property
    def endpoints(self) -> Mapping[str, ProbeEndpoint]:
        """The endpoints delivered so far (what the consumer probes), by target name."""
        return self._feed.delivered

    @property
    def resource_version(self) -> str | None:
        """The slices' resourceVersion the watch has seen up to (None: re-listing)."""
        return self._listwatch.resource_version

    @property
    def synced(self) -> bool:
        """Whether the initial diff has been delivered."""
        return self._synced

    async def start(self) -> ServiceInfo:
        """Read the Service and list its slices once, delivering the initial diff before
        returning; EndpointsError naming the app when the Service is missing or either
        call is refused (a missing RBAC rule is an error at start, not a retry loop)."""
        self.info = await read_service(
            self._kube, self.service, app=self.app, timeout_s=self._request_timeout_s
        )
        spec = EndpointSpec(
            app=self.app, port=self._port, protocol=self._protocol, family=self.info.family
        )
        self._cache = SliceCache(spec=spec, service=self.service.name)
        try:
            items, _ = await self._listwatch.list()
        except ControllerError as exc:
            raise EndpointsError(f"critical app {self.app}: {exc}") from exc
        self._cache.replace(items)
        self._flush()
        return self.info

    async def run(self) -> None:
        """List and watch until cancelled (``start()`` first, when not done)."""
        if self._cache is None:
            await self.start()
        try:
            await self._listwatch.run(self)
        finally:
            for handle in (self._flush_handle, self._timer):
                if handle is not None:
                    handle.cancel()
            self._flush_handle = self._timer = None

    # --- WatchSink ----------------------------------------------------------------------

    def on_list(self, items: list[JsonObj]) -> None:
        """A (re-)list: the slices are exactly ``items``."""
        assert self._cache is not None
        self._cache.replace(items)
        self._schedule_flush()

    def on_event(self, event: WatchEvent) -> None:
        """One slice added, modified or deleted."""
        assert self._cache is not None
        self._cache.apply_event(event)
        self._schedule_flush()

    def on_watch_end(self) -> None:
        """Nothing to retry: every event was folded in as it came."""

    # --- delivery -----------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        assert self._cache is not None
        resolution = self._cache.resolve()
        self._log_notes(resolution.skipped)
        self._deliver(self._feed.offer(resolution, now_ns=self._clock()))

    def _on_timer(self) -> None:
        self._timer = None
        self._deliver(self._feed.due(now_ns=self._clock()))

    def _deliver(self, diff: EndpointDiff) -> None:
        self._synced = True
        if diff:
            if diff.added or diff.removed or diff.changed:
                log.info(
                    "%s: %d endpoint(s) (+%d -%d ~%d)",
                    self.app,
                    len(diff.current),
                    len(diff.added),
                    len(diff.removed),
                    len(diff.changed),
                )
            try:
                self._on_change(diff)
            except Exception:
                log.exception("%s: the endpoint callback failed", self.app)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self._feed.next_deadline_ns
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(0.0, (deadline - self._clock()) / 1e9) + _TIMER_SLACK_S
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _log_notes(self, skipped: tuple[Skipped, ...]) -> None:
        """Log each reason for not probing once, while it holds."""
        current = {(s.slice, s.why): s for s in skipped}
        fresh = [note for key, note in current.items() if key not in self._notes]
        for note in fresh[:_MAX_NOTES]:
            log.warning("%s: %s", self.app, note.describe(self.service.namespace))
        if len(fresh) > _MAX_NOTES:
            log.warning("%s: and %d more such notes", self.app, len(fresh) - _MAX_NOTES)
        self._notes = set(current)  # a reason that stops and recurs is logged again
