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

from detnet.controller.config.model import CONFIGMAP_KEY
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
    1 is a decrease factor; 1 or more is the Mbit/s figure the prototype wrote but never
    applied (its controller always cut 20 %): we keep that behaviour and say so."""
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
                f"{value.doc.source}:{line}: {value.path}: {value.shown()} reads as Mbit/s, "
                "which the prototype never applied; using decrease_factor 0.20 "
                "(set a fraction like 0.2)"
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
