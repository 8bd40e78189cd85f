"""The prototype's spellings: its ConfigMap wrapper and its legacy keys.

The prototype deployed its config as a ConfigMap whose ``data["critical-apps.yaml"]``
holds the document; ``unwrap_configmap`` returns that inner document with its lines
mapped onto the file. Its ``control`` section carried the policy's knobs
(``step_down``, ``step_up``, ``min_bandwidth``, ``max_bandwidth``) and its top level the
severity multiplier (``severity_multiplier_enabled``, ``severity_max_multiplier``);
``adopt_legacy_policy`` files those values under our ``policy`` keys, so the schema
reads (and range-checks) them once, while errors still name the key the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from detnet.controller.config.model import CONFIGMAP_KEY, Config
from detnet.controller.config.reading import Document, Section, Value, boolean, positive
from detnet.engine.parse import escape

LEGACY_TOP_KEYS = ("severity_multiplier_enabled", "severity_max_multiplier")
LEGACY_CONTROL_KEYS = ("step_down", "step_up", "min_bandwidth", "max_bandwidth")
# The prototype's control key -> our policy key.
_LEGACY_POLICY = {
    "step_down": "decrease_factor",
    "step_up": "increase_step",
    "min_bandwidth": "min_bandwidth",
    "max_bandwidth": "max_bandwidth",
}
# Its severity multiplier when enabled without a value.
PROTOTYPE_SEVERITY = 5.0
# Only its sign and size matter here; policy.decrease_factor's range applies after.
_STEP_DOWN = positive(1e12)


def is_configmap(doc: Document) -> bool:
    """``kind: ConfigMap`` at the top of the document."""
    if doc.root is None or not doc.root.is_mapping:
        return False
    children = doc.root.node.children
    return any(
        k.kind == "scalar" and k.text == "kind" and v.kind == "scalar" and v.text == "ConfigMap"
        for k, v in zip(children[0::2], children[1::2], strict=True)
    )


def unwrap_configmap(outer: Document) -> Document:
    """The document inside a ConfigMap's ``data["critical-apps.yaml"]``.

    Only ``apiVersion`` and that key are read: metadata, labels and other data keys are
    the cluster's business, and are not converted at all."""
    assert outer.root is not None
    top = _Fields(outer.root)
    version = top.get("apiVersion")
    if version is None or version.node.kind != "scalar" or version.node.text != "v1":
        shown = version.shown() if version is not None else "null"
        raise outer.error("apiVersion", f"a ConfigMap must be apiVersion v1, got {shown}")
    data = top.get("data")
    fields = _Fields(data) if data is not None and data.is_mapping else None
    inner = fields.get(CONFIGMAP_KEY) if fields is not None else None
    if fields is None or inner is None:
        keys = ", ".join(escape(k[:40]) for k in fields.names()) if fields else ""
        keys = keys or "none"
        raise outer.error("data", f"the ConfigMap has no {CONFIGMAP_KEY!r} key (keys: {keys})")
    text = inner.scalar() if inner.node.kind == "scalar" else None
    if not isinstance(text, str):
        raise inner.wrong("must be a YAML string")
    # A block scalar (|) starts on the line after its key: map inner lines onto the file.
    return Document(outer.source, text, line_offset=outer.lines.get(inner.path, 1))


class _Fields:
    """Keys of a mapping we do not validate (a ConfigMap's), read without converting."""

    def __init__(self, value: Value) -> None:
        self._value = value
        children = value.node.children
        self._nodes = {
            k.text: (k, v)
            for k, v in zip(children[0::2], children[1::2], strict=True)
            if k.kind == "scalar"
        }

    def names(self) -> list[str]:
        return list(self._nodes)

    def get(self, key: str) -> Value | None:
        if key not in self._nodes:
            return None
        key_node, node = self._nodes[key]
        path = f"{self._value.path}.{key}" if self._value.path else key
        self._value.doc.lines[path] = key_node.line
        return Value(self._value.doc, node, path=path)


@dataclass(frozen=True, kw_only=True)
class LegacyPolicy:
    """What the prototype's keys leave besides the values filed under ``policy``."""

    warnings: tuple[str, ...] = ()
    severity_default: float | None = None  # enabled without a value: the prototype's 5


