"""``detnet agent`` as a running service: the pod watch of this node, the sampling loop,
the HTTP server; started, health-checked and closed as one.

Two threads: the event loop (watch, sampling ticks, TokenReviews: all the state) and
the HTTP server's own loop (``engine/httpserver.py``). The HTTP side hands each
authentication and each snapshot to the main loop (``run_coroutine_threadsafe``) and
gets back immutable values, so no state is shared across threads unguarded. Ticks
run on absolute deadlines (``engine/scheduler.py``): a late loop skips and counts the
missed ticks instead of bursting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from detnet.controller.agent.auth import (
    AUDIENCE,
    CONTROLLER_ACCOUNT,
    AuthDecision,
    Authenticator,
    Reviewer,
    token_reviewer,
)
from detnet.controller.agent.metrics import AgentCollector, AgentParts
from detnet.controller.agent.pods import NodePods
from detnet.controller.agent.procfs import DEFAULT_SCAN_BUDGET, ProcResolver
from detnet.controller.agent.sampler import Sampler, Snapshot
from detnet.controller.agent.server import USAGE_PATH, UsageRoute
from detnet.controller.kube.api import KubeClient
from detnet.controller.kube.listwatch import ListWatch
from detnet.engine.httpserver import HttpLimits, MetricsServer
from detnet.engine.scheduler import Schedule

log = logging.getLogger(__name__)

DEFAULT_PORT = 9109
DEFAULT_INTERVAL_NS = 100_000_000
# The agent's own share of the API server: a pod watch and a TokenReview now and then.
AGENT_QPS = 20.0
AGENT_BURST = 20


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything ``detnet agent`` needs, validated by the CLI."""

    node: str
    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    metrics_listen: tuple[str, int] | None = None  # a second listener, for Prometheus
    allow: frozenset[tuple[str, str]] = field(
        default_factory=lambda: frozenset({CONTROLLER_ACCOUNT})
    )
    interval_ns: int = DEFAULT_INTERVAL_NS
    window_ns: int = 1_000_000_000
    audience: str = AUDIENCE
    proc: str = "/proc"
    scan_budget: int = DEFAULT_SCAN_BUDGET
    limits: HttpLimits = field(default_factory=HttpLimits)


