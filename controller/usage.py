"""The controller's client of the ``detnet agent``s: per-pod usage from the nodes it
names, within a deadline, with unknown made explicit.

- Where the agents are: ``EndpointSliceAgents`` watches the EndpointSlices of the
  agents' Service (``detnet-agent/detnet-agent``) and maps each node to its agent's
  address: an endpoint carries ``nodeName``, its pod's address, and ``ready`` (the
  agent's ``/readyz``) and ``terminating`` already folded in by the EndpointSlice
  controller, and the slice names the ``usage`` port; one watch of one small collection
  in one namespace (a Role there: list/watch endpointslices), the mechanism the
  controller uses for critical endpoints as well. Watching the agents' pods would need
  pod reads and a port taken from the container spec, and leave readiness to us.
  ``StaticAgents`` is a fixed map (the lab, tests, bare metal).
- The token: a projected service-account token of audience ``detnet-agent``, read from
  its file (``TokenFile``) and read again when the file changes (the kubelet rotates it
  by swapping a symlink) or after an agent answered 401.
- ``UsageClient.fetch(nodes)`` asks the agents of those nodes concurrently and returns
  when all have answered or the deadline (200 ms by default) has passed, whichever is
  first; a node whose agent is missing, late, refusing or answering nonsense has its
  pods unknown in the ``UsageReport``, with the reason, and the error is counted. It
  never raises for an agent's failure and never waits past the deadline.

One module past 500 lines on purpose: where the agents are, the token and the client are
one edge (the controller's side of the agent protocol, docs/agent.md) and its bounds are
reviewed together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import aiohttp

from detnet.controller.agent.wire import (
    AGENT_NAMESPACE,
    AGENT_SERVICE,
    DEFAULT_DEADLINE_S,
    DEFAULT_TOKEN_PATH,
    MAX_DOCUMENT_BYTES,
    NodeUsage,
    PodUsage,
    WireError,
    decode,
)
from detnet.controller.kube.objects import JsonObj, WatchEvent, name_of
from detnet.controller.kube.selectors import SelectorError, parse_selector
from detnet.controller.workloads import CLUSTER, PodRef, Scope
from detnet.engine.parse import show

log = logging.getLogger(__name__)

USAGE_PORT_NAME = "usage"
MAX_TOKEN_BYTES = 16 * 1024
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

OK = "ok"  # a node's status in a report when its agent answered


class UsageError(ValueError):
    """A bad argument to the client (a selector that does not parse, a bad deadline)."""


class TokenError(OSError):
    """The token file cannot be read or holds no token."""


# ----------------------------------------------------------------------- the agents


@dataclass(frozen=True)
class AgentEndpoint:
    """Where one node's agent listens."""

    node: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """``http://HOST:PORT/v1/usage`` (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1/usage"


class AgentDirectory(Protocol):
    """Maps a node to its agent."""

    def agent_for(self, node: str) -> AgentEndpoint | None:
        """The agent of ``node``, None when none is known (or ready)."""
        ...


class StaticAgents:
    """A fixed ``{node: (host, port)}`` map."""

    def __init__(self, agents: Mapping[str, tuple[str, int]]) -> None:
        self._agents = {n: AgentEndpoint(n, h, p) for n, (h, p) in agents.items()}

    def agent_for(self, node: str) -> AgentEndpoint | None:
        """The agent of ``node``, if listed."""
        return self._agents.get(node)


class EndpointSliceAgents:
    """The agents as the EndpointSlices of their Service list them: a ``WatchSink``
    (feed it with ``watch()``). Per node, a ready, not terminating endpoint; of
    several (a rolling update), the lowest address, so the choice is stable."""

    def __init__(self, *, port_name: str = USAGE_PORT_NAME) -> None:
        self._port_name = port_name
        self._slices: dict[str, dict[str, AgentEndpoint]] = {}  # slice name -> node -> agent
        self.synced = False

    def agent_for(self, node: str) -> AgentEndpoint | None:
        """The agent of ``node``, None when no slice lists a ready one."""
        found = [s[node] for s in self._slices.values() if node in s]
        return min(found, key=lambda a: (a.host, a.port)) if found else None

    @property
    def nodes(self) -> frozenset[str]:
        """Every node with a ready agent."""
        return frozenset(n for s in self._slices.values() for n in s)

    def on_list(self, items: list[JsonObj]) -> None:
        """A (re-)list of the Service's slices."""
        self._slices = {name_of(s): self._agents_of(s) for s in items if name_of(s)}
        self.synced = True

    def on_event(self, event: WatchEvent) -> None:
        """One slice added, changed or deleted."""
        name = name_of(event.object)
        if not name:
            return
        if event.type == "DELETED":
            self._slices.pop(name, None)
        elif event.type in ("ADDED", "MODIFIED"):
            self._slices[name] = self._agents_of(event.object)

    def on_watch_end(self) -> None:
        """Nothing to resync."""

    def _agents_of(self, obj: Mapping[str, Any]) -> dict[str, AgentEndpoint]:
        port = self._port(obj.get("ports"))
        endpoints = obj.get("endpoints")
        if port is None or not isinstance(endpoints, list):
            return {}
        out: dict[str, AgentEndpoint] = {}
        for ep in endpoints:
            if not isinstance(ep, Mapping):
                continue
            node, addresses = ep.get("nodeName"), ep.get("addresses")
            conditions = ep.get("conditions")
            conditions = conditions if isinstance(conditions, Mapping) else {}
            # API docs: a nil ready is to be read as ready; terminating ones are on their way out.
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            if not isinstance(node, str) or not node or not isinstance(addresses, list):
                continue
            if not addresses or not isinstance(addresses[0], str) or not addresses[0]:
                continue
            agent = AgentEndpoint(node, addresses[0], port)
            if node not in out or (agent.host, agent.port) < (out[node].host, out[node].port):
                out[node] = agent
        return out

    def _port(self, ports: Any) -> int | None:
        if not isinstance(ports, list):
            return None
        candidates = [p for p in ports if isinstance(p, Mapping)]
        named = [p for p in candidates if p.get("name") == self._port_name]
        chosen = named or (candidates if len(candidates) == 1 else [])
        port = chosen[0].get("port") if chosen else None
        return port if isinstance(port, int) and 0 < port < 65536 else None


