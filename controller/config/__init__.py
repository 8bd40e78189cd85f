"""Load and validate the controller's YAML config into frozen dataclasses.

Two spellings are accepted:

- the prototype's Kubernetes ConfigMap, unchanged: ``kind: ConfigMap`` whose
  ``data["critical-apps.yaml"]`` is the document (``critical_apps``,
  ``best_effort_targets``, ``control`` and the two ``severity_*`` keys);
- our own form, the same document written directly, which adds per-app queueing delay and
  loss SLOs, workload kinds and selectors, a ``tc`` block, and the ``policy``,
  ``kubernetes`` and ``metrics`` sections. ``docs/config.md`` lists every key.

Every error names the file, the line and the field path:
``cfg.yaml:12: critical_apps[1].max_jitter_ms: must be a positive number, got "abc"``.
Nothing is resolved or touched here; ``Config.targets()`` resolves service names.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from detnet.controller.aimd import PolicyParams, Slo
from detnet.controller.errors import ConfigError
from detnet.engine.errors import TargetError
from detnet.engine.targets import Target

CONFIGMAP_KEY = "critical-apps.yaml"
WorkloadKind = Literal["Deployment", "StatefulSet", "DaemonSet"]
KubernetesMode = Literal["annotation", "template"]
KINDS: tuple[WorkloadKind, ...] = ("Deployment", "StatefulSet", "DaemonSet")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_YAML12_FLOAT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True, kw_only=True)
class CriticalApp:
    """One critical service: where to probe it and its SLO (thresholds in ms / ratio)."""

    name: str
    protocol: Literal["udp", "tcp"]
    port: int
    service: str | None = None  # DNS name, resolved at start
    host: str | None = None  # explicit address; overrides service
    mode: Literal["connect", "echo"] = "echo"
    max_jitter_ms: float | None = None
    max_latency_ms: float | None = None
    max_queue_delay_ms: float | None = None
    max_loss_ratio: float | None = None
    priority: int = 0
    interval_s: float | None = None  # None: control.probe_interval
    size: int = 64

    @property
    def address(self) -> str:
        """What to resolve: ``host`` when given, else ``service``."""
        return self.host or self.service or ""

    def slo(self) -> Slo:
        """The policy's view of this app."""
        return Slo(
            target=self.name,
            max_jitter_ms=self.max_jitter_ms,
            max_latency_ms=self.max_latency_ms,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_loss_ratio=self.max_loss_ratio,
        )


@dataclass(frozen=True, kw_only=True)
class TcDevice:
    """Where the tc enforcer shapes a workload: an interface, optionally in a netns."""

    device: str
    netns: str | None = None


@dataclass(frozen=True, kw_only=True)
class BestEffortTarget:
    """A best-effort workload whose egress is capped.

    ``name`` is the policy's and the metrics' key. The workload is either ``kind``/
    ``workload`` (a named Deployment, StatefulSet or DaemonSet) or ``selector`` (a label
    selector over pods), in ``namespace``."""

    name: str
    namespace: str = "default"
    kind: WorkloadKind = "Deployment"
    workload: str | None = None
    selector: str | None = None
    initial_bandwidth: int | None = None  # Mbit/s; None: start at max_bandwidth
    tc: TcDevice | None = None


@dataclass(frozen=True, kw_only=True)
class ControlSettings:
    """Cadences and the statistics window."""

    probe_interval_s: float = 0.01
    control_interval_s: float = 0.25
    window_samples: int | None = None  # a window of the last N samples, or
    window_s: float | None = 5.0  # the last T seconds
    probe_timeout_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class KubernetesSettings:
    """How the Kubernetes enforcer talks to the API server."""

    mode: KubernetesMode = "annotation"
    qps: float = 100.0
    concurrency: int = 8
    release_on_exit: bool = False
    lease_name: str = "detnet-controller"
    lease_namespace: str = "kube-system"


