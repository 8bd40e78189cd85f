"""What turns a document into a Config: the sections, their keys, defaults and ranges.

Every number's range is here, once (the ``_PORT``, ``_WINDOW``... readers below), and
so is every name's rule: ``detnet config check`` and ``detnet control`` accept exactly
the same files, because ``control`` adds no check of its own on the file's values (the
engine's target checks run here too, through ``Config.targets()``).
"""

from __future__ import annotations

import re
from typing import TypeVar

from detnet.controller.aimd import PolicyParams
from detnet.controller.config import compat
from detnet.controller.config.model import (
    DEFAULT_MAX_PROBE_RATE,
    ENDPOINTS_MODES,
    USAGE_MODES,
    AgentSettings,
    Config,
    ControlSettings,
    CriticalApp,
    KubernetesSettings,
)
from detnet.controller.config.reading import (
    Document,
    Reader,
    Section,
    Value,
    address,
    boolean,
    duration,
    fraction,
    host,
    integer,
    mbit,
    number_in,
    positive,
    text,
)
from detnet.controller.endpoints.service import ServiceNameError, parse_service
from detnet.controller.errors import ConfigError
from detnet.controller.kube import DEFAULT_CONCURRENCY, DEFAULT_QPS
from detnet.controller.workloads import (
    DEFAULT_KIND,
    DEFAULT_MODE,
    DEFAULT_NAMESPACE,
    KINDS,
    MODES,
    BestEffortTarget,
    TcDevice,
    WorkloadKind,
)
from detnet.engine.core import DEFAULT_CAPACITY
from detnet.engine.parse import show
from detnet.engine.targets import (
    DEFAULT_SIZE,
    MIN_INTERVAL_NS,
    NAME_PATTERN,
    NAME_RULE,
    PROTOCOLS,
)
from detnet.engine.targets import MODES as PROBE_MODES

MS, S = 1_000_000, 1_000_000_000
_W = TypeVar("_W", bound=str)
DEFAULT_LEASE_NAMESPACE = "kube-system"

# ------------------------------------------------------------------------- ranges
MAX_APPS = 256
MAX_TARGETS = 1024
_PORT = integer(1, 65535)
# An SLO above a minute is not a latency SLO; below a nanosecond, the clocks' resolution,
# it is no number a probe can be compared with (1e-300 passed, and printed as "0.0 µs").
_THRESHOLD_MS = positive(60_000.0, low=1e-6)
_LOSS_RATIO = number_in(0.0, 1.0)
_PRIORITY = integer(-1_000_000, 1_000_000)
_PROBE_INTERVAL = duration(MIN_INTERVAL_NS, 60 * S)  # below 0.1 ms the scheduler measures itself
# Any whole number here: the engine's Target checks the size against the codec's bounds
# (Config.targets() below), the one check the command line's --size meets too.
_PROBE_SIZE = integer(-(2**31), 2**31 - 1, unit=" bytes")
_CONTROL_INTERVAL = duration(10 * MS, 60 * S)  # faster only spins: actuation takes longer
_WINDOW = duration(1 * MS, 3600 * S)
# A window of more samples than the engine's ring keeps would silently be the ring.
_WINDOW_SAMPLES = integer(2, DEFAULT_CAPACITY, unit=" samples")
_PROBE_TIMEOUT = duration(1 * MS, 60 * S)
_POLICY_TIME = duration(1 * MS, 24 * 3600 * S)  # cooldown, dwell
_USAGE_WINDOW = duration(1 * MS, 3600 * S)
_EFFECT_DELAY = duration(1 * MS, 60 * S)
_ESCALATE_AFTER = integer(1, 1000, unit=" cooldowns")
_KNEE_MEMORY = duration(1 * S, 7 * 24 * 3600 * S)
_BANDWIDTH = mbit(1, 1_000_000)  # 1 Tbit/s
_SEVERITY = number_in(1.0, 100.0)
_QPS = positive(1e9)  # 1e9: no client-side limit in practice
_CONCURRENCY = integer(1, 1024)
_LISTEN = address(port_zero=True)
_PROBE_RATE = number_in(1.0, 1_000_000.0)  # probes/s across every target
_AGENT_DEADLINE = duration(10 * MS, 10 * S)  # the loop waits this long for usage, at most

