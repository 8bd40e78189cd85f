"""The Kubernetes enforcer: egress limits as ``kubernetes.io/egress-bandwidth`` pod
annotations, which Cilium's bandwidth manager applies to running pods in place.

Per best-effort workload (a Deployment/StatefulSet/DaemonSet, or a label selector) it
keeps a list+watch cache of the pods (``kube/listwatch.py`` feeding
``enforce/podwatch.py``), and merge-patches the annotation on every Running pod whose
value differs from the current limit: on ``apply()``, and whenever the watch shows a pod
that does not carry it (a new pod gets the limit as soon as it is Running). The limit is
also recorded on the workload's own ``metadata.annotations`` (never its pod template) so
a restarted or newly elected controller resumes from it (``start()``).
The workloads are the config's ``BestEffortTarget``s and the modes its words
(``controller/workloads.py``): ``mode="annotation"`` patches the running pods,
``mode="template"`` the pod template instead, for CNIs that read the annotation only at
pod start: that restarts the pods. Every call goes through a ``KubeClient``
(``kube/api.py``: QPS limiter, retries), writes through a concurrency bound; Events
record each change on the workload. See docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from detnet.controller.enforce.podwatch import EGRESS_ANNOTATION, PodCache
from detnet.controller.errors import EnforcementError
from detnet.controller.kube import DEFAULT_BURST, DEFAULT_CONCURRENCY, DEFAULT_QPS
from detnet.controller.kube.api import KubeClient, load_client_configuration
from detnet.controller.kube.listwatch import ListWatch
from detnet.controller.kube.objects import JsonObj, WatchEvent, annotations_of
from detnet.controller.retry import ApiErrorHook, NotFound, RetryPolicy
from detnet.controller.workloads import DEFAULT_MODE, KINDS, MODES, BestEffortTarget, KubernetesMode

__all__ = [
    "EGRESS_ANNOTATION",
    "MERGE_PATCH",
    "RECORD_ANNOTATION",
    "RECORD_TIME_ANNOTATION",
    "KubernetesEnforcer",
    "annotation_value",
    "load_client_configuration",
    "parse_annotation_value",
    "selector_from_spec",
]

log = logging.getLogger(__name__)

RECORD_ANNOTATION = "detnet.io/egress-bandwidth"
RECORD_TIME_ANNOTATION = "detnet.io/egress-bandwidth-updated"
MERGE_PATCH = "application/merge-patch+json"
_VALUE_RE = re.compile(r"^[1-9][0-9]*M$")


def annotation_value(mbps: int) -> str:
    """The annotation for ``mbps`` Mbit/s, e.g. ``"80M"``; refuses anything that would not
    parse as a positive bandwidth (Cilium drops the limit on an unparsable value)."""
    if isinstance(mbps, bool) or not isinstance(mbps, int) or mbps <= 0:
        raise EnforcementError(f"egress limit must be a positive whole Mbit/s, got {mbps!r}")
    value = f"{mbps}M"
    if not _VALUE_RE.match(value):  # belt and braces: this string goes to the dataplane
        raise EnforcementError(f"refusing to write invalid egress-bandwidth value {value!r}")
    return value


def parse_annotation_value(value: str) -> int | None:
    """Mbit/s from an ``"<N>M"`` annotation, None when absent or not in that form."""
    return int(value[:-1]) if isinstance(value, str) and _VALUE_RE.match(value) else None


def selector_from_spec(selector: Mapping[str, Any] | None) -> str:
    """A label selector string from a workload's ``spec.selector`` (matchLabels and
    matchExpressions); raises EnforcementError for an empty or unknown form."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise EnforcementError(f"unsupported matchExpressions operator {op!r} on {key!r}")
    if not parts:
        raise EnforcementError("workload has an empty spec.selector: it would select every pod")
    return ",".join(parts)


@dataclass
class _Workload:
    ref: BestEffortTarget
    selector: str = ""  # its pods' label selector: the given one, else the workload's
    cache: PodCache = field(default_factory=PodCache)  # the watch cache (annotation mode)
    watch: ListWatch | None = None
    task: asyncio.Task[None] | None = None


