"""The Kubernetes enforcer: egress limits as ``kubernetes.io/egress-bandwidth`` pod
annotations, which Cilium's bandwidth manager applies to running pods in place.

Per best-effort workload (a Deployment/StatefulSet/DaemonSet, or a label selector) it
keeps a list+watch cache of the pods, and merge-patches the annotation on every Running
pod whose value differs from the current limit: on ``apply()``, and whenever the watch
shows a pod that does not carry it (a new pod gets the limit as soon as it is Running).
The limit is also recorded on the workload's own ``metadata.annotations`` (never its pod
template) so a restarted or newly elected controller resumes from it (``start()``).
``mode="template"`` patches the pod template instead, for CNIs that read the annotation
only at pod start: that restarts the pods. Calls go through one retry module
(``controller/retry.py``), a concurrency bound and a client-side QPS token bucket.
See docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from detnet.controller.errors import EnforcementError
from detnet.controller.retry import (
    ApiErrorHook,
    Gone,
    NotFound,
    RetryPolicy,
    call_with_retry,
    classify,
    read_json,
)

log = logging.getLogger(__name__)

EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
RECORD_ANNOTATION = "detnet.io/egress-bandwidth"
RECORD_TIME_ANNOTATION = "detnet.io/egress-bandwidth-updated"
MERGE_PATCH = "application/merge-patch+json"
KINDS = ("Deployment", "StatefulSet", "DaemonSet")
_PLURALS = {"Deployment": "deployments", "StatefulSet": "statefulsets", "DaemonSet": "daemonsets"}
_VALUE_RE = re.compile(r"^[1-9][0-9]*M$")

JsonObj = dict[str, Any]


@dataclass(frozen=True)
class WorkloadRef:
    """A best-effort workload: ``name`` is the key limits use (the config's name);
    ``workload`` the object's name (default ``name``); ``selector`` a label selector
    that picks the pods instead of the workload's own ``spec.selector``."""

    name: str
    namespace: str
    kind: str = "Deployment"
    workload: str | None = None
    selector: str | None = None
    initial_mbps: int | None = None

    @property
    def object_name(self) -> str:
        """The workload object's name."""
        return self.workload or self.name


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
    except (config.ConfigException, OSError, ValueError) as exc:
        raise EnforcementError(
            f"no Kubernetes access: not in a pod and no usable kubeconfig ({exc})"
        ) from exc
    return conf


class TokenBucket:
    """Client-side rate limit: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._stamp = float(burst), time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for one token (FIFO: the lock queues the waiters)."""
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self._rate)
                self._tokens, self._stamp = 1.0, time.monotonic()
            self._tokens -= 1


@dataclass
class _Workload:
    ref: WorkloadRef
    selector: str = ""
    pods: dict[str, JsonObj] = field(default_factory=dict)  # the watch cache, by pod name
    synced: bool = False
    task: asyncio.Task[None] | None = None