# -------------------------------------------------------------------------- names
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a namespace, a workload
_DNS_SUBDOMAIN = re.compile(  # a Lease's name
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)

# ----------------------------------------------------------------------- sections
_TOP_KEYS = (
    "critical_apps",
    "best_effort_targets",
    "control",
    "policy",
    "kubernetes",
    "metrics",
    "usage",
    "agent",
    *compat.LEGACY_TOP_KEYS,
)
_APP_KEYS = (
    "name",
    "service",
    "namespace",
    "endpoints",
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
    "scope",
    "max_probe_rate",
    *compat.LEGACY_CONTROL_KEYS,
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
    "effect_delay",
    "escalate_after",
    "max_blind_factor",
    "early_warning_fraction",
    "knee_margin",
    "knee_step_fraction",
    "knee_memory",
)
_K8S_KEYS = ("mode", "qps", "concurrency", "release_on_exit", "lease_name", "lease_namespace")


def _named(pattern: re.Pattern[str], rule: str, *, max_chars: int = 253) -> Reader[str]:
    """A string that matches ``pattern`` (``rule`` says what it must be)."""

    def read(value: Value) -> str:
        v = text(value, max_chars=max_chars)
        if not pattern.fullmatch(v):
            raise value.wrong(rule)
        return v

    return read


_APP = _named(NAME_PATTERN, NAME_RULE)  # an app is probed as a Target of the same name
_OBJECT = _named(_DNS_NAME, "must be a Kubernetes object name")
_NAMESPACE = _named(_DNS_NAME, "must be a Kubernetes namespace name")
_LEASE_NAME = _named(_DNS_SUBDOMAIN, "must be a Kubernetes object name")


def _interface(value: Value) -> str:
    # Linux's dev_valid_name(): at most 15 bytes, no '/', ':' or whitespace.
    v = text(value, max_chars=1024)
    if len(v.encode()) > 15:
        raise value.wrong("interface names have at most 15 characters")
    if v in (".", "..") or any(c in v for c in "/: "):
        raise value.wrong("must be an interface name (no '/', ':' or spaces)")
    return v


def _netns(value: Value) -> str:
    # A file under /run/netns.
    v = text(value, max_chars=255)
    if v in (".", "..") or "/" in v:
        raise value.wrong("must be a network namespace name (no '/')")
    return v


def _one_of(words: tuple[_W, ...], rule: str) -> Reader[_W]:
    """One of ``words``, in any case; returned as spelled in ``words`` (and typed so)."""
    spelled = {w.lower(): w for w in words}

    def read(value: Value) -> _W:
        match = spelled.get(text(value, max_chars=64).lower())
        if match is None:
            raise value.wrong(rule)
        return match

    return read


_PROTOCOL = _one_of(PROTOCOLS, "must be UDP, TCP or ICMP")
_PROBE_MODE = {
    p: _one_of(modes, f"must be {' or '.join(modes)} for {p.upper()} apps")
    for p, modes in PROBE_MODES.items()
}
_KIND = _one_of(KINDS, f"must be one of {', '.join(KINDS)}")
_ENDPOINTS = _one_of(ENDPOINTS_MODES, "must be pods or service")
_SCOPE = _one_of(("node", "cluster"), "must be node or cluster")
_USAGE = _one_of(USAGE_MODES, "must be agent or none")


def _token_file(value: Value) -> str:
    v = text(value, max_chars=4096)
    if not v.startswith("/"):
        raise value.wrong("must be an absolute path")
    return v


def _list(doc: Document, top: Section, key: str, limit: int) -> list[Value]:
    value = top.value(key)
    if value is None or value.node.kind != "list" or not value.length():
        shown = "null" if value is None else value.shown()
        raise doc.error(key, f"must be a non-empty list, got {shown}")
    if value.length() > limit:
        raise value.error(f"at most {limit} entries, got {value.length()}")
    return value.items()


