"""The validated config: frozen dataclasses, and pure accessors over them.

The best-effort workload's types (``BestEffortTarget``, ``TcDevice``, the kinds and the
Kubernetes modes) are ``controller/workloads.py``'s, shared with the enforcers (the
config package re-exports them). Nothing here reads a file, the environment or DNS:
``Config.targets()`` builds the engine's targets with the names as written
(``resolve.resolve_targets`` looks them up), and ``kubernetes.lease_namespace`` stays
None when the file does not set it (the ``control`` command applies ``POD_NAMESPACE``,
see ``schema.lease_namespace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from detnet.controller.agent.wire import (
    AGENT_NAMESPACE,
    AGENT_SERVICE,
    DEFAULT_DEADLINE_S,
    DEFAULT_TOKEN_PATH,
)
from detnet.controller.aimd import PolicyParams, ScopeMode
from detnet.controller.errors import ConfigError
from detnet.controller.kube import DEFAULT_CONCURRENCY, DEFAULT_QPS
from detnet.controller.workloads import DEFAULT_MODE, BestEffortTarget, KubernetesMode
from detnet.engine.errors import TargetError
from detnet.engine.parse import format_duration_ns
from detnet.engine.slo import Slo
from detnet.engine.targets import (
    DEFAULT_SIZE,
    Mode,
    Protocol,
    Target,
    TargetFieldError,
)
from detnet.engine.targets import MODES as PROBE_MODES

CONFIGMAP_KEY = "critical-apps.yaml"
EndpointsMode = Literal["pods", "service"]
ENDPOINTS_MODES: tuple[EndpointsMode, ...] = ("pods", "service")
UsageMode = Literal["agent", "none"]
USAGE_MODES: tuple[UsageMode, ...] = ("agent", "none")
DEFAULT_MAX_PROBE_RATE = 5000.0  # probes/s across endpoints: ~10 % of a core (bench endpoints)
_APP_FIELDS = ("name", "port", "mode", "size")  # Target fields spelled as an app's keys


@dataclass(frozen=True, kw_only=True)
class CriticalApp:
    """One critical service: where to probe it and its SLO (thresholds in ms / ratio)."""

    name: str
    protocol: Protocol
    port: int  # 0 for ICMP
    service: str | None = None  # DNS name, resolved at start
    host: str | None = None  # explicit address; overrides service
    namespace: str | None = None  # the Service's, for a bare ``service: NAME``
    # pods: every ready endpoint of the Service; service: its address. None: pods when
    # the Kubernetes enforcer runs and the app names a Service (make_plan decides).
    endpoints: EndpointsMode | None = None
    mode: Mode | None = None  # None: the protocol's default (engine.targets.MODES)
    max_jitter_ms: float | None = None
    max_latency_ms: float | None = None
    max_queue_delay_ms: float | None = None
    max_loss_ratio: float | None = None
    priority: int = 0
    interval_s: float | None = None  # None: control.probe_interval
    size: int = DEFAULT_SIZE

    @property
    def address(self) -> str:
        """What to resolve: ``host`` when given, else ``service``."""
        return self.host or self.service or ""

    def slo(self) -> Slo:
        """The policy's view of this app."""
        return Slo(
            app=self.name,
            max_jitter_ms=self.max_jitter_ms,
            max_latency_ms=self.max_latency_ms,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_loss_ratio=self.max_loss_ratio,
        )