class KubernetesEnforcer:
    """Egress limits through pod annotations (see the module docstring)."""

    name = "kubernetes"

    def __init__(
        self,
        workloads: Sequence[WorkloadRef],
        *,
        api_client: client.ApiClient | None = None,
        configuration: client.Configuration | None = None,
        mode: Literal["pod", "template"] = "pod",
        max_concurrency: int = 16,
        qps: float = 50.0,
        burst: int = 50,
        retry: RetryPolicy | None = None,
        on_api_error: ApiErrorHook | None = None,
        events: bool = True,
        reporter: str = "detnet",
        watch_timeout_s: int = 60,
        inactivity_timeout_s: float = 90.0,
        resync_s: float = 300.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        if mode not in ("pod", "template"):
            raise EnforcementError(f"unknown kubernetes enforcer mode {mode!r}: pod or template")
        names = [w.name for w in workloads]
        if len(set(names)) != len(names):
            raise EnforcementError(f"workload names must be unique, got {names}")
        for w in workloads:
            if w.kind not in KINDS:
                raise EnforcementError(f"{w.name}: kind must be one of {KINDS}, got {w.kind!r}")
            if mode == "template" and w.selector and not w.workload:
                raise EnforcementError(f"{w.name}: template mode needs a workload, not a selector")
        self._workloads = {w.name: _Workload(w) for w in workloads}
        self._api_client = api_client
        self._owns_client = api_client is None
        self._configuration = configuration
        self.mode = mode
        self._sem = asyncio.Semaphore(max_concurrency)
        self._bucket = TokenBucket(qps, burst)
        self._retry = retry or RetryPolicy()
        self._on_api_error = on_api_error
        self._events = events
        self._reporter = reporter
        self._watch_timeout_s = watch_timeout_s
        self._inactivity_s = inactivity_timeout_s
        self._resync_s = resync_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._limits: dict[str, int] = {}
        self._apply_lock = asyncio.Lock()
        # (ns, pod) -> (value, task) of the write in flight, so apply() and the watch share it
        self._pending: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
        self._patch_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- the Enforcer protocol -----------------------------------------------------

    async def start(self) -> Mapping[str, int]:
        """Connect, resolve every workload and read back the recorded limits; in pod
        mode start the pod watches (which bring pods to a resumed limit)."""
        if self._api_client is None:
            conf = self._configuration or await load_client_configuration()
            self._api_client = client.ApiClient(conf)
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
        if self.mode == "pod":
            for wl in self._workloads.values():
                wl.task = asyncio.create_task(self._watch_loop(wl), name=f"watch-{wl.ref.name}")
        return resumed

    async def apply(self, limits: Mapping[str, int]) -> None:
        """Record and apply ``limits`` (Mbit/s) to the named workloads; raises
        EnforcementError (nothing sent) for an unknown name or invalid value, or when a
        patch still fails after retries."""
        if self._api_client is None or self._closed:
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
            if restore and self._api_client is not None:
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
        """Per workload, the Running pods (as last seen) carrying the current limit."""
        out: dict[str, int] = {}
        for name, wl in self._workloads.items():
            want = self._limits.get(name)
            value = annotation_value(want) if want else None
            out[name] = sum(
                1
                for pod in wl.pods.values()
                if _running(pod) and _annotations(pod).get(EGRESS_ANNOTATION) == value
            )
        return out

    # --- internals -------------------------------------------------------------------

    def _workload_api(
        self, kind: str, verb: str
    ) -> Callable[..., Awaitable[aiohttp.ClientResponse]]:
        apps = client.AppsV1Api(self._api_client)
        return getattr(apps, f"{verb}_namespaced_{kind.lower().replace('set', '_set')}")

    async def _call(self, what: str, op: Callable[[], Awaitable[Any]]) -> JsonObj:
        """One API call (QPS bucket, retries) whose response is read as a JSON object.

        ``op`` must pass ``_preload_content=False``: we read raw JSON, skipping the
        model round trip, and raise ApiException ourselves for a non-2xx status."""

        async def attempt() -> JsonObj:
            await self._bucket.acquire()
            return await read_json(await op(), what=what)

        return await call_with_retry(
            attempt, what=what, policy=self._retry, on_api_error=self._on_api_error
        )

    async def _resolve(self, wl: _Workload) -> int | None:
        """Find the workload's pod selector and the limit recorded on it."""
        ref = wl.ref
        if ref.selector and not ref.workload:
            wl.selector = ref.selector
            return None
        read = self._workload_api(ref.kind, "read")
        obj = await self._call(
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
        recorded = _annotations(obj).get(RECORD_ANNOTATION)
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
        if self.mode == "pod":
            if not wl.synced:
                await self._relist(wl)
            await self._reconcile(wl, wait=True)
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
            await self._call(
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

    async def _reconcile(self, wl: _Workload, *, wait: bool) -> None:
        """Patch every Running pod in the cache whose annotation differs from the limit."""
        mbps = self._limits.get(wl.ref.name)
        if mbps is None:
            return
        value = annotation_value(mbps)
        tasks = [
            self._schedule_patch(wl, pod_name, value)
            for pod_name, pod in list(wl.pods.items())
            if _running(pod) and _annotations(pod).get(EGRESS_ANNOTATION) != value
        ]
        if wait:
            # shield: cancelling apply() must not cut a patch (or a shared one) mid-way
            results = await asyncio.gather(
                *(asyncio.shield(t) for t in tasks), return_exceptions=True
            )
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
        v1: Any = client.CoreV1Api(self._api_client)  # raw-dict calls the stubs do not model
        body = {"metadata": {"annotations": {EGRESS_ANNOTATION: value}}}
        try:
            async with self._sem:
                obj = await self._call(
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
            self._cache_put(wl, obj)
        except NotFound:
            wl.pods.pop(pod, None)  # deleted meanwhile: nothing left to limit
        finally:
            pending = self._pending.get((ns, pod))
            if pending is not None and pending[1] is asyncio.current_task():
                del self._pending[(ns, pod)]

    async def _drain_patches(self) -> None:
        while self._patch_tasks:
            await asyncio.gather(*list(self._patch_tasks), return_exceptions=True)

    def _cache_put(self, wl: _Workload, pod: JsonObj) -> None:
        name = pod.get("metadata", {}).get("name")
        if not name:
            return
        old = wl.pods.get(name)
        if old is None or _rv(pod) >= _rv(old):
            wl.pods[name] = pod

    async def _relist(self, wl: _Workload) -> str:
        """List the pods, replace the cache and return the list's resourceVersion."""
        v1: Any = client.CoreV1Api(self._api_client)  # raw-dict calls the stubs do not model
        ref = wl.ref
        listing = await self._call(
            f"list pods {ref.namespace} -l {wl.selector}",
            lambda: v1.list_namespaced_pod(
                ref.namespace,
                label_selector=wl.selector,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        wl.pods = {p["metadata"]["name"]: p for p in listing.get("items") or []}
        wl.synced = True
        return str(listing.get("metadata", {}).get("resourceVersion") or "")

    async def _watch_loop(self, wl: _Workload) -> None:
        """List, then watch from the list's resourceVersion; re-list on 410 Gone and
        every ``resync_s``; back off on errors. Runs until cancelled."""
        failures = 0
        while True:
            try:
                rv = await self._relist(wl)
                await self._reconcile(wl, wait=False)
                relist_at = time.monotonic() + self._resync_s
                while time.monotonic() < relist_at:
                    rv = await self._watch_once(wl, rv)
                    failures = 0
                    await self._reconcile(wl, wait=False)  # periodic resync from the cache
            except Gone:
                log.info("watch of %s expired (410): re-listing", wl.ref.name)
                continue
            except EnforcementError as exc:
                failures += 1
                log.warning("watch of %s failed: %s", wl.ref.name, exc)
                await asyncio.sleep(self._retry.backoff(min(failures, 10)))
            except Exception:
                # A bug must not silently end the watch (new pods would go unlimited).
                failures += 1
                log.exception("watch of %s crashed; restarting it", wl.ref.name)
                await asyncio.sleep(self._retry.backoff(min(failures, 10)))

    async def _watch_once(self, wl: _Workload, rv: str) -> str:
        """One watch request; returns the last resourceVersion seen when it ends."""
        v1: Any = client.CoreV1Api(self._api_client)  # raw-dict calls the stubs do not model
        what = f"watch pods {wl.ref.namespace} -l {wl.selector}"
        await self._bucket.acquire()
        try:
            resp = await v1.list_namespaced_pod(
                wl.ref.namespace,
                label_selector=wl.selector,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=rv,
                timeout_seconds=self._watch_timeout_s,
                _preload_content=False,
                # sock_read is the inactivity timeout: bookmarks arrive well within it.
                _request_timeout=aiohttp.ClientTimeout(
                    sock_connect=self._timeout.total, sock_read=self._inactivity_s
                ),
            )
        except (ApiException, aiohttp.ClientError, OSError) as exc:
            self._count(exc, what)
            raise classify(exc, what=what) from exc
        try:
            if not 200 <= resp.status <= 299:
                refused = ApiException(status=resp.status, reason=resp.reason)
                refused.body, refused.headers = await resp.read(), resp.headers
                self._count(refused, what)
                raise classify(refused, what=what) from refused
            while line := await resp.content.readline():
                rv = self._on_event(wl, json.loads(line), rv, what)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if isinstance(exc, ValueError):
                raise EnforcementError(f"{what}: unparsable watch event") from exc
            self._count(exc, what)
            raise classify(exc, what=what) from exc
        finally:
            resp.release()
        return rv

    def _count(self, exc: BaseException, what: str) -> None:
        if self._on_api_error is not None:
            self._on_api_error(classify(exc, what=what).code)

    def _on_event(self, wl: _Workload, event: JsonObj, rv: str, what: str) -> str:
        type_, obj = event.get("type"), event.get("object") or {}
        if type_ == "ERROR":
            code = int(obj.get("code") or 0)
            exc = ApiException(status=code, reason=str(obj.get("message", "")))
            exc.body = json.dumps(obj).encode()
            self._count(exc, what)
            raise classify(exc, what=what)
        new_rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
        if type_ == "DELETED":
            wl.pods.pop(obj.get("metadata", {}).get("name", ""), None)
        elif type_ in ("ADDED", "MODIFIED"):
            self._cache_put(wl, obj)
            mbps = self._limits.get(wl.ref.name)
            if mbps is not None and not self._closed and _running(obj):
                value = annotation_value(mbps)
                if _annotations(obj).get(EGRESS_ANNOTATION) != value:
                    self._schedule_patch(wl, obj["metadata"]["name"], value)
        return new_rv  # BOOKMARK only moves the resourceVersion on

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
        v1: Any = client.CoreV1Api(self._api_client)  # raw-dict calls the stubs do not model
        try:
            await self._call(
                f"create event in {ref.namespace}",
                lambda: v1.create_namespaced_event(
                    ref.namespace, body, _preload_content=False, _request_timeout=self._timeout
                ),
            )
        except EnforcementError as exc:
            log.warning("could not record event %s on %s: %s", reason, ref.name, exc)

    async def _close_client(self) -> None:
        if self._owns_client and self._api_client is not None:
            await self._api_client.close()
            self._api_client = None


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("annotations") or {}


def _running(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    return (pod.get("status") or {}).get("phase") == "Running" and not meta.get("deletionTimestamp")


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0  # resourceVersions are opaque; ours are ints, others compare as equal
