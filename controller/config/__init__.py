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
Nothing is resolved or read from the environment here: ``resolve_targets(config)``
looks up service names, ``lease_namespace(config, pod_namespace=...)`` applies the
controller's namespace; the config's users call them.

The package: ``model`` (the dataclasses), ``reading`` (bounded YAML -> values with lines,
typed readers), ``schema`` (sections, keys, defaults, ranges), ``compat`` (the
prototype's ConfigMap and legacy keys), ``resolve`` (DNS, for the users).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from detnet.controller.config.compat import (
    is_configmap,
    is_prototype,
    prototype_notices,
    unwrap_configmap,
)
from detnet.controller.config.model import (
    CONFIGMAP_KEY,
    Config,
    ControlSettings,
    CriticalApp,
    KubernetesSettings,
)
from detnet.controller.config.reading import MAX_BYTES, Document
from detnet.controller.config.resolve import resolve_targets
from detnet.controller.config.schema import DEFAULT_LEASE_NAMESPACE, build_config, lease_namespace
from detnet.controller.errors import ConfigError
from detnet.controller.workloads import (
    KINDS,
    BestEffortTarget,
    KubernetesMode,
    TcDevice,
    WorkloadKind,
)

__all__ = [
    "CONFIGMAP_KEY",
    "DEFAULT_LEASE_NAMESPACE",
    "KINDS",
    "MAX_BYTES",
    "BestEffortTarget",
    "Config",
    "ConfigError",
    "ControlSettings",
    "CriticalApp",
    "KubernetesMode",
    "KubernetesSettings",
    "TcDevice",
    "WorkloadKind",
    "lease_namespace",
    "load_config",
    "parse_config",
    "resolve_targets",
]


def load_config(path: str | Path) -> Config:
    """Read and validate a config file (our form or the prototype's ConfigMap).

    Raises ConfigError with ``FILE:LINE: field: problem`` for anything wrong."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # bounded: /dev/zero is not a config either
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: no such file") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_BYTES >> 20} MiB; a config is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text (byte {exc.start})") from exc
    return parse_config(text, source=source)


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Validate config text; ``source`` names it in errors."""
    doc = Document(source, text)
    if doc.root is None:
        raise ConfigError(f"{source}: empty config")
    configmap = is_configmap(doc)
    if configmap:
        doc = unwrap_configmap(doc)
    if doc.root is None or not doc.root.is_mapping:
        shown = "nothing" if doc.root is None else doc.root.shown()
        raise doc.error("", f"the config must be a mapping, got {shown}")
    config = build_config(doc)
    if is_prototype(doc, configmap=configmap):
        notices = prototype_notices(config)
        config = dataclasses.replace(config, warnings=(*config.warnings, *notices))
    return config