class Agent:
    """One node's agent: ``async with Agent(config, api_client=...) as agent: ...``.

    ``api_client`` is a kubernetes-asyncio ``ApiClient`` the caller closes; ``reviewer``
    replaces the TokenReview call (tests)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        api_client: Any,
        reviewer: Reviewer | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.api_errors: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.kube = KubeClient(
            api_client, qps=AGENT_QPS, burst=AGENT_BURST, on_api_error=self._api_error
        )
        self.pods = NodePods(config.node)
        self.resolver = ProcResolver(
            proc=config.proc, scan_budget=config.scan_budget, errors=self.errors
        )
        self.sampler = Sampler(
            pods=self.pods,
            resolver=self.resolver,
            interval_ns=config.interval_ns,
            window_ns=config.window_ns,
        )
        self.auth = Authenticator(
            review=reviewer or token_reviewer(self.kube, audience=config.audience),
            allow=config.allow,
        )
        self.route = UsageRoute(snapshot=self._snapshot_async, authenticate=self._authenticate)
        self.parts = AgentParts(
            node=config.node,
            pods=self.pods,
            resolver=self.resolver,
            sampler=self.sampler,
            auth=self.auth,
            route=self.route,
            snapshot=self._snapshot_blocking,
            api_errors=self.api_errors,
        )
        self.registry = registry or CollectorRegistry()
        self.registry.register(AgentCollector(self.parts))
        self.server: MetricsServer | None = None
        self.metrics_server: MetricsServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_tick_ns = 0

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        """Where the HTTP server listens (the real port when 0 was asked for)."""
        assert self.server is not None, "not started"
        return self.server.address

    async def start(self) -> tuple[str, int]:
        """Start the watch, the sampling loop and the HTTP server (HttpServerError when
        the address is unusable: then nothing is left running)."""
        from kubernetes_asyncio.client import CoreV1Api

        self._loop = asyncio.get_running_loop()
        watch = ListWatch(
            kube=self.kube,
            list_call=CoreV1Api(self.kube.api_client).list_pod_for_all_namespaces,
            what=f"pods on node {self.config.node}",
            field_selector=f"spec.nodeName={self.config.node}",
        )
        self._tasks = [
            asyncio.create_task(watch.run(self.pods), name="agent-pod-watch"),
            asyncio.create_task(self._sample_forever(), name="agent-sampler"),
        ]
        self.server = MetricsServer(
            *self.config.listen,
            registry=self.registry,
            healthz=self.healthz,
            readyz=self.readyz,
            routes={USAGE_PATH: self.route.handle},
            limits=self.config.limits,
        )
        try:
            address = self.server.start()
            if self.config.metrics_listen is not None:
                # /metrics, /healthz, /readyz only: Prometheus need not reach /v1/usage.
                self.metrics_server = MetricsServer(
                    *self.config.metrics_listen,
                    registry=self.registry,
                    healthz=self.healthz,
                    readyz=self.readyz,
                    limits=self.config.limits,
                )
                self.metrics_server.start()
        except BaseException:
            await self.close()
            raise
        return address

    async def close(self) -> None:
        """Stop serving, end the tasks, close every /proc descriptor (idempotent)."""
        for server in (self.server, self.metrics_server):
            if server is not None:
                server.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.resolver.close()

    def served_snapshot(self) -> Snapshot | None:
        """The snapshot to serve (on the main loop): the latest tick's, once a tick ran
        after the pod list synced (before that, "no pods" would be a lie)."""
        return self.sampler.snapshot() if self.sampler.synced else None

    async def _served_on_loop(self) -> Snapshot | None:
        return self.served_snapshot()

    async def _snapshot_async(self) -> Snapshot | None:
        # Called on the HTTP server's loop; the sampler lives on ours.
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._served_on_loop(), self._loop)
        return await asyncio.wrap_future(future)

    def _snapshot_blocking(self) -> Snapshot | None:
        """For a scrape on the HTTP thread: the snapshot from the main loop, or the last
        one built when the loop does not answer within half a second (it is closing)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return self.sampler.last_snapshot
        future = asyncio.run_coroutine_threadsafe(self._served_on_loop(), loop)
        try:
            return future.result(timeout=0.5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return self.sampler.last_snapshot

    def healthz(self) -> tuple[bool, str]:
        """Alive: the sampling loop ticked recently and the watch task runs."""
        late_ns = max(2_000_000_000, 20 * self.config.interval_ns)
        if any(t.done() for t in self._tasks):
            return False, "a task of the agent ended"
        if self._last_tick_ns and time.monotonic_ns() - self._last_tick_ns > late_ns:
            return False, "the sampling loop has not ticked recently"
        return True, f"ok: {self.sampler.ticks} samples"

    def readyz(self) -> tuple[bool, str]:
        """Ready: the pods of the node are listed and sampled."""
        if not self.pods.synced:
            return False, "pods of the node not listed yet"
        if not self.sampler.synced:
            return False, "not sampled yet"
        return True, f"ok: {len(self.pods.pods)} pods, {self.sampler.ticks} samples"

    def _api_error(self, code: str) -> None:
        self.api_errors[code] += 1

    async def _authenticate(self, header: str | None) -> AuthDecision:
        # Called on the HTTP server's loop; the authenticator lives on ours.
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self.auth.authenticate(header), self._loop)
        return await asyncio.wrap_future(future)

    async def _sample_forever(self) -> None:
        schedule = Schedule(interval_ns=self.config.interval_ns, start_ns=time.monotonic_ns())
        while True:
            now = time.monotonic_ns()
            fire = schedule.fire(now, slack_ns=1_000_000)  # libuv timers round to 1 ms
            if fire is not None:
                self.parts.skipped_samples += fire.skipped
                try:
                    self.sampler.tick(now)
                except Exception:
                    # A bug must not stop sampling for good; healthz shows if it persists.
                    self.errors["sample_failed"] += 1
                    log.exception("sampling tick failed")
                else:
                    self._last_tick_ns = now
            await asyncio.sleep(max(0.0, (schedule.next_deadline_ns - time.monotonic_ns()) / 1e9))
