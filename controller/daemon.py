"""The controller process: probe engine, metrics server, control loop and enforcer.

``make_plan()`` checks everything a run needs without touching anything (the enforcer
can be built from the config, every service name resolves, the Lease's namespace is
known) and returns a frozen ``Plan``; ``Daemon(plan)`` runs it: ``await daemon.run()``
starts the engine, serves /metrics, /healthz (the loop ticked recently) and /readyz (the
engine has data and the enforcer started), and steps the control loop until ``stop()``
or the plan's duration. On the way out the loop finishes its step (an apply in flight
completes), the enforcer closes (restoring max_bandwidth when
``kubernetes.release_on_exit``) and the engine drains. ``detnet control`` parses flags
into a plan and hands it over; tests start a Daemon in-process the same way.

With the ``kubernetes`` enforcer the loop runs only while this replica holds the Lease
(controller/leader.py); each leadership term starts a fresh enforcer that resumes from
the limits recorded on the workloads. Critical apps probed by endpoint
(``endpoints: pods``) are watched through their Services' EndpointSlices for the whole
run, leader or not (a standby replica measures too); with ``usage: agent`` the loop asks
the node agents, found through their Service's EndpointSlices, for the best-effort
pods' usage. The daemon installs no signal handlers: its owner calls ``stop()`` (the CLI
does on SIGTERM/SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TextIO

from prometheus_client import CollectorRegistry

from detnet.controller.aimd import AsymmetricAimd, Scope, ScopeMode
from detnet.controller.config import Config, lease_namespace, resolve_targets
from detnet.controller.config.model import CriticalApp
from detnet.controller.endpoints.service import ServiceNameError, ServiceRef, parse_service
from detnet.controller.enforce.base import DryRunEnforcer, Enforcer
from detnet.controller.errors import CommandError
from detnet.controller.loop import ControlLoop, DecisionLog, UsageSource
from detnet.controller.metrics import ControllerMetrics
from detnet.engine.core import ProbeEngine
from detnet.engine.httpserver import MetricsServer
from detnet.engine.stream import SampleStream
from detnet.engine.targets import Target

if TYPE_CHECKING:
    from detnet.controller.endpoints.probes import EndpointProbes
    from detnet.controller.kube.api import KubeClient

log = logging.getLogger("detnet.control")

EnforcerKind = Literal["dry-run", "tc", "kubernetes"]
ENFORCERS: tuple[EnforcerKind, ...] = ("dry-run", "tc", "kubernetes")
LogFormat = Literal["text", "json"]
_STOP_WAIT_S = 30.0  # a leader's last step (and its patches) before the Lease is released


@dataclasses.dataclass(frozen=True, kw_only=True)
class EndpointApp:
    """A critical app probed at every ready endpoint of its Service."""

    app: str
    service: ServiceRef
    template: Target  # how each endpoint is probed (port, cadence, mode, size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """One run of the controller, validated: nothing in it can fail to be used."""

    config: Config
    targets: tuple[Target, ...]  # resolved: addresses, not names
    listen: tuple[str, int]  # the metrics server; port 0 picks one (Daemon.address)
    enforcer: EnforcerKind
    lease_namespace: str
    duration_s: float | None = None  # None: until stop()
    log_format: LogFormat = "text"
    endpoint_apps: tuple[EndpointApp, ...] = ()
    scope: ScopeMode = "cluster"
    agent_usage: bool = False  # ask the node agents for the best-effort pods' usage

    @property
    def needs_api(self) -> bool:
        """Whether the run talks to the API server (enforcer, endpoints or agents)."""
        return self.enforcer == "kubernetes" or bool(self.endpoint_apps)


def _probed_by_endpoint(app: CriticalApp, enforcer: EnforcerKind) -> ServiceRef | None:
    """The Service whose endpoints ``app`` is probed at, or None (at its address).

    ``endpoints: pods`` by default with the Kubernetes enforcer where the app names a
    Service; a name that is not one (a DNS name outside the cluster) is resolved."""
    if app.endpoints == "service" or app.host is not None or app.service is None:
        return None
    if app.endpoints is None and enforcer != "kubernetes":
        return None
    try:
        return parse_service(app.service, namespace=app.namespace)
    except ServiceNameError:
        if app.endpoints == "pods":
            raise  # the schema refused it already: not reached for a parsed config
        return None


def make_plan(
    config: Config,
    *,
    enforcer: EnforcerKind,
    listen: tuple[str, int],
    pod_namespace: str | None = None,
    duration_s: float | None = None,
    log_format: LogFormat = "text",
) -> Plan:
    """Check that ``config`` can run with ``enforcer`` and resolve its services.

    ``pod_namespace`` is the controller's own namespace (``POD_NAMESPACE``), where the
    Lease lives unless the config names one. Raises ConfigError or CommandError; opens,
    binds and patches nothing."""
    if enforcer not in ENFORCERS:
        raise CommandError(f"enforcer {enforcer!r}: must be one of {', '.join(ENFORCERS)}")
    if duration_s is not None and not duration_s > 0:
        raise CommandError(f"duration {duration_s}: must be positive")
    if enforcer == "tc":
        missing = [t.name for t in config.best_effort_targets if t.tc is None]
        if missing:
            raise CommandError(
                f"{config.source}: --enforcer tc needs a tc: {{device: ...}} block on every "
                f"best-effort target; missing on {', '.join(missing)}"
            )
    templates = {t.name: t for t in config.targets()}
    endpoint_apps = tuple(
        EndpointApp(app=app.name, service=ref, template=templates[app.name])
        for app in config.critical_apps
        if (ref := _probed_by_endpoint(app, enforcer)) is not None
    )
    usage = config.usage or ("agent" if enforcer == "kubernetes" else "none")
    return Plan(
        config=config,
        targets=tuple(resolve_targets(config, skip={e.app for e in endpoint_apps})),
        listen=listen,
        enforcer=enforcer,
        lease_namespace=lease_namespace(config, pod_namespace=pod_namespace),
        duration_s=duration_s,
        log_format=log_format,
        endpoint_apps=endpoint_apps,
        scope=config.control.scope or ("node" if endpoint_apps else "cluster"),
        agent_usage=usage == "agent" and enforcer == "kubernetes",
    )


def _local_enforcer(plan: Plan) -> Enforcer:
    """The dry-run or tc enforcer of ``plan`` (make_plan checked the tc blocks)."""
    if plan.enforcer == "dry-run":
        return DryRunEnforcer()
    from detnet.controller.enforce.tc import TcEnforcer

    return TcEnforcer({t.name: t.tc for t in plan.config.best_effort_targets if t.tc is not None})


def _kubernetes_enforcer(config: Config, metrics: ControllerMetrics, kube: KubeClient) -> Enforcer:
    from detnet.controller.enforce.kubernetes import KubernetesEnforcer

    k = config.kubernetes
    return KubernetesEnforcer(
        config.best_effort_targets, kube=kube, mode=k.mode, max_concurrency=k.concurrency
    )


class Daemon:
    """One run of the controller: ``await run()`` until ``stop()`` or the plan's duration.

    ``stream`` (a ``SampleStream``) gets one JSON line per finished probe, off the loop;
    decisions go to ``log_stream`` (default stdout). ``registry``
    collects the engine's and the controller's metrics (a fresh one by default)."""

    def __init__(
        self,
        plan: Plan,
        *,
        stream: SampleStream | None = None,
        log_stream: TextIO | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.plan = plan
        self.stream = stream
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.loop: ControlLoop | None = None  # the loop of the current leadership term
        self.standby = False  # kubernetes: waiting for the lease
        self.address: tuple[str, int] | None = None  # the metrics server's, once serving
        self.serving = asyncio.Event()  # set when /metrics answers
        self._stop = asyncio.Event()
        cfg = plan.config
        self.engine = ProbeEngine(
            plan.targets,
            window_ns=None if cfg.control.window_s is None else round(cfg.control.window_s * 1e9),
            window_samples=cfg.control.window_samples,
            on_sample=stream,
            allow_empty=bool(plan.endpoint_apps),  # endpoints arrive once the watch lists
            max_total_rate_pps=cfg.control.max_probe_rate,
        )
        self.probes: EndpointProbes | None = None  # the endpoint targets, once watched
        self.usage: UsageSource | None = None  # the agents, with usage: agent
        self.decision_log = DecisionLog(
            fmt=plan.log_format, stream=sys.stdout if log_stream is None else log_stream
        )

    def stop(self) -> None:
        """End the run: the loop finishes its step, then everything closes (call on the
        daemon's event loop)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called (or the duration passed)."""
        return self._stop.is_set()

    def _new_loop(self, enforcer: Enforcer) -> ControlLoop:
        """A loop with a fresh policy (cut/dwell timers) around ``enforcer``."""
        cfg = self.plan.config
        params = dataclasses.replace(cfg.policy, scope=self.plan.scope)
        policy = AsymmetricAimd(params=params, slos=cfg.slos(), workloads=cfg.workloads())
        self.metrics.expect(enforcer=enforcer.name, agent_usage=self.plan.agent_usage)
        self.loop = ControlLoop(
            engine=self.engine,
            policy=policy,
            enforcer=enforcer,
            interval_s=cfg.control.control_interval_s,
            metrics=self.metrics,
            decision_log=self.decision_log,
            endpoints=self.probes.endpoints if self.probes is not None else None,
            usage=self.usage,
        )
        return self.loop

    def _restore(self) -> Mapping[Scope, int] | None:
        """Limits to leave behind on exit: max_bandwidth when release_on_exit."""
        cfg = self.plan.config
        if not cfg.kubernetes.release_on_exit:
            return None
        return {Scope(t.name): cfg.policy.max_bandwidth for t in cfg.best_effort_targets}

    async def _term(self, enforcer: Enforcer) -> None:
        """Run one loop over ``enforcer`` until stopped, then close the enforcer."""
        loop = self._new_loop(enforcer)
        restore: Mapping[Scope, int] | None = None
        try:
            await loop.start()
            await loop.run()
            restore = self._restore() if self._stop.is_set() else None
        finally:
            # Shielded: a cancelled term (lost lease) still finishes its patches.
            await asyncio.shield(enforcer.close(restore=restore))

    def healthz(self) -> tuple[bool, str]:
        """/healthz: the loop ticked recently (or is waiting for the Lease)."""
        loop = self.loop
        if loop is None or not loop.started:
            return True, "standby: waiting for the lease" if self.standby else "starting"
        if loop.healthy():
            return True, f"ok: {loop.steps} steps"
        return False, "control loop has not ticked recently"

    def readyz(self) -> tuple[bool, str]:
        """/readyz: probe replies arrived and the enforcer started."""
        stats = self.engine.stats()
        if not any(s.received > 0 for s in stats.values()):
            return False, "no probe replies yet"
        loop = self.loop
        if loop is None or not loop.started:
            return False, "enforcer not started"
        return True, "ok"

    async def run(self) -> None:
        """Run until ``stop()`` (or the duration); everything started is closed again."""
        server: MetricsServer | None = None
        try:
            if self.stream is not None:
                self.stream.start()
            await self.engine.start()
            self.registry.register(self.engine.collector())
            server = MetricsServer(
                *self.plan.listen,
                registry=self.registry,
                healthz=self.healthz,
                readyz=self.readyz,
            )
            self.address = server.start()
            log.info("metrics on http://%s:%d/metrics", *self.address)
            self.serving.set()
            if self.plan.duration_s is not None:
                asyncio.get_running_loop().call_later(self.plan.duration_s, self.stop)
            if self.plan.needs_api:
                await self._run_with_api()
            else:
                await self._run_local(_local_enforcer(self.plan))
        finally:
            if server is not None:
                server.stop()
            await self.engine.aclose()
            if self.stream is not None:
                self.stream.close()

    async def _run_local(self, enforcer: Enforcer) -> None:
        task = asyncio.create_task(self._term(enforcer))
        await _until(self._stop, task)
        if self.loop is not None:
            self.loop.stop()
        await task

    async def _run_with_api(self) -> None:
        """The run with an API client: endpoint watches and agents for the whole run,
        then the Kubernetes enforcer's leadership terms (or a local enforcer)."""
        from detnet.controller.kube.api import (
            KubeClient,
            default_identity,
            load_client_configuration,
            new_api_client,
        )

        cfg = self.plan.config
        conf = await load_client_configuration()
        identity = default_identity()
        api = new_api_client(conf, identity=identity)
        # One limiter for everything: elector, enforcer, watches, within the QPS.
        kube = KubeClient(api, qps=cfg.kubernetes.qps, on_api_error=self.metrics.api_error)
        background: list[asyncio.Task[Any]] = []
        closers: list[Any] = []
        try:
            if self.plan.endpoint_apps:
                background += await self._watch_endpoints(kube)
            if self.plan.agent_usage:
                background.append(self._watch_agents(kube, closers))
            for task in background:
                task.add_done_callback(_log_crash)
            if self.plan.enforcer == "kubernetes":
                await self._run_kubernetes(kube, identity)
            else:
                await self._run_local(_local_enforcer(self.plan))
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for close in closers:
                await close()
            await api.close()

    async def _watch_endpoints(self, kube: KubeClient) -> list[asyncio.Task[Any]]:
        """Start every endpoint app's watch; the first lists are probed before this
        returns (EndpointsError, and the run ends, when a Service cannot be read)."""
        from detnet.controller.endpoints.probes import EndpointProbes
        from detnet.controller.endpoints.watch import EndpointWatch

        probes = EndpointProbes(
            engine=self.engine,
            templates={e.app: e.template for e in self.plan.endpoint_apps},
            static=self.plan.targets,
        )
        self.probes = probes
        watches = [
            EndpointWatch(
                kube=kube,
                app=e.app,
                service=e.service,
                port=e.template.port,
                protocol=e.template.protocol,
                on_change=probes.on_change,
            )
            for e in self.plan.endpoint_apps
        ]
        await asyncio.gather(*(w.start() for w in watches))
        await probes.sync()
        tasks = [asyncio.create_task(w.run(), name=f"endpoints-{w.app}") for w in watches]
        tasks.append(asyncio.create_task(probes.run(), name="endpoint-probes"))
        return tasks

    def _watch_agents(self, kube: KubeClient, closers: list[Any]) -> asyncio.Task[Any]:
        """Find the agents through their Service's EndpointSlices and ask them for usage."""
        from detnet.controller.usage import (
            AgentUsage,
            EndpointSliceAgents,
            TokenFile,
            UsageClient,
            watch_agents,
        )

        agent = self.plan.config.agent
        directory = EndpointSliceAgents()
        client = UsageClient(
            agents=directory,
            token=TokenFile(agent.token_file),
            deadline_s=agent.deadline_s,
            on_error=lambda kind: self.metrics.usage_errors.labels(kind=kind).inc(),
        )
        closers.append(client.close)
        self.usage = AgentUsage(client, on_unknown=self.metrics.set_unknown_pods)
        watch = watch_agents(kube, directory, namespace=agent.namespace, service=agent.service)
        return asyncio.create_task(watch.run(directory), name="agents")

    async def _run_kubernetes(self, kube: KubeClient, identity: str) -> None:
        from detnet.controller.leader import LeaseElector

        cfg = self.plan.config
        elector = LeaseElector(
            kube=kube,
            namespace=self.plan.lease_namespace,
            name=cfg.kubernetes.lease_name,
            identity=identity,
        )
        elector.on_change(lambda leading: self.metrics.leader.set(1 if leading else 0))
        self.standby = True

        async def work() -> None:
            await self._term(_kubernetes_enforcer(cfg, self.metrics, kube))

        pods = asyncio.create_task(self._export_enforced_pods())
        task = asyncio.create_task(elector.run(work))
        try:
            await _until(self._stop, task)
            if self.loop is not None and elector.is_leader:
                self.loop.stop()  # let the step (and its apply) finish, then close
                await asyncio.wait({task}, timeout=_STOP_WAIT_S)
            await elector.release()
            await task
        finally:
            pods.cancel()
            await asyncio.gather(pods, return_exceptions=True)

    async def _export_enforced_pods(self) -> None:
        """Refresh detnet_enforced_pods from the enforcer's watch cache every second."""
        while True:
            await asyncio.sleep(1.0)
            loop = self.loop
            counts = getattr(loop.enforcer, "enforced_pods", None) if loop else None
            if callable(counts):
                for workload, n in counts().items():
                    self.metrics.enforced_pods.labels(workload=workload).set(n)


def _log_crash(task: asyncio.Task[Any]) -> None:
    """A background watch that ends with an error is logged, not silently lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %s", task.get_name(), task.exception())


async def _until(stop: asyncio.Event, task: asyncio.Task[Any]) -> None:
    """Wait for ``stop`` or for ``task`` to end (re-raising its error)."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({stopper, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
    if task.done():
        task.result()