def _apps(doc: Document, top: Section) -> tuple[CriticalApp, ...]:
    apps: list[CriticalApp] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_list(doc, top, "critical_apps", MAX_APPS)):
        if not item.is_mapping:
            raise item.wrong("must be a mapping")
        s = Section(doc, item.path, value=item, allowed=_APP_KEYS)
        name = s.need("name", _APP)
        if name in seen:
            raise s.err(
                "name", f"duplicate app name {show(name)} (also critical_apps[{seen[name]}])"
            )
        seen[name] = i
        protocol = s.need("protocol", _PROTOCOL)
        if protocol != "icmp":
            port = s.need("port", _PORT)
        elif s.has("port"):
            raise s.err("port", "ICMP apps have no port")
        else:
            port = 0
        if not s.has("service") and not s.has("host"):
            raise doc.error(f"{item.path}.service", "missing (give service or host)")
        mode = s.get("mode", _PROBE_MODE[protocol], PROBE_MODES[protocol][0])
        service = s.get("service", host, None)
        namespace = s.get("namespace", _NAMESPACE, None)
        endpoints = s.get("endpoints", _ENDPOINTS, None)
        if namespace is not None and service is None:
            raise s.err("namespace", "applies with service only")
        if endpoints == "pods":
            if s.has("host"):
                raise s.err(
                    "endpoints", "pods probes a Service's endpoints: give service, not host"
                )
            try:
                parse_service(service or "", namespace=namespace)
            except ServiceNameError as exc:
                raise s.err("service", f"endpoints: pods needs a Service: {exc}") from exc
        app = CriticalApp(
            name=name,
            protocol=protocol,
            port=port,
            service=service,
            namespace=namespace,
            endpoints=endpoints,
            host=s.get("host", host, None),
            mode=mode,
            max_jitter_ms=s.get("max_jitter_ms", _THRESHOLD_MS, None),
            max_latency_ms=s.get("max_latency_ms", _THRESHOLD_MS, None),
            max_queue_delay_ms=s.get("max_queue_delay_ms", _THRESHOLD_MS, None),
            max_loss_ratio=s.get("max_loss_ratio", _LOSS_RATIO, None),
            priority=s.get("priority", _PRIORITY, 0),
            interval_s=s.get("interval", _PROBE_INTERVAL, None),
            size=s.get("size", _PROBE_SIZE, DEFAULT_SIZE),
        )
        if not app.slo().thresholds():
            raise doc.error(
                item.path,
                "needs at least one of max_jitter_ms, max_latency_ms, max_queue_delay_ms, "
                "max_loss_ratio",
            )
        apps.append(app)
    # The prototype ranks apps by priority; keep that order (stable for equal ones).
    return tuple(sorted(apps, key=lambda a: -a.priority))


def _targets(doc: Document, top: Section) -> tuple[BestEffortTarget, ...]:
    out: list[BestEffortTarget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_list(doc, top, "best_effort_targets", MAX_TARGETS)):
        if not item.is_mapping:
            raise item.wrong("must be a mapping")
        s = Section(doc, item.path, value=item, allowed=_TARGET_KEYS)
        given = [k for k in ("deployment", "workload", "selector") if s.has(k)]
        if len(given) > 1:
            raise s.err(given[1], f"give only one of deployment, workload, selector ({given[0]})")
        kind: WorkloadKind = DEFAULT_KIND
        if s.has("kind"):
            if s.has("deployment") or s.has("selector"):
                raise s.err("kind", "applies to workload (or name) only")
            kind = s.need("kind", _KIND)
        selector = s.get("selector", text, None)
        workload_key = next((k for k in ("deployment", "workload") if s.has(k)), "name")
        workload = s.get(workload_key, _OBJECT, None) if workload_key != "name" else None
        name = s.get("name", lambda v: text(v, max_chars=253), None)
        if name is None:
            if workload is None:
                raise doc.error(f"{item.path}.name", "missing (required with selector)")
            name = workload
        if workload is None and selector is None:
            workload = s.get("name", _OBJECT, None)
        if name in seen:
            raise s.err("name", f"duplicate workload name {show(name)} (also {seen[name]})")
        seen[name] = i
        tc = None
        if s.has("tc"):
            ts = Section(doc, f"{item.path}.tc", value=s.value("tc"), allowed=("device", "netns"))
            tc = TcDevice(device=ts.need("device", _interface), netns=ts.get("netns", _netns, None))
        out.append(
            BestEffortTarget(
                name=name,
                namespace=s.get("namespace", _NAMESPACE, DEFAULT_NAMESPACE),
                kind=kind,
                workload=workload,
                selector=selector,
                initial_bandwidth=s.get("initial_bandwidth", _BANDWIDTH, None),
                tc=tc,
            )
        )
    return tuple(out)