@dataclass(frozen=True, kw_only=True)
class Config:
    """A validated config. ``source`` is the file it came from."""

    source: str
    critical_apps: tuple[CriticalApp, ...]
    best_effort_targets: tuple[BestEffortTarget, ...]
    control: ControlSettings
    policy: PolicyParams
    kubernetes: KubernetesSettings
    metrics_listen: str = "0.0.0.0:9108"
    warnings: tuple[str, ...] = ()
    _lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def slos(self) -> list[Slo]:
        """Every app's SLO, highest priority first."""
        return [app.slo() for app in self.critical_apps]

    def workloads(self) -> dict[str, int | None]:
        """Best-effort workload name -> initial limit (Mbit/s), for the policy."""
        return {t.name: t.initial_bandwidth for t in self.best_effort_targets}

    def targets(self, *, resolve: bool = True) -> list[Target]:
        """Engine probe targets; with ``resolve``, service names become addresses.

        Raises ConfigError naming the line when a name does not resolve."""
        out: list[Target] = []
        for i, app in enumerate(self.critical_apps):
            host = app.address
            if resolve:
                host = self._resolve(app, i)
            interval = (
                app.interval_s if app.interval_s is not None else self.control.probe_interval_s
            )
            try:
                out.append(
                    Target(
                        name=app.name,
                        protocol=app.protocol,
                        host=host,
                        port=app.port,
                        mode=app.mode,
                        interval_ns=round(interval * 1e9),
                        timeout_ns=round(self.control.probe_timeout_s * 1e9),
                        size=app.size,
                    )
                )
            except TargetError as exc:
                raise ConfigError(f"{self.where(f'critical_apps[{i}]')}: {exc}") from exc
        return out

    def _resolve(self, app: CriticalApp, index: int) -> str:
        key = "host" if app.host else "service"
        try:
            return str(ipaddress.ip_address(app.address))
        except ValueError:
            pass
        sock_type = socket.SOCK_DGRAM if app.protocol == "udp" else socket.SOCK_STREAM
        try:
            infos = socket.getaddrinfo(app.address, app.port, type=sock_type)
        except (socket.gaierror, UnicodeError) as exc:
            where = self.where(f"critical_apps[{index}].{key}")
            raise ConfigError(f"{where}: cannot resolve {app.address!r}: {exc}") from exc
        return str(infos[0][4][0])

    def where(self, path: str) -> str:
        """``FILE:LINE: path`` for messages about a field of this config."""
        line = self._lines.get(path)
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
            d |= {"port": a.port, "protocol": a.protocol.upper()}
            if a.protocol == "tcp":
                d["mode"] = a.mode
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
            },
            "kubernetes": {
                "mode": k.mode,
                "qps": k.qps,
                "concurrency": k.concurrency,
                "release_on_exit": k.release_on_exit,
                "lease_name": k.lease_name,
                "lease_namespace": k.lease_namespace,
            },
            "metrics": {"listen": self.metrics_listen},
        }

    def dump(self) -> str:
        """The effective config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _fmt_s(seconds: float) -> str:
    """A duration the loader reads back: whole ms when possible, else seconds."""
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1e3:g}ms"


# ---------------------------------------------------------------------- YAML + lines


class _Doc:
    """A YAML document as plain Python values plus the line of every field path."""

    def __init__(self, source: str, text: str, *, line_offset: int = 0) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self._offset = line_offset
        self._constructor = yaml.constructor.SafeConstructor()
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 + line_offset if mark else 0
            what = exc.problem or exc.context or "invalid YAML"
            raise ConfigError(f"{source}:{line}: invalid YAML: {what}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
        self.root: Any = None if node is None else self._convert(node, "")

    def _convert(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1 + self._offset)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node)
                sub = f"{path}.{key}" if path else str(key)
                if key in out:
                    line = key_node.start_mark.line + 1 + self._offset
                    raise ConfigError(f"{self.source}:{line}: {sub}: duplicate key")
                self.lines[sub] = key_node.start_mark.line + 1 + self._offset
                out[key] = self._convert(value_node, sub)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            line = node.start_mark.line + 1 + self._offset
            raise ConfigError(f"{self.source}:{line}: keys must be plain strings")
        if node.style is None and _YAML12_FLOAT.match(node.value):
            # PyYAML (YAML 1.1) reads plain 1e-6 as a string; YAML 1.2 and users mean a number.
            return float(node.value)
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            line = node.start_mark.line + 1 + self._offset
            raise ConfigError(f"{self.source}:{line}: {exc.problem}") from exc

    def line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest parent that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get("")

    def error(self, path: str, message: str) -> ConfigError:
        """A ConfigError ``FILE:LINE: path: message``."""
        line = self.line(path)
        prefix = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}")


def _show(value: Any) -> str:
    """A value as the user wrote it, for 'got ...' in messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


