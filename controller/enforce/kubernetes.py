"""The Kubernetes enforcer: egress limits as ``kubernetes.io/egress-bandwidth`` pod
annotations, which Cilium's bandwidth manager applies to running pods in place.

Per best-effort workload (a Deployment/StatefulSet/DaemonSet, or a label selector) it
keeps a list+watch cache of the pods (``kube/listwatch.py`` feeding
``enforce/podwatch.py``), and merge-patches the annotation on every Running pod whose
value differs from the current limit: on ``apply()``, and whenever the watch shows a pod
that does not carry it (a new pod gets the limit as soon as it is Running). Limits are
per ``Scope``: a workload's cluster-wide limit, and per-node limits that override it
for the pods on their node; a pod on a node with neither gets the lowest of the
workload's node limits (never uncapped). The limits are also recorded on the workload's
own ``metadata.annotations`` (never its pod template): the cluster-wide one as
``detnet.io/egress-bandwidth: "80M"`` (what earlier releases wrote and read), the
per-node ones as one small JSON map in ``detnet.io/egress-bandwidth-nodes``, so a
restarted or newly elected controller resumes from them (``start()``).
The workloads are the config's ``BestEffortTarget``s and the modes its words
(``controller/workloads.py``): ``mode="annotation"`` patches the running pods,
``mode="template"`` the pod template instead, for CNIs that read the annotation only at
pod start: that restarts the pods. Every call goes through a ``KubeClient``
(``kube/api.py``: QPS limiter, retries), writes through a concurrency bound; Events
record each change on the workload. See docs/kubernetes.md.

One module past 500 lines on purpose: the enforcer's one class owns the workloads' pod
caches, the patch queue and the recorded limits, whose ordering rules (patch, record,
resume) only read right together; the pure parts are ``podwatch.py`` (the reducer) and
``kube/`` (the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from detnet.controller.enforce.podwatch import (
    EGRESS_ANNOTATION,
    PodCache,
    node_of,
    running,
    scheduled,
)
from detnet.controller.errors import EnforcementError
from detnet.controller.kube import DEFAULT_BURST, DEFAULT_CONCURRENCY, DEFAULT_QPS
from detnet.controller.kube.api import KubeClient, load_client_configuration
from detnet.controller.kube.listwatch import ListWatch
from detnet.controller.kube.objects import JsonObj, WatchEvent, annotations_of, metadata_of
from detnet.controller.retry import ApiErrorHook, NotFound, RetryPolicy
from detnet.controller.workloads import (
    CLUSTER,
    DEFAULT_MODE,
    KINDS,
    MODES,
    BestEffortTarget,
    KubernetesMode,
    PodRef,
    Scope,
)
from detnet.engine.parse import show

__all__ = [
    "EGRESS_ANNOTATION",
    "MERGE_PATCH",
    "RECORD_ANNOTATION",
    "RECORD_NODES_ANNOTATION",
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
RECORD_NODES_ANNOTATION = "detnet.io/egress-bandwidth-nodes"
MAX_NODES_RECORD_BYTES = 64 * 1024  # ~25 bytes a node: a few thousand nodes
_MAX_RECORD_MBPS = 1_000_000
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


@dataclass(frozen=True)
class Limits:
    """One workload's limits: ``cluster`` for every pod (None: none), ``nodes`` per node
    (overriding it there)."""

    cluster: int | None = None
    nodes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, workload: str, limits: Mapping[Scope, int]) -> Limits:
        """The limits of ``workload`` among ``limits``."""
        nodes = sorted((s.node, v) for s, v in limits.items() if s.workload == workload)
        cluster = dict(nodes).pop(CLUSTER, None)
        return cls(cluster, tuple((n, v) for n, v in nodes if n != CLUSTER))

    def for_node(self, node: str | None) -> int | None:
        """The limit of a pod on ``node``: its node's, else the cluster-wide one, else the
        lowest node limit (a pod on a node the policy has not seen yet)."""
        per_node = dict(self.nodes)
        if node is not None and node in per_node:
            return per_node[node]
        if self.cluster is not None:
            return self.cluster
        return min(per_node.values()) if per_node else None

    def scopes(self, workload: str) -> dict[Scope, int]:
        """Back to ``Scope`` keys."""
        out = {Scope(workload, n): v for n, v in self.nodes}
        if self.cluster is not None:
            out[Scope(workload)] = self.cluster
        return out

    def describe(self) -> str:
        """``80M`` or ``80M, node-a 40M`` for logs and Events."""
        parts = [f"{self.cluster}M"] if self.cluster is not None else []
        parts += [f"{n} {v}M" for n, v in self.nodes]
        return ", ".join(parts) or "none"


def parse_nodes_record(value: str) -> dict[str, int] | None:
    """The per-node record (a JSON object of node name to Mbit/s); None when it is not
    one (too long, not JSON, a value out of range): a record we cannot trust is ignored."""
    if not isinstance(value, str) or len(value) > MAX_NODES_RECORD_BYTES:
        return None
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    out: dict[str, int] = {}
    for node, mbps in doc.items():
        if not (isinstance(node, str) and _NODE_RE.fullmatch(node)):
            return None
        if isinstance(mbps, bool) or not isinstance(mbps, int):
            return None
        if not 0 < mbps <= _MAX_RECORD_MBPS:
            return None
        out[node] = mbps
    return out


_NODE_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass
class _Workload:
    ref: BestEffortTarget
    selector: str = ""  # its pods' label selector: the given one, else the workload's
    cache: PodCache = field(default_factory=PodCache)  # the watch cache (annotation mode)
    watch: ListWatch | None = None
    task: asyncio.Task[None] | None = None
    recorded: bool = False  # our record is on the workload (written once per term at least)


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
        self._limits: dict[str, Limits] = {}
        self._apply_lock = asyncio.Lock()
        # (ns, pod) -> (value, task) of the write in flight, so apply() and the watch share it
        self._pending: dict[tuple[str, str], tuple[str, asyncio.Task[None]]] = {}
        self._patch_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- the Enforcer protocol -----------------------------------------------------

    async def start(self) -> Mapping[Scope, int]:
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
        resumed: dict[Scope, int] = {}
        try:
            for wl in self._workloads.values():
                recorded = await self._resolve(wl)
                if recorded is not None:
                    self._limits[wl.ref.name] = recorded
                    resumed.update(recorded.scopes(wl.ref.name))
        except BaseException:
            await self._close_client()
            raise
        if self.mode == "annotation":
            for wl in self._workloads.values():
                wl.watch = self._pod_watch(wl)
                wl.task = asyncio.create_task(
                    wl.watch.run(_PodSink(self, wl)), name=f"watch-{wl.ref.name}"
                )
        return resumed

    async def apply(self, limits: Mapping[Scope, int]) -> None:
        """Record and apply ``limits`` (Mbit/s per scope) to the named workloads: each
        named workload's limits become exactly its scopes in ``limits``. Raises
        EnforcementError (nothing sent) for an unknown name, an invalid value or a node
        scope in template mode, or when a patch still fails after retries."""
        if self._kube is None or self._closed:
            raise EnforcementError("kubernetes enforcer is not started (or already closed)")
        for scope, mbps in limits.items():
            if scope.workload not in self._workloads:
                raise EnforcementError(f"unknown best-effort workload {scope.workload!r}")
            annotation_value(mbps)
            if scope.node != CLUSTER and self.mode == "template":
                raise EnforcementError(
                    f"{scope}: template mode patches one pod template per workload, "
                    "no per-node limits (use control.scope: cluster)"
                )
        named = sorted({s.workload for s in limits})
        async with self._apply_lock:
            results = await asyncio.gather(
                *(self._apply_one(self._workloads[n], Limits.of(n, limits)) for n in named),
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

    def placements(self) -> Mapping[str, frozenset[str]]:
        """Per workload (with a listed pod cache), the nodes its scheduled pods are on."""
        return {
            name: frozenset(
                n for pod in wl.cache.pods.values() if scheduled(pod) if (n := node_of(pod))
            )
            for name, wl in self._workloads.items()
            if wl.cache.synced
        }

    def pods(self) -> Mapping[str, tuple[PodRef, ...]]:
        """Per workload (with a listed pod cache), its running pods."""
        out: dict[str, tuple[PodRef, ...]] = {}
        for name, wl in self._workloads.items():
            if not wl.cache.synced:
                continue
            out[name] = tuple(
                PodRef(wl.ref.namespace, pod_name, node_of(pod), metadata_of(pod).get("uid"))
                for pod_name, pod in sorted(wl.cache.pods.items())
                if running(pod)
            )
        return out

    async def usage(self) -> Mapping[Scope, float]:
        """The API server does not see traffic: no usage (the node agents do)."""
        return {}

    async def close(self, *, restore: Mapping[Scope, int] | None = None) -> None:
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
    def limits(self) -> Mapping[Scope, int]:
        """The limits this enforcer currently enforces."""
        out: dict[Scope, int] = {}
        for name, limits in self._limits.items():
            out.update(limits.scopes(name))
        return out

    def enforced_pods(self) -> Mapping[str, int]:
        """Per workload, the Running pods (as last seen) carrying their current limit
        (with no limit yet: those carrying none)."""
        return {name: wl.cache.carrying(self._value(wl)) for name, wl in self._workloads.items()}

    # --- internals -------------------------------------------------------------------

    def _value(self, wl: _Workload) -> Callable[[Mapping[str, Any]], str | None]:
        """The annotation value a pod of ``wl`` should carry (None: no limit yet)."""
        limits = self._limits.get(wl.ref.name, Limits())

        def value(pod: Mapping[str, Any]) -> str | None:
            mbps = limits.for_node(node_of(pod))
            return annotation_value(mbps) if mbps is not None else None

        return value

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

    async def _resolve(self, wl: _Workload) -> Limits | None:
        """Find the workload's pod selector and the limits recorded on it."""
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
        annotations = annotations_of(obj)
        recorded = annotations.get(RECORD_ANNOTATION)
        cluster = None if recorded is None else parse_annotation_value(recorded)
        if recorded is not None and cluster is None:
            log.warning(
                "ignoring unparsable %s=%s on %s", RECORD_ANNOTATION, show(recorded), ref.name
            )
        nodes: dict[str, int] = {}
        per_node = annotations.get(RECORD_NODES_ANNOTATION)
        if per_node is not None:
            parsed = parse_nodes_record(per_node)
            if parsed is None:
                log.warning(
                    "ignoring %s on %s: not a JSON map of node names to Mbit/s: %s",
                    RECORD_NODES_ANNOTATION,
                    ref.name,
                    show(per_node),
                )
            nodes = parsed or {}
        if cluster is None and not nodes:
            return None
        return Limits(cluster, tuple(sorted(nodes.items())))

    async def _apply_one(self, wl: _Workload, limits: Limits) -> None:
        ref = wl.ref
        previous = self._limits.get(ref.name)
        self._limits[ref.name] = limits
        if (ref.workload or not ref.selector) and (previous != limits or not wl.recorded):
            await self._record(wl, limits)
            wl.recorded = True
        if self.mode == "annotation":
            if not wl.cache.synced:
                items, _ = await (wl.watch or self._pod_watch(wl)).list()
                wl.cache.replace(items)
            await self._reconcile(wl)
        if previous != limits and self._events:
            await self._event(wl, previous, limits)

    async def _record(self, wl: _Workload, limits: Limits) -> None:
        """Record the limits on the workload (and, in template mode, its pod template) in
        one merge patch: the record is the intent a successor resumes from. A kind of
        limit the workload no longer has is removed (null in a merge patch)."""
        ref = wl.ref
        value = annotation_value(limits.cluster) if limits.cluster is not None else None
        nodes = json.dumps(dict(limits.nodes), separators=(",", ":")) if limits.nodes else None
        meta = {
            "annotations": {
                RECORD_ANNOTATION: value,
                RECORD_NODES_ANNOTATION: nodes,
                RECORD_TIME_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
        body: JsonObj = {"metadata": meta}
        if self.mode == "template" and value is not None:
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
        """Start a patch of every cached pod whose annotation differs from its limit."""
        value = self._value(wl)
        tasks = []
        for name in wl.cache.reconcile(value):
            wanted = value(wl.cache.pods[name])
            if wanted is not None:
                tasks.append(self._schedule_patch(wl, name, wanted))
        return tasks

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

    async def _event(self, wl: _Workload, previous: Limits | None, limits: Limits) -> None:
        """A core/v1 Event on the workload naming the nodes; best effort (a failure is
        counted, logged)."""
        ref = wl.ref
        if ref.selector and not ref.workload:
            return  # no object to attach it to
        throttled = previous is None or _lowered(previous, limits)
        reason = "EgressThrottled" if throttled else "EgressReleased"
        before = f" from {previous.describe()}" if previous is not None else ""
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
            "message": (
                f"egress bandwidth limit set to {limits.describe()}{before} by {self._reporter}"
            ),
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
        """A pod changed: a new or changed Running pod gets its node's limit."""
        enforcer, wl = self._enforcer, self._wl
        value = None if enforcer._closed else enforcer._value(wl)
        to_patch = wl.cache.apply_event(event, limit_value=value)
        if value is not None:
            for pod in to_patch:
                wanted = value(wl.cache.pods[pod])
                if wanted is not None:
                    enforcer._schedule_patch(wl, pod, wanted)

    def on_watch_end(self) -> None:
        """The periodic resync from the cache (retries patches that failed)."""
        self._enforcer._schedule_reconcile(self._wl)


def _lowered(before: Limits, after: Limits) -> bool:
    """Whether some pod's limit went down from ``before`` to ``after``."""
    nodes = {n for n, _ in before.nodes} | {n for n, _ in after.nodes} | {None}
    for node in nodes:
        old, new = before.for_node(node), after.for_node(node)
        if new is not None and (old is None or new < old):
            return True
    return False