def watch_agents(
    kube: Any,
    sink: EndpointSliceAgents,
    *,
    namespace: str = AGENT_NAMESPACE,
    service: str = AGENT_SERVICE,
) -> Any:
    """The ``ListWatch`` that keeps ``sink`` up to date (run it as a task:
    ``asyncio.create_task(watch_agents(kube, sink).run(sink))``); ``kube`` is the
    controller's ``KubeClient``."""
    from kubernetes_asyncio.client import DiscoveryV1Api

    from detnet.controller.kube.listwatch import ListWatch

    return ListWatch(
        kube=kube,
        list_call=DiscoveryV1Api(kube.api_client).list_namespaced_endpoint_slice,
        args=(namespace,),
        what=f"endpointslices {namespace} -l {SERVICE_NAME_LABEL}={service}",
        label_selector=f"{SERVICE_NAME_LABEL}={service}",
    )


# ------------------------------------------------------------------------ the token


class TokenFile:
    """A bearer token in a file, re-read when the file changes (a new inode, size or
    mtime: the kubelet rotates projected tokens by swapping a symlink) or after
    ``invalidate()``. At most ``MAX_TOKEN_BYTES``; surrounding whitespace stripped."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_TOKEN_PATH) -> None:
        self.path = os.fspath(path)
        self._token: str | None = None
        self._stamp: tuple[int, int, int, int] | None = None
        self.reads = 0

    def invalidate(self) -> None:
        """Read the file again at the next ``token()``."""
        self._stamp = None

    def token(self) -> str:
        """The current token; TokenError when the file is missing, empty or too big."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise TokenError(f"token file {self.path}: {exc.strerror or exc}") from exc
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._token is not None and stamp == self._stamp:
            return self._token
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise TokenError(f"token file {self.path}: {exc.strerror or exc}") from exc
        self.reads += 1
        if len(data) > MAX_TOKEN_BYTES:
            raise TokenError(f"token file {self.path}: larger than {MAX_TOKEN_BYTES} bytes")
        token = data.strip().decode("ascii", "replace")
        if not token or not token.isprintable() or " " in token:
            raise TokenError(f"token file {self.path}: no token in it")
        self._token, self._stamp = token, stamp
        return token


# ----------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Total:
    """A sum over pods: the known part, and how many pods were unknown."""

    bps: float
    known: int
    unknown: int