# -------------------------------------------------------------------- field readers

T = TypeVar("T")


class _Section:
    """Typed reads from one mapping of the document, tracking which keys were used."""

    def __init__(self, doc: _Doc, path: str, value: Any, allowed: tuple[str, ...]) -> None:
        if not isinstance(value, dict):
            raise doc.error(path, f"must be a mapping, got {_show(value)}")
        self.doc, self.path, self.data = doc, path, value
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                known = ", ".join(allowed)
                raise doc.error(self.sub(str(key)), f"unknown key{more}; known keys: {known}")

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def err(self, key: str, message: str) -> ConfigError:
        return self.doc.error(self.sub(key), message)

    def get(self, key: str, parse: Callable[[str, Any], T], default: T) -> T:
        """``parse(path, value)`` of the key, or ``default`` when absent or null."""
        if not self.has(key):
            return default
        return parse(self.sub(key), self.data[key])

    def need(self, key: str, parse: Callable[[str, Any], T]) -> T:
        """``parse(path, value)`` of a required key."""
        if not self.has(key):
            raise self.doc.error(self.sub(key), "missing (required)")
        return parse(self.sub(key), self.data[key])


def _readers(doc: _Doc) -> Any:
    """Value parsers bound to ``doc`` so their errors carry its lines."""

    class R:
        @staticmethod
        def string(path: str, v: Any) -> str:
            if not isinstance(v, str) or not v.strip():
                raise doc.error(path, f"must be a non-empty string, got {_show(v)}")
            return v.strip()

        @staticmethod
        def number(path: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise doc.error(path, f"must be a number, got {_show(v)}")
            return float(v)

        @staticmethod
        def positive(path: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise doc.error(path, f"must be a positive number, got {_show(v)}")
            if v <= 0:
                raise doc.error(path, f"must be a positive number, got {_show(v)}")
            return float(v)

        @staticmethod
        def ratio(path: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise doc.error(path, f"must be a number from 0 to 1, got {_show(v)}")
            return float(v)

        @staticmethod
        def fraction(path: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                raise doc.error(path, f"must be a fraction between 0 and 1, got {_show(v)}")
            return float(v)

        @staticmethod
        def integer(path: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise doc.error(path, f"must be a whole number, got {_show(v)}")
            return v

        @staticmethod
        def positive_int(path: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise doc.error(path, f"must be a whole number >= 1, got {_show(v)}")
            return v

        @staticmethod
        def mbit(path: str, v: Any) -> int:
            # Whole Mbit/s, the unit of the annotation; 2.0 is fine, 2.5 is not.
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise doc.error(path, f"must be a whole number of Mbit/s >= 1, got {_show(v)}")
            return v

        @staticmethod
        def boolean(path: str, v: Any) -> bool:
            if not isinstance(v, bool):
                raise doc.error(path, f"must be true or false, got {_show(v)}")
            return v

        @staticmethod
        def duration(path: str, v: Any) -> float:
            """Seconds from a number (seconds) or a string like "250ms", "1.5s", "2m"."""
            if isinstance(v, bool):
                raise doc.error(path, f"must be a duration like 250ms or 1.5s, got {_show(v)}")
            if isinstance(v, int | float):
                seconds = float(v)
            elif isinstance(v, str) and (m := _DURATION.match(v)):
                seconds = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
            else:
                raise doc.error(path, f"must be a duration like 250ms or 1.5s, got {_show(v)}")
            if not math.isfinite(seconds) or seconds <= 0:
                raise doc.error(path, f"must be a positive duration, got {_show(v)}")
            return seconds

        @staticmethod
        def listen(path: str, v: Any) -> str:
            if not isinstance(v, str):
                raise doc.error(path, f"must be HOST:PORT, got {_show(v)}")
            try:
                parse_listen(v)
            except ValueError as exc:
                raise doc.error(path, f"{exc}, got {_show(v)}") from exc
            return v

    return R


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9108`` for IPv6; empty host = all) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError("must be HOST:PORT with a port from 0 to 65535")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# ------------------------------------------------------------------------- sections

_TOP_KEYS = (
    "critical_apps",
    "best_effort_targets",
    "control",
    "policy",
    "kubernetes",
    "metrics",
    "severity_multiplier_enabled",
    "severity_max_multiplier",
)
_APP_KEYS = (
    "name",
    "service",
    "host",
    "port",
    "protocol",
    "mode",
    "max_jitter_ms",
    "max_latency_ms",
    "max_queue_delay_ms",
    "max_loss_ratio",
    "priority",
    "interval",
    "size",
)
_TARGET_KEYS = (
    "name",
    "deployment",
    "workload",
    "kind",
    "selector",
    "namespace",
    "initial_bandwidth",
    "tc",
)
_CONTROL_KEYS = (
    "probe_interval",
    "control_interval",
    "window_size",
    "window",
    "probe_timeout",
    "step_down",
    "step_up",
    "min_bandwidth",
    "max_bandwidth",
)
_POLICY_KEYS = (
    "decrease_factor",
    "decrease_cooldown",
    "increase_step",
    "increase_interval",
    "stable_fraction",
    "min_bandwidth",
    "max_bandwidth",
    "severity_max_multiplier",
    "usage_window",
)
_K8S_KEYS = ("mode", "qps", "concurrency", "release_on_exit", "lease_name", "lease_namespace")


def _apps(doc: _Doc, r: Any, value: Any) -> tuple[CriticalApp, ...]:
    if not isinstance(value, list) or not value:
        raise doc.error("critical_apps", f"must be a non-empty list, got {_show(value)}")
    apps: list[CriticalApp] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        s = _Section(doc, f"critical_apps[{i}]", item, _APP_KEYS)
        name = s.need("name", r.string)
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", name):
            raise s.err("name", f"use letters, digits, '.', '_' or '-' (max 63), got {_show(name)}")
        if name in seen:
            raise s.err(
                "name", f"duplicate app name {_show(name)} (also critical_apps[{seen[name]}])"
            )
        seen[name] = i
        protocol = s.need("protocol", r.string).lower()
        if protocol not in ("udp", "tcp"):
            raise s.err("protocol", f"must be UDP or TCP, got {_show(s.data['protocol'])}")
        port = s.need("port", r.integer)
        if not 0 < port < 65536:
            raise s.err("port", f"must be from 1 to 65535, got {port}")
        if not s.has("service") and not s.has("host"):
            raise doc.error(f"critical_apps[{i}].service", "missing (give service or host)")
        mode = "connect" if protocol == "tcp" else "echo"
        if s.has("mode"):
            if protocol == "udp":
                raise s.err("mode", "applies to TCP apps only")
            mode = s.get("mode", r.string, mode).lower()
            if mode not in ("connect", "echo"):
                raise s.err("mode", f"must be connect or echo, got {_show(s.data['mode'])}")
        app = CriticalApp(
            name=name,
            protocol=protocol,
            port=port,
            service=s.get("service", r.string, None),
            host=s.get("host", r.string, None),
            mode=mode,  # type: ignore[arg-type]
            max_jitter_ms=s.get("max_jitter_ms", r.positive, None),
            max_latency_ms=s.get("max_latency_ms", r.positive, None),
            max_queue_delay_ms=s.get("max_queue_delay_ms", r.positive, None),
            max_loss_ratio=s.get("max_loss_ratio", r.ratio, None),
            priority=s.get("priority", r.integer, 0),
            interval_s=s.get("interval", r.duration, None),
            size=s.get("size", r.positive_int, 64),
        )
        if not app.slo().thresholds():
            raise doc.error(
                f"critical_apps[{i}]",
                "needs at least one of max_jitter_ms, max_latency_ms, max_queue_delay_ms, "
                "max_loss_ratio",
            )
        if app.interval_s is not None and app.interval_s < 1e-4:
            raise s.err("interval", "must be at least 0.1ms")
        if app.size < 64 or app.size > 9000:
            raise s.err("size", f"must be from 64 to 9000 bytes, got {app.size}")
        apps.append(app)
    # The prototype ranks apps by priority; keep that order (stable for equal ones).
    return tuple(sorted(apps, key=lambda a: -a.priority))


def _targets(doc: _Doc, r: Any, value: Any) -> tuple[BestEffortTarget, ...]:
    if not isinstance(value, list) or not value:
        raise doc.error("best_effort_targets", f"must be a non-empty list, got {_show(value)}")
    out: list[BestEffortTarget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        path = f"best_effort_targets[{i}]"
        s = _Section(doc, path, item, _TARGET_KEYS)
        given = [k for k in ("deployment", "workload", "selector") if s.has(k)]
        if len(given) > 1:
            raise s.err(given[1], f"give only one of deployment, workload, selector ({given[0]})")
        kind: str = "Deployment"
        if s.has("kind"):
            if s.has("deployment") or s.has("selector"):
                raise s.err("kind", "applies to workload (or name) only")
            kind = s.get("kind", r.string, "Deployment")
            match = {k.lower(): k for k in KINDS}.get(kind.lower())
            if match is None:
                raise s.err("kind", f"must be one of {', '.join(KINDS)}, got {_show(kind)}")
            kind = match
        selector = s.get("selector", r.string, None)
        workload = s.get("deployment", r.string, None) or s.get("workload", r.string, None)
        name = s.get("name", r.string, None)
        if name is None:
            if workload is None:
                raise doc.error(f"{path}.name", "missing (required with selector)")
            name = workload
        if workload is None and selector is None:
            workload = name
        if workload is not None and not _DNS_NAME.match(workload):
            key = next((k for k in ("deployment", "workload") if s.has(k)), "name")
            raise s.err(key, f"must be a Kubernetes object name, got {_show(workload)}")
        if name in seen:
            raise s.err("name", f"duplicate workload name {_show(name)} (also {seen[name]})")
        seen[name] = i
        tc = None
        if s.has("tc"):
            ts = _Section(doc, f"{path}.tc", s.data["tc"], ("device", "netns"))
            tc = TcDevice(device=ts.need("device", r.string), netns=ts.get("netns", r.string, None))
            if len(tc.device) > 15:
                raise ts.err(
                    "device", f"interface names have at most 15 characters, got {_show(tc.device)}"
                )
        namespace = s.get("namespace", r.string, "default")
        if not _DNS_NAME.match(namespace):
            raise s.err("namespace", f"must be a Kubernetes namespace name, got {_show(namespace)}")
        out.append(
            BestEffortTarget(
                name=name,
                namespace=namespace,
                kind=kind,  # type: ignore[arg-type]
                workload=workload,
                selector=selector,
                initial_bandwidth=s.get("initial_bandwidth", r.mbit, None),
                tc=tc,
            )
        )
    return tuple(out)


def _lease_namespace_default(doc: _Doc) -> str:
    """The controller's own namespace when it runs in a pod (``POD_NAMESPACE``, set by the
    Deployment through the downward API), else ``kube-system``."""
    ns = os.environ.get("POD_NAMESPACE", "").strip()
    if not ns:
        return "kube-system"
    if not _DNS_NAME.match(ns):
        raise doc.error(
            "kubernetes.lease_namespace",
            f"not set, and POD_NAMESPACE={_show(ns)} is not a namespace name; set it explicitly",
        )
    return ns


def _parse(doc: _Doc) -> Config:
    r = _readers(doc)
    top = _Section(doc, "", doc.root, _TOP_KEYS)
    warnings: list[str] = []
    apps = _apps(doc, r, top.data.get("critical_apps"))
    targets = _targets(doc, r, top.data.get("best_effort_targets"))

    ctl = _Section(doc, "control", top.data.get("control") or {}, _CONTROL_KEYS)
    pol = _Section(doc, "policy", top.data.get("policy") or {}, _POLICY_KEYS)
    for legacy, ours in (
        ("step_down", "decrease_factor"),
        ("step_up", "increase_step"),
        ("min_bandwidth", "min_bandwidth"),
        ("max_bandwidth", "max_bandwidth"),
    ):
        if ctl.has(legacy) and pol.has(ours):
            raise ctl.err(legacy, f"set twice: also policy.{ours}; keep one")
    if ctl.has("window_size") and ctl.has("window"):
        raise ctl.err("window", "set twice: window_size (samples) or window (seconds), not both")

    decrease = pol.get("decrease_factor", r.fraction, 0.20)
    if ctl.has("step_down"):
        step_down = ctl.get("step_down", r.positive, 0.20)
        if step_down < 1:
            decrease = step_down
        else:
            # The prototype's ConfigMap wrote step_down in Mbit/s but its controller always
            # cut 20 %; keep that behaviour and say so rather than guess a meaning.
            warnings.append(
                f"{doc.source}:{doc.line('control.step_down')}: control.step_down: "
                f"{_show(ctl.data['step_down'])} reads as Mbit/s, which the prototype never "
                f"applied; using decrease_factor {decrease:.2f} (set a fraction like 0.2)"
            )
    severity = pol.get("severity_max_multiplier", r.positive, 1.0)
    if top.has("severity_multiplier_enabled") or top.has("severity_max_multiplier"):
        if pol.has("severity_max_multiplier"):
            raise top.err(
                "severity_max_multiplier", "set twice: also policy.severity_max_multiplier"
            )
        enabled = top.get("severity_multiplier_enabled", r.boolean, True)
        severity = top.get("severity_max_multiplier", r.positive, 5.0) if enabled else 1.0
    if severity < 1:
        raise doc.error("policy.severity_max_multiplier", f"must be at least 1, got {severity:g}")

    min_bw = pol.get("min_bandwidth", r.mbit, ctl.get("min_bandwidth", r.mbit, 10))
    max_bw = pol.get("max_bandwidth", r.mbit, ctl.get("max_bandwidth", r.mbit, 1000))
    where_max = "policy.max_bandwidth" if pol.has("max_bandwidth") else "control.max_bandwidth"
    if max_bw < min_bw:
        raise doc.error(where_max, f"must be at least min_bandwidth ({min_bw}), got {max_bw}")
    for i, t in enumerate(targets):
        if t.initial_bandwidth is not None and not min_bw <= t.initial_bandwidth <= max_bw:
            raise doc.error(
                f"best_effort_targets[{i}].initial_bandwidth",
                f"must be within min_bandwidth..max_bandwidth ({min_bw}..{max_bw}), "
                f"got {t.initial_bandwidth}",
            )
    policy = PolicyParams(
        decrease_factor=decrease,
        decrease_cooldown_s=pol.get("decrease_cooldown", r.duration, 1.5),
        increase_step=pol.get("increase_step", r.mbit, ctl.get("step_up", r.mbit, 10)),
        increase_interval_s=pol.get("increase_interval", r.duration, 5.0),
        stable_fraction=pol.get("stable_fraction", r.fraction, 0.5),
        min_bandwidth=min_bw,
        max_bandwidth=max_bw,
        severity_max_multiplier=severity,
        usage_window_s=pol.get("usage_window", r.duration, 1.0),
    )
    probe_interval = ctl.get("probe_interval", r.duration, 0.01)
    if probe_interval < 1e-4:
        raise ctl.err("probe_interval", "must be at least 0.1ms")
    window_samples = ctl.get("window_size", r.positive_int, None)
    if window_samples is not None and window_samples < 2:
        raise ctl.err("window_size", f"must be at least 2 samples, got {window_samples}")
    control = ControlSettings(
        probe_interval_s=probe_interval,
        control_interval_s=ctl.get("control_interval", r.duration, 0.25),
        window_samples=window_samples,
        window_s=None if window_samples is not None else ctl.get("window", r.duration, 5.0),
        probe_timeout_s=ctl.get("probe_timeout", r.duration, 1.0),
    )

    ks = _Section(doc, "kubernetes", top.data.get("kubernetes") or {}, _K8S_KEYS)
    mode = ks.get("mode", r.string, "annotation")
    if mode not in ("annotation", "template"):
        raise ks.err("mode", f"must be annotation or template, got {_show(mode)}")
    kubernetes = KubernetesSettings(
        mode=mode,  # type: ignore[arg-type]
        qps=ks.get("qps", r.positive, 100.0),
        concurrency=ks.get("concurrency", r.positive_int, 8),
        release_on_exit=ks.get("release_on_exit", r.boolean, False),
        lease_name=ks.get("lease_name", r.string, "detnet-controller"),
        lease_namespace=ks.get("lease_namespace", r.string, None) or _lease_namespace_default(doc),
    )
    ms = _Section(doc, "metrics", top.data.get("metrics") or {}, ("listen",))
    listen = ms.get("listen", r.listen, "0.0.0.0:9108")
    return Config(
        source=doc.source,
        critical_apps=apps,
        best_effort_targets=targets,
        control=control,
        policy=policy,
        kubernetes=kubernetes,
        metrics_listen=listen,
        warnings=tuple(warnings),
        _lines=dict(doc.lines),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a config file (our form or the prototype's ConfigMap).

    Raises ConfigError with ``FILE:LINE: field: problem`` for anything wrong."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from exc
    return parse_config(text, source=source)


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Validate config text; ``source`` names it in errors."""
    doc = _Doc(source, text)
    if doc.root is None:
        raise ConfigError(f"{source}: empty config")
    if isinstance(doc.root, dict) and doc.root.get("kind") == "ConfigMap":
        doc = _unwrap_configmap(doc)
    if not isinstance(doc.root, dict):
        raise doc.error("", f"the config must be a mapping, got {_show(doc.root)}")
    return _parse(doc)


def _unwrap_configmap(outer: _Doc) -> _Doc:
    """The document inside a ConfigMap's ``data["critical-apps.yaml"]``."""
    root = outer.root
    if root.get("apiVersion") != "v1":
        raise outer.error(
            "apiVersion", f"a ConfigMap must be apiVersion v1, got {_show(root.get('apiVersion'))}"
        )
    data = root.get("data")
    if not isinstance(data, dict) or CONFIGMAP_KEY not in data:
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else "none"
        raise outer.error("data", f"the ConfigMap has no {CONFIGMAP_KEY!r} key (keys: {keys})")
    text = data[CONFIGMAP_KEY]
    if not isinstance(text, str):
        raise outer.error(f"data.{CONFIGMAP_KEY}", f"must be a YAML string, got {_show(text)}")
    # A block scalar (|) starts on the line after its key: map inner lines onto the file.
    key_line = outer.lines.get(f"data.{CONFIGMAP_KEY}", 1)
    return _Doc(outer.source, text, line_offset=key_line)