def _policy(doc: Document, top: Section, ctl: Section) -> tuple[PolicyParams, tuple[str, ...]]:
    pol = Section(doc, "policy", value=top.value("policy"), allowed=_POLICY_KEYS)
    legacy = compat.adopt_legacy_policy(top, ctl, pol)
    min_bw = pol.get("min_bandwidth", _BANDWIDTH, 10)
    max_bw = pol.get("max_bandwidth", _BANDWIDTH, 1000)
    if max_bw < min_bw:
        raise pol.err("max_bandwidth", f"must be at least min_bandwidth ({min_bw}), got {max_bw}")
    d = PolicyParams()
    factor = pol.get("decrease_factor", fraction, d.decrease_factor)
    # A blind cut deepens up to max_blind_factor: never shallower than a normal cut.
    blind = pol.get("max_blind_factor", fraction, max(d.max_blind_factor, factor))
    if blind < factor:
        raise pol.err(
            "max_blind_factor", f"must be at least decrease_factor ({factor}), got {blind}"
        )
    try:
        policy = PolicyParams(
            decrease_factor=factor,
            decrease_cooldown_s=pol.get("decrease_cooldown", _POLICY_TIME, 1.5),
            increase_step=pol.get("increase_step", _BANDWIDTH, 10),
            increase_interval_s=pol.get("increase_interval", _POLICY_TIME, 5.0),
            stable_fraction=pol.get("stable_fraction", fraction, 0.5),
            min_bandwidth=min_bw,
            max_bandwidth=max_bw,
            severity_max_multiplier=pol.get(
                "severity_max_multiplier", _SEVERITY, legacy.severity_default or 1.0
            ),
            usage_window_s=pol.get("usage_window", _USAGE_WINDOW, 1.0),
            effect_delay_s=pol.get("effect_delay", _EFFECT_DELAY, d.effect_delay_s),
            escalate_after=pol.get("escalate_after", _ESCALATE_AFTER, d.escalate_after),
            max_blind_factor=blind,
            early_warning_fraction=pol.get(
                "early_warning_fraction", fraction, d.early_warning_fraction
            ),
            knee_margin=pol.get("knee_margin", fraction, d.knee_margin),
            knee_step_fraction=pol.get("knee_step_fraction", fraction, d.knee_step_fraction),
            knee_memory_s=pol.get("knee_memory", _KNEE_MEMORY, d.knee_memory_s),
        )
    except ConfigError:
        raise
    except ValueError as exc:  # a cross-key rule of PolicyParams: one line, not a traceback
        raise doc.error(pol.path, str(exc)) from None
    return policy, legacy.warnings


def _control(doc: Document, ctl: Section) -> ControlSettings:
    if ctl.has("window_size") and ctl.has("window"):
        raise ctl.err("window", "set twice: window_size (samples) or window (seconds), not both")
    window_samples = ctl.get("window_size", _WINDOW_SAMPLES, None)
    return ControlSettings(
        probe_interval_s=ctl.get("probe_interval", _PROBE_INTERVAL, 0.01),
        control_interval_s=ctl.get("control_interval", _CONTROL_INTERVAL, 0.25),
        window_samples=window_samples,
        window_s=None if window_samples is not None else ctl.get("window", _WINDOW, 5.0),
        probe_timeout_s=ctl.get("probe_timeout", _PROBE_TIMEOUT, 1.0),
        scope=ctl.get("scope", _SCOPE, None),  # type: ignore[arg-type]
        max_probe_rate=ctl.get("max_probe_rate", _PROBE_RATE, DEFAULT_MAX_PROBE_RATE),
    )