@dataclass(frozen=True)
class UsageReport:
    """What one ``fetch`` learned. ``pods`` by (namespace, name); ``nodes`` by name:
    ``"ok"``, or why its pods are unknown (``no_agent``, ``timeout``, ``connection``,
    ``http_401``, ``http_403``, ``http_503``, ``malformed``, ``wrong_node``,
    ``no_token``); ``agents`` the documents as received."""

    pods: Mapping[tuple[str, str], PodUsage]
    nodes: Mapping[str, str]
    agents: Mapping[str, NodeUsage]
    elapsed_s: float

    @property
    def unknown_nodes(self) -> frozenset[str]:
        """Nodes whose pods are unknown (their agent did not answer in time, or badly)."""
        return frozenset(n for n, s in self.nodes.items() if s != OK)

    def pod(self, namespace: str, name: str) -> PodUsage | None:
        """A pod's usage as its agent reported it; None when unknown (its node's agent
        did not answer, or does not know the pod). Its rates may still be None."""
        return self.pods.get((namespace, name))

    def egress(self, pods: Iterable[tuple[str, str]], *, mean_1s: bool = True) -> Total:
        """Egress summed over ``pods`` ((namespace, name) pairs): over the last second
        by default, else the last interval; a pod with no known rate counts as unknown."""
        return self._total(pods, "egress_bps_1s" if mean_1s else "egress_bps")

    def ingress(self, pods: Iterable[tuple[str, str]], *, mean_1s: bool = True) -> Total:
        """Ingress summed over ``pods``, as ``egress``."""
        return self._total(pods, "ingress_bps_1s" if mean_1s else "ingress_bps")

    def _total(self, pods: Iterable[tuple[str, str]], field: str) -> Total:
        bps, known, unknown = 0.0, 0, 0
        for key in pods:
            usage = self.pods.get(key)
            value = getattr(usage, field) if usage is not None else None
            if value is None:
                unknown += 1
            else:
                bps += value
                known += 1
        return Total(bps=bps, known=known, unknown=unknown)


# ----------------------------------------------------------------------- the client