def adopt_legacy_policy(top: Section, control: Section, policy: Section) -> LegacyPolicy:
    """File the prototype's policy keys under ``policy``; return what else they say.

    A key set both in the prototype's place and in ours is an error. ``step_down`` below
    1 is a decrease factor; 1 or more is the prototype's Mbit/s figure (it subtracted that,
    times the severity, per cut): detnet cuts 20 % of the usage instead and says so."""
    warnings: list[str] = []
    for legacy, ours in _LEGACY_POLICY.items():
        value = control.value(legacy)
        if value is None:
            continue
        if policy.has(ours):
            raise control.err(legacy, f"set twice: also policy.{ours}; keep one")
        if legacy == "step_down" and _STEP_DOWN(value) >= 1:
            line = value.line
            warnings.append(
                f"{value.doc.source}:{line}: {value.path}: {value.shown()} reads as Mbit/s: "
                "the prototype subtracted that (times the severity) per cut; detnet cuts a "
                "fraction of the usage, decrease_factor 0.20 (set a fraction like 0.2)"
            )
            continue
        policy.adopt(ours, value)
    enabled = top.value("severity_multiplier_enabled")
    multiplier = top.value("severity_max_multiplier")
    if enabled is None and multiplier is None:
        return LegacyPolicy(warnings=tuple(warnings))
    if policy.has("severity_max_multiplier"):
        key = "severity_max_multiplier" if multiplier is not None else "severity_multiplier_enabled"
        raise top.err(key, "set twice: also policy.severity_max_multiplier")
    if enabled is not None and not boolean(enabled):
        return LegacyPolicy(warnings=tuple(warnings))  # disabled: the default (1, off) stands
    if multiplier is None:
        return LegacyPolicy(warnings=tuple(warnings), severity_default=PROTOTYPE_SEVERITY)
    policy.adopt("severity_max_multiplier", multiplier)
    return LegacyPolicy(warnings=tuple(warnings))


def is_prototype(doc: Document, *, configmap: bool) -> bool:
    """Whether a document is the prototype's: its ConfigMap wrapper or its legacy keys."""
    if configmap:
        return True
    root = doc.root
    if root is None or not root.is_mapping:
        return False
    pairs = zip(root.node.children[0::2], root.node.children[1::2], strict=True)
    for key, value in pairs:
        if key.kind != "scalar":
            continue
        if key.text in LEGACY_TOP_KEYS:
            return True
        if key.text == "control" and value.kind == "mapping":
            inner = {k.text for k in value.children[0::2] if k.kind == "scalar"}
            if inner & set(LEGACY_CONTROL_KEYS):
                return True
    return False


def prototype_notices(config: Config) -> tuple[str, ...]:
    """Where a prototype config means something else to detnet: one notice per difference
    that applies to ``config``, with the setting that restores the prototype's behaviour
    where there is one."""
    out: list[str] = []
    for i, app in enumerate(config.critical_apps):
        at = f"critical_apps[{i}]"
        if app.max_latency_ms is not None:
            out.append(
                f"{config.where(f'{at}.max_latency_ms')}: enforced as a p99 RTT limit (a "
                "breach cuts best-effort traffic); the prototype did not act on it: remove "
                "it to cut on jitter alone"
            )
        if app.protocol == "tcp":
            out.append(
                f"{config.where(f'{at}.protocol')}: {app.name}'s SLO breaches cut "
                "best-effort traffic too (the prototype cut on UDP jitter only); no setting "
                "restores that: drop its thresholds to only watch it"
            )
    p, c = config.policy, config.control
    if p.severity_max_multiplier > 1.0:
        where = _where_any(
            config,
            "severity_max_multiplier",
            "severity_multiplier_enabled",
            "policy.severity_max_multiplier",
        )
        out.append(
            f"{where}: a violation k times over its "
            f"threshold cuts as k compounded {p.decrease_factor:.0%} cuts (k <= "
            f"{p.severity_max_multiplier:g}); the prototype multiplied one step: set "
            "severity_max_multiplier: 1 for single cuts"
        )
    where = _where_any(config, "control.step_up", "policy.increase_step", "control")
    out.append(
        f"{where}: recovery adds {p.increase_step} Mbit/s after "
        f"{p.increase_interval_s:g} s of stable signals each time, slower than the "
        "prototype's give-back every control cycle: lower policy.increase_interval to "
        "recover faster"
    )
    if c.window_samples is not None:
        ours = c.window_samples * c.probe_interval_s
        theirs = c.window_samples * c.control_interval_s
        out.append(
            f"{config.where('control.window_size')}: {c.window_samples} samples at "
            f"probe_interval {c.probe_interval_s:g} s cover {ours:g} s; the prototype took "
            f"one sample per control_interval, {theirs:g} s: set control.window: "
            f"{theirs:g}s for the same span"
        )
    for i, t in enumerate(config.best_effort_targets):
        if t.initial_bandwidth is not None:
            out.append(
                f"{config.where(f'best_effort_targets[{i}].initial_bandwidth')}: applied to "
                f"the running pods at start (a pod at {p.max_bandwidth}M gets "
                f"{t.initial_bandwidth}M on the controller's first act); remove it to start "
                "from max_bandwidth"
            )
    return tuple(out)


def _where_any(config: Config, *paths: str) -> str:
    """``FILE:LINE: path`` of the first of ``paths`` the file has (the last one otherwise)."""
    for path in paths:
        if path in config._lines:
            return config.where(path)
    return config.where(paths[-1])