@dataclass(frozen=True, kw_only=True)
class ControlSettings:
    """Cadences and the statistics window."""

    probe_interval_s: float = 0.01
    control_interval_s: float = 0.25
    window_samples: int | None = None  # a window of the last N samples, or
    window_s: float | None = 5.0  # the last T seconds
    probe_timeout_s: float = 1.0
    # node: limits per workload and node; cluster: per workload. None: node when the
    # probe targets carry nodes (endpoints: pods), else cluster.
    scope: ScopeMode | None = None
    max_probe_rate: float = DEFAULT_MAX_PROBE_RATE  # probes/s, all targets together


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Where the node agents are and how the controller asks them (``agent:``)."""

    namespace: str = AGENT_NAMESPACE
    service: str = AGENT_SERVICE  # their headless Service: its EndpointSlices name them
    deadline_s: float = DEFAULT_DEADLINE_S
    token_file: str = DEFAULT_TOKEN_PATH  # the projected token of audience detnet-agent


@dataclass(frozen=True, kw_only=True)
class KubernetesSettings:
    """How the Kubernetes enforcer talks to the API server."""

    mode: KubernetesMode = DEFAULT_MODE
    qps: float = DEFAULT_QPS
    concurrency: int = DEFAULT_CONCURRENCY
    release_on_exit: bool = False
    lease_name: str = "detnet-controller"
    lease_namespace: str | None = None  # None: the controller's own namespace (control)


def line_of(lines: Mapping[str, int], path: str) -> int | None:
    """The line of ``path`` in ``lines``, or of its nearest parent that has one."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return lines.get("")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A validated config. ``source`` is the file it came from."""

    source: str
    critical_apps: tuple[CriticalApp, ...]
    best_effort_targets: tuple[BestEffortTarget, ...]
    control: ControlSettings
    policy: PolicyParams
    kubernetes: KubernetesSettings
    # agent: per-pod usage from the node agents; none: without. None: agent when the
    # Kubernetes enforcer runs (make_plan decides).
    usage: UsageMode | None = None
    agent: AgentSettings = field(default_factory=AgentSettings)
    metrics_listen: str = "0.0.0.0:9108"
    warnings: tuple[str, ...] = ()
    _lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def slos(self) -> list[Slo]:
        """Every app's SLO, highest priority first."""
        return [app.slo() for app in self.critical_apps]

    def workloads(self) -> dict[str, int | None]:
        """Best-effort workload name -> initial limit (Mbit/s), for the policy."""
        return {t.name: t.initial_bandwidth for t in self.best_effort_targets}

    def targets(self) -> list[Target]:
        """Engine probe targets, one per critical app, hosts as written (unresolved)."""
        out: list[Target] = []
        for i, app in enumerate(self.critical_apps):
            interval = (
                app.interval_s if app.interval_s is not None else self.control.probe_interval_s
            )
            try:
                out.append(
                    Target(
                        name=app.name,
                        protocol=app.protocol,
                        host=app.address,
                        port=app.port,
                        mode=app.mode,
                        interval_ns=round(interval * 1e9),
                        timeout_ns=round(self.control.probe_timeout_s * 1e9),
                        size=app.size,
                    )
                )
            except TargetError as exc:
                path = f"critical_apps[{i}]"
                if isinstance(exc, TargetFieldError) and exc.field in _APP_FIELDS:
                    path += f".{exc.field}"  # the engine's one check, at the key's line
                raise ConfigError(f"{self.where(path)}: {exc}") from exc
        return out

    def where(self, path: str) -> str:
        """``FILE:LINE: path`` for messages about a field of this config."""
        line = line_of(self._lines, path)
        return f"{self.source}:{line}: {path}" if line else f"{self.source}: {path}"

    def to_dict(self) -> dict[str, Any]:
        """The effective config in our own form, every default filled in."""
        c, p, k = self.control, self.policy, self.kubernetes
        apps = []
        for a in self.critical_apps:
            d: dict[str, Any] = {"name": a.name}
            if a.service is not None:
                d["service"] = a.service
            if a.host is not None:
                d["host"] = a.host
            if a.namespace is not None:
                d["namespace"] = a.namespace
            if a.endpoints is not None:
                d["endpoints"] = a.endpoints
            if a.protocol != "icmp":
                d["port"] = a.port
            d["protocol"] = a.protocol.upper()
            if a.protocol != "icmp":
                d["mode"] = a.mode or PROBE_MODES[a.protocol][0]
            for key in ("max_jitter_ms", "max_latency_ms", "max_queue_delay_ms", "max_loss_ratio"):
                if getattr(a, key) is not None:
                    d[key] = getattr(a, key)
            d["priority"] = a.priority
            d["interval"] = _fmt_s(a.interval_s if a.interval_s is not None else c.probe_interval_s)
            d["size"] = a.size
            apps.append(d)
        targets = []
        for t in self.best_effort_targets:
            td: dict[str, Any] = {"name": t.name, "namespace": t.namespace}
            if t.selector is not None:
                td["selector"] = t.selector
            else:
                td |= {"kind": t.kind, "workload": t.workload}
            td["initial_bandwidth"] = (
                t.initial_bandwidth if t.initial_bandwidth is not None else p.max_bandwidth
            )
            if t.tc is not None:
                td["tc"] = {"device": t.tc.device} | ({"netns": t.tc.netns} if t.tc.netns else {})
            targets.append(td)
        control: dict[str, Any] = {
            "probe_interval": _fmt_s(c.probe_interval_s),
            "control_interval": _fmt_s(c.control_interval_s),
            "probe_timeout": _fmt_s(c.probe_timeout_s),
        }
        if c.window_samples is not None:
            control["window_size"] = c.window_samples
        else:
            control["window"] = _fmt_s(c.window_s or 0.0)
        if c.scope is not None:
            control["scope"] = c.scope
        control["max_probe_rate"] = c.max_probe_rate
        kubernetes: dict[str, Any] = {
            "mode": k.mode,
            "qps": k.qps,
            "concurrency": k.concurrency,
            "release_on_exit": k.release_on_exit,
            "lease_name": k.lease_name,
        }
        if k.lease_namespace is not None:  # unset: the controller's namespace at run time
            kubernetes["lease_namespace"] = k.lease_namespace
        return {
            "critical_apps": apps,
            "best_effort_targets": targets,
            "control": control,
            "policy": {
                "decrease_factor": p.decrease_factor,
                "decrease_cooldown": _fmt_s(p.decrease_cooldown_s),
                "increase_step": p.increase_step,
                "increase_interval": _fmt_s(p.increase_interval_s),
                "stable_fraction": p.stable_fraction,
                "min_bandwidth": p.min_bandwidth,
                "max_bandwidth": p.max_bandwidth,
                "severity_max_multiplier": p.severity_max_multiplier,
                "usage_window": _fmt_s(p.usage_window_s),
                "effect_delay": _fmt_s(p.effect_delay_s),
                "escalate_after": p.escalate_after,
                "max_blind_factor": p.max_blind_factor,
                "early_warning_fraction": p.early_warning_fraction,
                "knee_margin": p.knee_margin,
                "knee_step_fraction": p.knee_step_fraction,
                "knee_memory": _fmt_s(p.knee_memory_s),
            },
            "kubernetes": kubernetes,
            **({"usage": self.usage} if self.usage is not None else {}),
            "agent": {
                "namespace": self.agent.namespace,
                "service": self.agent.service,
                "deadline": _fmt_s(self.agent.deadline_s),
                "token_file": self.agent.token_file,
            },
            "metrics": {"listen": self.metrics_listen},
        }

    def dump(self) -> str:
        """The effective config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _fmt_s(seconds: float) -> str:
    """A duration the loader reads back exactly (``250ms``, ``1.5s``, ``2m``)."""
    return format_duration_ns(round(seconds * 1e9))