class _AgentFailed(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class UsageClient:
    """Asks the agents (see the module docstring). ``errors`` counts failures by kind;
    ``on_error(kind)`` is called for each as well (the controller's metrics)."""

    def __init__(
        self,
        *,
        agents: AgentDirectory,
        token: TokenFile | Callable[[], str],
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_connections: int = 256,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        if not 0 < deadline_s <= 60:
            raise UsageError(f"deadline {deadline_s!r}: must be within (0, 60] seconds")
        self.agents = agents
        self._token = token
        self.deadline_s = deadline_s
        self._max_connections = max_connections
        self._on_error = on_error
        self._session: aiohttp.ClientSession | None = None
        self.errors: Counter[str] = Counter()
        self.fetches = 0

    async def __aenter__(self) -> UsageClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the HTTP session (kept-alive connections to the agents)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=4),
                trust_env=False,  # no proxy from the environment between us and the agents
                raise_for_status=False,
            )

    async def close(self) -> None:
        """Close the session (idempotent)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self,
        nodes: Iterable[str],
        *,
        namespace: str | None = None,
        selector: str | None = None,
        deadline_s: float | None = None,
    ) -> UsageReport:
        """Usage of the pods on ``nodes`` (optionally of one namespace, matching a label
        selector), within ``deadline_s`` (default: the client's). UsageError only for a
        bad argument; every agent failure is a node status in the report."""
        deadline = self.deadline_s if deadline_s is None else deadline_s
        if not 0 < deadline <= 60:
            raise UsageError(f"deadline {deadline!r}: must be within (0, 60] seconds")
        params: dict[str, str] = {}
        if namespace is not None:
            params["namespace"] = namespace
        if selector:
            try:
                parse_selector(selector)  # refuse it here, not as a 400 from every agent
            except SelectorError as exc:
                raise UsageError(f"selector {show(selector)}: {exc}") from exc
            params["selector"] = selector
        await self.start()
        started = time.monotonic()
        self.fetches += 1
        status: dict[str, str] = {}
        asked: dict[str, asyncio.Task[NodeUsage]] = {}
        wanted = sorted(set(nodes))
        try:
            token = self._read_token()
        except TokenError as exc:
            self._failed("no_token", f"cannot read the agents' token: {exc}")
            return self._report(dict.fromkeys(wanted, "no_token"), {}, started)
        for node in wanted:
            agent = self.agents.agent_for(node)
            if agent is None:
                status[node] = "no_agent"
                self._failed("no_agent", f"node {node}: no ready agent")
            else:
                asked[node] = asyncio.create_task(self._ask(agent, token, params, deadline))
        if asked:
            _, late = await asyncio.wait(asked.values(), timeout=deadline)
            for task in late:
                task.cancel()
            # Whatever they end with (cancelled, or a timeout of their own that won the
            # race): read below, never raised here.
            await asyncio.gather(*late, return_exceptions=True)
        received: dict[str, NodeUsage] = {}
        for node, task in asked.items():
            if task.cancelled():
                status[node] = "timeout"
                self._failed("timeout", f"node {node}: no answer within {deadline * 1000:g} ms")
                continue
            failure = task.exception()
            if isinstance(failure, _AgentFailed):
                status[node] = failure.kind
                self._failed(failure.kind, f"node {node}: {failure}")
            elif failure is not None:
                raise failure  # a bug, not an agent's failure
            else:
                received[node] = task.result()
                status[node] = OK
        return self._report(status, received, started)

    def _report(
        self, status: dict[str, str], received: dict[str, NodeUsage], started: float
    ) -> UsageReport:
        pods = {(p.namespace, p.name): p for usage in received.values() for p in usage.pods}
        return UsageReport(
            pods=MappingProxyType(pods),
            nodes=MappingProxyType(dict(sorted(status.items()))),
            agents=MappingProxyType(received),
            elapsed_s=time.monotonic() - started,
        )

    def _read_token(self) -> str:
        if isinstance(self._token, TokenFile):
            return self._token.token()
        return self._token()

    async def _ask(
        self, agent: AgentEndpoint, token: str, params: dict[str, str], deadline: float
    ) -> NodeUsage:
        assert self._session is not None
        try:
            async with self._session.get(
                agent.url,
                params=params,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                allow_redirects=False,  # the token goes to the agent and nowhere else
                timeout=aiohttp.ClientTimeout(total=deadline),
            ) as resp:
                if resp.status != 200:
                    if resp.status == 401 and isinstance(self._token, TokenFile):
                        self._token.invalidate()  # maybe rotated under us: read it again
                    raise _AgentFailed(
                        f"http_{resp.status}", f"HTTP {resp.status} from {agent.url}"
                    )
                body = await _read_bounded(resp)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise _AgentFailed("timeout", f"{agent.url}: timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _AgentFailed("connection", f"{agent.url}: {type(exc).__name__}: {exc}") from exc
        try:
            usage = decode(body)
        except WireError as exc:
            raise _AgentFailed("malformed", f"{agent.url}: {exc}") from exc
        if usage.node != agent.node:
            raise _AgentFailed(
                "wrong_node", f"{agent.url} answered for node {show(usage.node)}, not {agent.node}"
            )
        return usage

    def _failed(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        log.debug("usage: %s", message)
        if self._on_error is not None:
            self._on_error(kind)


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_DOCUMENT_BYTES:
        raise _AgentFailed("malformed", f"a document of {resp.content_length} bytes")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_DOCUMENT_BYTES:
            raise _AgentFailed("malformed", f"a document larger than {MAX_DOCUMENT_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------- for the loop


class AgentUsage:
    """The control loop's ``UsageSource`` on Kubernetes: asks the agents of the nodes
    that run the given pods and sums each workload's pods per scope (per workload, and
    per workload and node). A scope is reported only when every one of its pods is
    known: a partial sum would read as a workload sending less than it does, and a cut
    from it would bite too deep. ``unknown`` counts, after each call, the pods whose
    usage was not known, per workload."""

    def __init__(
        self,
        client: UsageClient,
        *,
        mean_1s: bool = False,
        on_unknown: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        # The last sampling interval by default: the policy keeps its own mean over
        # usage_window, and a second 1 s mean would only add lag.
        self.client = client
        self.mean_1s = mean_1s
        self._on_unknown = on_unknown
        self.unknown: dict[str, int] = {}
        self.last: UsageReport | None = None

    async def usage(self, pods: Mapping[str, Sequence[PodRef]]) -> dict[Scope, float]:
        """Mbit/s per ``Scope`` of ``pods`` (workload -> its pods); see the class."""
        nodes = {p.node for refs in pods.values() for p in refs if p.node}
        report = await self.client.fetch(nodes)
        self.last = report
        out: dict[Scope, float] = {}
        unknown: dict[str, int] = {}
        for workload, refs in pods.items():
            by_node: dict[str, list[tuple[str, str]]] = {}
            for p in refs:
                by_node.setdefault(p.node or CLUSTER, []).append((p.namespace, p.name))
            missing = 0
            for node, keys in by_node.items():
                total = report.egress(keys, mean_1s=self.mean_1s)
                missing += total.unknown
                if node != CLUSTER and total.unknown == 0:
                    out[Scope(workload, node)] = total.bps * 8 / 1e6
            unknown[workload] = missing
            if refs and missing == 0:
                everywhere = report.egress(
                    [(p.namespace, p.name) for p in refs], mean_1s=self.mean_1s
                )
                out[Scope(workload)] = everywhere.bps * 8 / 1e6
        self.unknown = unknown
        if self._on_unknown is not None:
            self._on_unknown(unknown)
        return out