class KubernetesEnforcer:
    """Egress limits through pod annotations (see the module docstring).

    Give it the process's shared ``kube`` client, or the pieces to build its own
    (``api_client`` or ``configuration``, default: in-cluster or kubeconfig, and ``qps``,
    ``burst``, ``retry``, ``on_api_error``); it closes only a client it created."""

    name = "kubernetes"

    def __init__(
        self,
        workloads: Sequence[BestEffortTarget],
        *,
        kube: KubeClient | None = None,
        api_client: client.ApiClient | None = None,
        configuration: client.Configuration | None = None,
        qps: float | None = None,
        burst: int | None = None,
        retry: RetryPolicy | None = None,
        on_api_error: ApiErrorHook | None = None,
        mode: KubernetesMode = DEFAULT_MODE,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        events: bool = True,
        reporter: str = "detnet",
        watch_timeout_s: int = 60,
        inactivity_timeout_s: float = 90.0,
        resync_s: float = 300.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise EnforcementError(
                f"unknown kubernetes enforcer mode {mode!r}: {' or '.join(MODES)}"
            )
        if kube is not None and any(
            x is not None for x in (api_client, configuration, qps, burst, retry, on_api_error)
        ):
            raise ValueError("pass either kube= or the pieces to build a client, not both")
        names = [w.name for w in workloads]
        if len(set(names)) != len(names):
            raise EnforcementError(f"workload names must be unique, got {names}")
        for w in workloads:
            if w.kind not in KINDS:
                raise EnforcementError(f"{w.name}: kind must be one of {KINDS}, got {w.kind!r}")
            if mode == "template" and w.selector and not w.workload:
                raise EnforcementError(f"{w.name}: template mode needs a workload, not a selector")
        self._workloads = {w.name: _Workload(w) for w in workloads}
        self._kube = kube
        self._api_client = api_client
        self._owns_client = kube is None and api_client is None
        self._configuration = configuration
        self._client_settings = (
            DEFAULT_QPS if qps is None else qps,
            DEFAULT_BURST if burst is None else burst,
            retry,
            on_api_error,
        )
        self.mode = mode
        self._sem = asyncio.Semaphore(max_concurrency)
        self._events = events
        self._reporter = reporter
        self._watch_timeout_s = watch_timeout_s
        self._inactivity_s = inactivity_timeout_s
        self._resync_s = resync_s
        self._request_timeout_s = request_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._limits: dict[str, int] = {}
        self._apply_lock = asyncio.Lock()
        # (ns, pod) -> (value, task) of the write in flight, so apply() and the watch share it
        self._pending: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
        self._patch_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- the Enforcer protocol -----------------------------------------------------

    async def start(self) -> Mapping[str, int]:
        """Connect, resolve every workload and read back the recorded limits; in
        annotation mode start the pod watches (which bring pods to a resumed limit)."""
        if self._kube is None:
            api = self._api_client
            if api is None:
                api = client.ApiClient(self._configuration or await load_client_configuration())
            qps, burst, retry, on_api_error = self._client_settings
            self._kube = KubeClient(
                api, qps=qps, burst=burst, retry=retry, on_api_error=on_api_error
            )
        resumed: dict[str, int] = {}
        try:
            for wl in self._workloads.values():
                recorded = await self._resolve(wl)
                if recorded is not None:
                    resumed[wl.ref.name] = recorded
        except BaseException:
            await self._close_client()
            raise
        self._limits.update(resumed)
        if self.mode == "annotation":
            for wl in self._workloads.values():
                wl.watch = self._pod_watch(wl)
                wl.task = asyncio.create_task(
                    wl.watch.run(_PodSink(self, wl)), name=f"watch-{wl.ref.name}"
                )
        return resumed

    async def apply(self, limits: Mapping[str, int]) -> None:
        """Record and apply ``limits`` (Mbit/s) to the named workloads; raises
        EnforcementError (nothing sent) for an unknown name or invalid value, or when a
        patch still fails after retries."""
        if self._kube is None or self._closed:
            raise EnforcementError("kubernetes enforcer is not started (or already closed)")
        values: dict[str, str] = {}
        for name, mbps in limits.items():
            if name not in self._workloads:
                raise EnforcementError(f"unknown best-effort workload {name!r}")
            values[name] = annotation_value(mbps)
        async with self._apply_lock:
            results = await asyncio.gather(
                *(self._apply_one(self._workloads[n], limits[n]) for n in values),
                return_exceptions=True,
            )
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, Exception):
                raise err  # cancellation and the like
        if errors:
            first = errors[0]
            if isinstance(first, EnforcementError):
                raise first
            raise EnforcementError(f"applying limits failed: {first}") from first

    async def usage(self) -> Mapping[str, float]:
        """The API server does not see traffic: no usage."""
        return {}

    async def close(self, *, restore: Mapping[str, int] | None = None) -> None:
        """Let in-flight patches finish, apply ``restore`` if given, stop the watches and
        close the client (when this enforcer created it)."""
        if self._closed:
            return
        try:
            async with self._apply_lock:  # waits for an in-flight apply()
                pass
            if restore and self._kube is not None:
                await self.apply(restore)
            await self._drain_patches()
        finally:
            self._closed = True
            tasks = [wl.task for wl in self._workloads.values() if wl.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._drain_patches()
            await self._close_client()

    # --- extras for the loop and tests -------------------------------------------

    @property
    def limits(self) -> Mapping[str, int]:
        """The limits this enforcer currently enforces."""
        return dict(self._limits)

    def enforced_pods(self) -> Mapping[str, int]:
        """Per workload, the Running pods (as last seen) carrying the current limit
        (with no limit yet: those carrying none)."""
        return {name: wl.cache.carrying(self._value(wl)) for name, wl in self._workloads.items()}

    # --- internals -------------------------------------------------------------------

    def _value(self, wl: _Workload) -> str | None:
        """The annotation value of the workload's current limit, None without one."""
        mbps = self._limits.get(wl.ref.name)
        return annotation_value(mbps) if mbps is not None else None

    def _api(self) -> KubeClient:
        if self._kube is None:
            raise EnforcementError("kubernetes enforcer is not started")
        return self._kube

    def _workload_api(
        self, kind: str, verb: str
    ) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
        apps = client.AppsV1Api(self._api().api_client)
        return getattr(apps, f"{verb}_namespaced_{kind.lower().replace('set', '_set')}")

    def _core_api(self) -> Any:
        return client.CoreV1Api(self._api().api_client)  # raw-dict calls the stubs do not model

    def _pod_watch(self, wl: _Workload) -> ListWatch:
        ns = wl.ref.namespace
        return ListWatch(
            kube=self._api(),
            list_call=self._core_api().list_namespaced_pod,
            args=(ns,),
            what=f"pods {ns} -l {wl.selector}",
            label_selector=wl.selector,
            watch_timeout_s=self._watch_timeout_s,
            inactivity_timeout_s=self._inactivity_s,
            resync_s=self._resync_s,
            request_timeout_s=self._request_timeout_s,
        )

    async def _resolve(self, wl: _Workload) -> int | None:
        """Find the workload's pod selector and the limit recorded on it."""
        ref = wl.ref
        if ref.selector and not ref.workload:
            wl.selector = ref.selector
            return None
        read = self._workload_api(ref.kind, "read")
        obj = await self._api().call(
            f"read {ref.kind} {ref.namespace}/{ref.object_name}",
            lambda: read(
                ref.object_name,
                ref.namespace,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        try:
            wl.selector = ref.selector or selector_from_spec(obj.get("spec", {}).get("selector"))
        except EnforcementError as exc:
            raise EnforcementError(f"{ref.kind} {ref.namespace}/{ref.object_name}: {exc}") from exc
        recorded = annotations_of(obj).get(RECORD_ANNOTATION)
        if recorded is None:
            return None
        mbps = parse_annotation_value(recorded)
        if mbps is None:
            log.warning("ignoring unparsable %s=%r on %s", RECORD_ANNOTATION, recorded, ref.name)
        return mbps

    async def _apply_one(self, wl: _Workload, mbps: int) -> None:
        ref = wl.ref
        value = annotation_value(mbps)
        previous = self._limits.get(ref.name)
        self._limits[ref.name] = mbps
        if ref.workload or not ref.selector:
            await self._record(wl, value)
        if self.mode == "annotation":
            if not wl.cache.synced:
                items, _ = await (wl.watch or self._pod_watch(wl)).list()
                wl.cache.replace(items)
            await self._reconcile(wl)
        if previous != mbps and self._events:
            await self._event(wl, previous, mbps)

    async def _record(self, wl: _Workload, value: str) -> None:
        """Record the limit on the workload (and, in template mode, its pod template) in
        one merge patch: the record is the intent a successor resumes from."""
        ref = wl.ref
        meta = {
            "annotations": {
                RECORD_ANNOTATION: value,
                RECORD_TIME_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
        body: JsonObj = {"metadata": meta}
        if self.mode == "template":
            body["spec"] = {"template": {"metadata": {"annotations": {EGRESS_ANNOTATION: value}}}}
        patch = self._workload_api(ref.kind, "patch")
        async with self._sem:
            await self._api().call(
                f"patch {ref.kind} {ref.namespace}/{ref.object_name}",
                lambda: patch(
                    ref.object_name,
                    ref.namespace,
                    body,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                ),
            )

    def _schedule_reconcile(self, wl: _Workload) -> list[asyncio.Task[None]]:
        """Start a patch of every cached pod whose annotation differs from the limit."""
        value = self._value(wl)
        if value is None:
            return []
        return [self._schedule_patch(wl, pod, value) for pod in wl.cache.reconcile(value)]

    async def _reconcile(self, wl: _Workload) -> None:
        """``_schedule_reconcile`` and wait for those patches; raises the first failure."""
        tasks = self._schedule_reconcile(wl)
        # shield: cancelling apply() must not cut a patch (or a shared one) mid-way
        results = await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _schedule_patch(self, wl: _Workload, pod: str, value: str) -> asyncio.Task[None]:
        key = (wl.ref.namespace, pod)
        pending = self._pending.get(key)
        if pending is not None and pending[0] == value:
            return pending[1]  # the same write is already in flight: wait for that one
        task = asyncio.create_task(self._patch_pod(wl, pod, value), name=f"patch-{pod}")
        self._pending[key] = (value, task)
        self._patch_tasks.add(task)
        task.add_done_callback(self._patch_done)
        return task

    def _patch_done(self, task: asyncio.Task[None]) -> None:
        self._patch_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s", task.exception())

    async def _patch_pod(self, wl: _Workload, pod: str, value: str) -> None:
        ns = wl.ref.namespace
        v1 = self._core_api()
        body = {"metadata": {"annotations": {EGRESS_ANNOTATION: value}}}
        try:
            async with self._sem:
                obj = await self._api().call(
                    f"patch pod {ns}/{pod}",
                    lambda: v1.patch_namespaced_pod(
                        pod,
                        ns,
                        body,
                        _content_type=MERGE_PATCH,
                        _preload_content=False,
                        _request_timeout=self._timeout,
                    ),
                )
            wl.cache.put(obj)
        except NotFound:
            wl.cache.discard(pod)  # deleted meanwhile: nothing left to limit
        finally:
            pending = self._pending.get((ns, pod))
            if pending is not None and pending[1] is asyncio.current_task():
                del self._pending[(ns, pod)]

    async def _drain_patches(self) -> None:
        while self._patch_tasks:
            await asyncio.gather(*list(self._patch_tasks), return_exceptions=True)

    async def _event(self, wl: _Workload, previous: int | None, mbps: int) -> None:
        """A core/v1 Event on the workload; best effort (a failure is counted, logged)."""
        ref = wl.ref
        if ref.selector and not ref.workload:
            return  # no object to attach it to
        throttled = previous is None or mbps < previous
        reason = "EgressThrottled" if throttled else "EgressReleased"
        before = f" from {previous}M" if previous is not None else ""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{ref.object_name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": "apps/v1",
                "kind": ref.kind,
                "name": ref.object_name,
                "namespace": ref.namespace,
            },
            "reason": reason,
            "message": f"egress bandwidth limit set to {mbps}M{before} by {self._reporter}",
            "type": "Warning" if throttled else "Normal",
            "source": {"component": self._reporter},
            "reportingComponent": self._reporter,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        v1 = self._core_api()
        try:
            await self._api().call(
                f"create event in {ref.namespace}",
                lambda: v1.create_namespaced_event(
                    ref.namespace, body, _preload_content=False, _request_timeout=self._timeout
                ),
            )
        except EnforcementError as exc:
            log.warning("could not record event %s on %s: %s", reason, ref.name, exc)

    async def _close_client(self) -> None:
        if self._owns_client and self._kube is not None:
            await self._kube.api_client.close()
            self._kube = None


class _PodSink:
    """One workload's pod watch (a ``WatchSink``): folds it into the cache and starts
    the patches the cache asks for. The watch does not wait for them."""

    def __init__(self, enforcer: KubernetesEnforcer, wl: _Workload) -> None:
        self._enforcer, self._wl = enforcer, wl

    def on_list(self, items: list[JsonObj]) -> None:
        """A (re-)list: replace the cache, patch what needs it."""
        self._wl.cache.replace(items)
        self._enforcer._schedule_reconcile(self._wl)

    def on_event(self, event: WatchEvent) -> None:
        """A pod changed: a new or changed Running pod gets the limit."""
        enforcer, wl = self._enforcer, self._wl
        value = None if enforcer._closed else enforcer._value(wl)
        to_patch = wl.cache.apply_event(event, limit_value=value)
        if value is not None:
            for pod in to_patch:
                enforcer._schedule_patch(wl, pod, value)

    def on_watch_end(self) -> None:
        """The periodic resync from the cache (retries patches that failed)."""
        self._enforcer._schedule_reconcile(self._wl)