def _agent(doc: Document, top: Section) -> AgentSettings:
    ag = Section(
        doc,
        "agent",
        value=top.value("agent"),
        allowed=("namespace", "service", "deadline", "token_file"),
    )
    d = AgentSettings()
    return AgentSettings(
        namespace=ag.get("namespace", _NAMESPACE, d.namespace),
        service=ag.get("service", _OBJECT, d.service),
        deadline_s=ag.get("deadline", _AGENT_DEADLINE, d.deadline_s),
        token_file=ag.get("token_file", _token_file, d.token_file),
    )


def _kubernetes(doc: Document, top: Section) -> KubernetesSettings:
    ks = Section(doc, "kubernetes", value=top.value("kubernetes"), allowed=_K8S_KEYS)
    given = ks.get("mode", text, None)
    mode = DEFAULT_MODE if given is None else next((m for m in MODES if m == given), None)
    if mode is None:
        raise ks.err("mode", f"must be {' or '.join(MODES)}, got {show(given)}")
    return KubernetesSettings(
        mode=mode,
        qps=ks.get("qps", _QPS, DEFAULT_QPS),
        concurrency=ks.get("concurrency", _CONCURRENCY, DEFAULT_CONCURRENCY),
        release_on_exit=ks.get("release_on_exit", boolean, False),
        lease_name=ks.get("lease_name", _LEASE_NAME, "detnet-controller"),
        lease_namespace=ks.get("lease_namespace", _NAMESPACE, None),
    )


def build_config(doc: Document) -> Config:
    """The Config a (top-level mapping) document describes; ConfigError when it is bad."""
    top = Section(doc, "", value=doc.root, allowed=_TOP_KEYS)
    apps = _apps(doc, top)
    targets = _targets(doc, top)
    ctl = Section(doc, "control", value=top.value("control"), allowed=_CONTROL_KEYS)
    policy, warnings = _policy(doc, top, ctl)
    for i, t in enumerate(targets):
        if t.initial_bandwidth is not None and not (
            policy.min_bandwidth <= t.initial_bandwidth <= policy.max_bandwidth
        ):
            raise doc.error(
                f"best_effort_targets[{i}].initial_bandwidth",
                f"must be within min_bandwidth..max_bandwidth "
                f"({policy.min_bandwidth}..{policy.max_bandwidth}), got {t.initial_bandwidth}",
            )
    ms = Section(doc, "metrics", value=top.value("metrics"), allowed=("listen",))
    config = Config(
        source=doc.source,
        critical_apps=apps,
        best_effort_targets=targets,
        control=_control(doc, ctl),
        policy=policy,
        kubernetes=_kubernetes(doc, top),
        usage=top.get("usage", _USAGE, None),
        agent=_agent(doc, top),
        metrics_listen=ms.get("listen", _LISTEN, "0.0.0.0:9108"),
        warnings=warnings,
        _lines=doc.lines,
    )
    config.targets()  # the engine's own checks of every target, now rather than at start
    return config


def lease_namespace(config: Config, *, pod_namespace: str | None) -> str:
    """The Lease's namespace: the config's, else the controller's own (``POD_NAMESPACE``,
    set by the Deployment through the downward API), else ``kube-system``.

    The caller reads the environment; a malformed value is a ConfigError naming the key."""
    if config.kubernetes.lease_namespace is not None:
        return config.kubernetes.lease_namespace
    ns = (pod_namespace or "").strip()
    if not ns:
        return DEFAULT_LEASE_NAMESPACE
    if not _DNS_NAME.fullmatch(ns):
        raise ConfigError(
            f"{config.where('kubernetes.lease_namespace')}: not set, and "
            f"POD_NAMESPACE={show(ns)} is not a namespace name; set it explicitly"
        )
    return ns
