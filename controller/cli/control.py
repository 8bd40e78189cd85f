"""`detnet control`: the engine, the policy and an enforcer in one process, on uvloop.

Everything that can be wrong with the input (config, flags, unresolvable services, a tc
enforcer without devices) is checked before the first socket opens or the first limit is
written: a bad config exits 2 and touches nothing. Then: the probe engine starts, the
metrics server serves /metrics, /healthz (the loop ticked recently) and /readyz (the
engine has data and the enforcer started), and the control loop runs until SIGTERM/SIGINT
or ``--duration``. On the way out the loop finishes its step (an apply in flight
completes), the enforcer closes (restoring max_bandwidth when
``kubernetes.release_on_exit``), the engine drains, and the exit status is 0.

With ``--enforcer kubernetes`` the loop runs only while this replica holds the Lease
(controller/leader.py); each leadership term starts a fresh enforcer that resumes from
the limits recorded on the workloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import IO, Any

from prometheus_client import CollectorRegistry

from detnet.controller.aimd import AsymmetricAimd
from detnet.controller.config import Config, lease_namespace, load_config, resolve_targets
from detnet.controller.enforce.base import DryRunEnforcer, Enforcer
from detnet.controller.errors import CommandError
from detnet.controller.loop import ControlLoop, DecisionLog
from detnet.controller.metrics import ControllerMetrics
from detnet.engine import runloop
from detnet.engine.core import ProbeEngine
from detnet.engine.httpserver import MetricsServer
from detnet.engine.parse import ParseError, parse_address, parse_duration_ns, show
from detnet.engine.recorder import Sample
from detnet.engine.targets import Target

log = logging.getLogger("detnet.control")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `control` subcommand."""
    p = sub.add_parser(
        "control",
        help="probe critical services and cap best-effort egress (engine + policy + enforcer)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="controller config (YAML)")
    p.add_argument("--dry-run", action="store_true", help="decide and log, but enforce nothing")
    p.add_argument(
        "--enforcer",
        choices=("kubernetes", "tc"),
        default="kubernetes",
        help="where limits go: pod annotations (default) or tc on local interfaces",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /metrics here (default: config metrics.listen)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument(
        "--duration", metavar="TIME", help="stop after this long (30s, 2m; a bare number: seconds)"
    )
    p.add_argument(
        "--stream",
        metavar="FILE",
        help="write one JSON line per finished probe to FILE ('-' for stdout)",
    )
    p.set_defaults(func=run)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan:
    """Everything validated up front, before anything is touched."""

    config: Config
    targets: list[Target]
    listen: tuple[str, int]
    lease_namespace: str
    make_enforcer: Callable[[ControllerMetrics, Any], Enforcer] | None  # None: kubernetes


def run(args: argparse.Namespace) -> int:
    """Validate everything, then run until a signal or --duration; exit status 0."""
    if args.duration is not None:
        try:
            args.duration = parse_duration_ns(args.duration) / 1e9
        except ParseError as exc:
            raise CommandError(f"--duration {show(args.duration)}: {exc}") from exc
    config = load_config(args.config)  # ConfigError: exit 2, nothing touched
    for warning in config.warnings:
        print(f"detnet control: warning: {warning}", file=sys.stderr)
    try:
        listen = parse_address(args.metrics or config.metrics_listen, port_zero=True)
    except ParseError as exc:
        raise CommandError(f"--metrics {show(args.metrics)}: {exc}") from exc
    targets = resolve_targets(config)
    plan = _Plan(
        config=config,
        targets=targets,
        listen=listen,
        # The Lease lives in the controller's own namespace unless the config names one.
        lease_namespace=lease_namespace(config, pod_namespace=os.environ.get("POD_NAMESPACE")),
        make_enforcer=_enforcer_factory(config, dry_run=args.dry_run, kind=args.enforcer),
    )
    stream: IO[str] | None = None
    if args.stream == "-":
        stream = sys.stdout
    elif args.stream:
        try:
            stream = open(args.stream, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CommandError(f"--stream {args.stream}: {exc.strerror}") from exc
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return runloop.run(_main(plan, args, stream))
    finally:
        if stream is not None and stream is not sys.stdout:
            stream.close()


def _enforcer_factory(
    config: Config, *, dry_run: bool, kind: str
) -> Callable[[ControllerMetrics, Any], Enforcer] | None:
    """Check the enforcer can be built from the config; return a builder (None: k8s)."""
    if dry_run:
        return lambda metrics, api: DryRunEnforcer()
    if kind == "tc":
        from detnet.controller.enforce.tc import TcDevice, TcEnforcer

        missing = [t.name for t in config.best_effort_targets if t.tc is None]
        if missing:
            raise CommandError(
                f"{config.source}: --enforcer tc needs a tc: {{device: ...}} block on every "
                f"best-effort target; missing on {', '.join(missing)}"
            )
        devices = {
            t.name: TcDevice(device=t.tc.device, netns=t.tc.netns)
            for t in config.best_effort_targets
            if t.tc is not None
        }
        return lambda metrics, api: TcEnforcer(devices)
    return None


def _kubernetes_enforcer(config: Config, metrics: ControllerMetrics, kube: Any) -> Enforcer:
    from detnet.controller.enforce.kubernetes import KubernetesEnforcer, WorkloadRef

    k = config.kubernetes
    return KubernetesEnforcer(
        [
            WorkloadRef(
                name=t.name,
                namespace=t.namespace,
                kind=t.kind,
                workload=t.workload,
                selector=t.selector,
                initial_mbps=t.initial_bandwidth,
            )
            for t in config.best_effort_targets
        ],
        kube=kube,
        mode="pod" if k.mode == "annotation" else "template",
        max_concurrency=k.concurrency,
    )


class _Controller:
    """One run of `detnet control`: engine, metrics server, loop(s), shutdown."""

    def __init__(self, plan: _Plan, args: argparse.Namespace, stream: IO[str] | None) -> None:
        self.plan = plan
        self.args = args
        self.stream = stream
        self.registry = CollectorRegistry()
        self.metrics = ControllerMetrics(self.registry)
        self.stop = asyncio.Event()
        self.loop: ControlLoop | None = None  # the loop of the current leadership term
        self.standby = False  # kubernetes: waiting for the lease
        cfg = plan.config
        self.engine = ProbeEngine(
            plan.targets,
            window_ns=None if cfg.control.window_s is None else round(cfg.control.window_s * 1e9),
            window_samples=cfg.control.window_samples,
            on_sample=self._on_sample if stream is not None else None,
        )
        # Probe records own stdout when streamed there; decisions then go to stderr.
        log_to = sys.stderr if stream is sys.stdout else sys.stdout
        self.decision_log = DecisionLog(fmt=args.log_format, stream=log_to)

    def _on_sample(self, sample: Sample) -> None:
        assert self.stream is not None
        self.stream.write(json.dumps(dataclasses.asdict(sample), separators=(",", ":")) + "\n")

    def new_loop(self, enforcer: Enforcer) -> ControlLoop:
        """A loop with a fresh policy (cut/dwell timers) around ``enforcer``."""
        cfg = self.plan.config
        policy = AsymmetricAimd(cfg.policy, cfg.slos(), cfg.workloads())
        self.loop = ControlLoop(
            self.engine,
            policy,
            enforcer,
            interval_s=cfg.control.control_interval_s,
            metrics=self.metrics,
            decision_log=self.decision_log,
        )
        return self.loop

    def restore(self) -> dict[str, int] | None:
        """Limits to leave behind on exit: max_bandwidth when release_on_exit."""
        cfg = self.plan.config
        if not cfg.kubernetes.release_on_exit:
            return None
        return {t.name: cfg.policy.max_bandwidth for t in cfg.best_effort_targets}

    async def term(self, enforcer: Enforcer) -> None:
        """Run one loop over ``enforcer`` until stopped, then close the enforcer."""
        loop = self.new_loop(enforcer)
        restore: dict[str, int] | None = None
        try:
            await loop.start()
            await loop.run()
            restore = self.restore() if self.stop.is_set() else None
        finally:
            # Shielded: a cancelled term (lost lease) still finishes its patches.
            await asyncio.shield(enforcer.close(restore=restore))

    def healthz(self) -> tuple[bool, str]:
        loop = self.loop
        if loop is None or not loop.started:
            return True, "standby: waiting for the lease" if self.standby else "starting"
        if loop.healthy():
            return True, f"ok: {loop.steps} steps"
        return False, "control loop has not ticked recently"

    def readyz(self) -> tuple[bool, str]:
        stats = self.engine.stats()
        if not any(s.received > 0 for s in stats.values()):
            return False, "no probe replies yet"
        loop = self.loop
        if loop is None or not loop.started:
            return False, "enforcer not started"
        return True, "ok"

    async def run(self) -> int:
        runloop.stop_on_signals(self.stop)
        server: MetricsServer | None = None
        try:
            await self.engine.start()
            self.registry.register(self.engine.collector())
            server = MetricsServer(
                *self.plan.listen,
                registry=self.registry,
                healthz=self.healthz,
                readyz=self.readyz,
            )
            host, port = server.start()
            log.info("metrics on http://%s:%d/metrics", host, port)
            if self.args.duration is not None:
                asyncio.get_running_loop().call_later(self.args.duration, self.stop.set)
            if self.plan.make_enforcer is not None:
                await self._run_local(self.plan.make_enforcer(self.metrics, None))
            else:
                await self._run_kubernetes()
        finally:
            if server is not None:
                server.stop()
            await self.engine.aclose()
            runloop.clear_signals()
        return 0

    async def _run_local(self, enforcer: Enforcer) -> None:
        task = asyncio.create_task(self.term(enforcer))
        await _until(self.stop, task)
        if self.loop is not None:
            self.loop.stop()
        await task

    async def _run_kubernetes(self) -> None:
        from detnet.controller.kube.api import (
            KubeClient,
            default_identity,
            load_client_configuration,
            new_api_client,
        )
        from detnet.controller.leader import LeaseElector

        cfg = self.plan.config
        conf = await load_client_configuration()
        identity = default_identity()
        api = new_api_client(conf, identity=identity)
        # One limiter for the elector and every term's enforcer: together within the QPS.
        kube = KubeClient(api, qps=cfg.kubernetes.qps, on_api_error=self.metrics.api_error)
        try:
            elector = LeaseElector(
                kube=kube,
                namespace=self.plan.lease_namespace,
                name=cfg.kubernetes.lease_name,
                identity=identity,
            )
            elector.on_change(lambda leading: self.metrics.leader.set(1 if leading else 0))
            self.standby = True

            async def work() -> None:
                await self.term(_kubernetes_enforcer(cfg, self.metrics, kube))

            pods = asyncio.create_task(self._export_enforced_pods())
            task = asyncio.create_task(elector.run(work))
            try:
                await _until(self.stop, task)
                if self.loop is not None and elector.is_leader:
                    self.loop.stop()  # let the step (and its apply) finish, then close
                    await asyncio.wait({task}, timeout=30)
                await elector.release()
                await task
            finally:
                pods.cancel()
                await asyncio.gather(pods, return_exceptions=True)
        finally:
            await api.close()

    async def _export_enforced_pods(self) -> None:
        """Refresh detnet_enforced_pods from the enforcer's watch cache every second."""
        while True:
            await asyncio.sleep(1.0)
            loop = self.loop
            counts = getattr(loop.enforcer, "enforced_pods", None) if loop else None
            if callable(counts):
                for workload, n in counts().items():
                    self.metrics.enforced_pods.labels(workload=workload).set(n)


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


async def _main(plan: _Plan, args: argparse.Namespace, stream: IO[str] | None) -> int:
    return await _Controller(plan, args, stream).run()
