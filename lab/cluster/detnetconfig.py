"""The controller's config for the cluster lab, in ONE function (``controller_config``),
and which of the cluster features the installed ``detnet`` accepts (``detect_features``).

The config is deploy/base/configmap.yaml's, in our own form: the same critical apps,
ports and SLOs, the same best-effort Deployments, and the product's default policy and
control cadence (no ``policy:``, no lab-tuned ``control:`` keys): the lab measures what
users deploy. Three keys turn on what is being built as this is written (issues 12/13);
``detect_features`` asks ``detnet config check`` whether this detnet accepts each one,
and the lab runs without what it does not (docs/lab.md, "What runs today"):

- ``critical_apps[].endpoints: pods``: probe every ready endpoint of the Service;
  without it the lab probes each app at its node-a replica's address, as a Service's
  load balancer would pin a probe flow to one replica (the congested one);
- ``control.scope: node | cluster``: without it there is only cluster scope, and the
  node_scope run is skipped;
- ``usage: agent``: the controller asks the node agents for per-pod usage.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detnet.engine.slo import Slo
from detnet.lab.cluster.plan import (
    CONTROLLER_METRICS_PORT,
    TCP_PROBE_PORT,
    UDP_PROBE_PORT,
)
from detnet.lab.errors import LabError

DETNET = [sys.executable, "-m", "detnet.controller"]


@dataclass(frozen=True)
class Features:
    """What the installed detnet accepts of the cluster features."""

    endpoints: bool = False  # critical_apps[].endpoints: pods
    scope: bool = False  # control.scope
    usage: bool = False  # usage: agent


# deploy/base/configmap.yaml's critical apps (tests/unit/test_cluster_config.py keeps
# these equal to the manifest).
APPS: tuple[dict[str, Any], ...] = (
    {
        "name": "robot-control",
        "namespace": "critical-apps",
        "port": UDP_PROBE_PORT,
        "protocol": "UDP",
        "max_jitter_ms": 1.0,
        "max_latency_ms": 5.0,
        "max_queue_delay_ms": 2.0,
        "max_loss_ratio": 0.01,
        "priority": 100,
    },
    {
        "name": "safety-scanner",
        "namespace": "critical-apps",
        "port": TCP_PROBE_PORT,
        "protocol": "TCP",
        "mode": "echo",
        "max_jitter_ms": 2.0,
        "max_latency_ms": 10.0,
        "max_queue_delay_ms": 4.0,
        "max_loss_ratio": 0.01,
        "priority": 90,
    },
)
BEST_EFFORT_TARGETS = (
    {"deployment": "telemetry-upload", "namespace": "best-effort"},
    {"deployment": "erp-dashboard", "namespace": "best-effort"},
)


def app_slos() -> dict[str, Slo]:
    """The critical apps' SLOs as the report evaluates them."""
    return {
        a["name"]: Slo(
            app=a["name"],
            max_jitter_ms=a.get("max_jitter_ms"),
            max_latency_ms=a.get("max_latency_ms"),
            max_queue_delay_ms=a.get("max_queue_delay_ms"),
            max_loss_ratio=a.get("max_loss_ratio"),
        )
        for a in APPS
    }


def controller_config(
    *, features: Features, scope: str, pinned: Mapping[str, str]
) -> dict[str, Any]:
    """The config of ``detnet control`` for one run of the lab: ``scope`` is ``node`` or
    ``cluster``; ``pinned`` maps each app to the address probed when ``features`` has no
    per-endpoint probing (its replica on the congested node)."""
    apps = []
    for a in APPS:
        app = {k: v for k, v in a.items() if k != "namespace"}
        if features.endpoints:
            app = {
                "name": a["name"],
                "service": f"{a['name']}.{a['namespace']}.svc.cluster.local",
                "endpoints": "pods",
                **{k: v for k, v in app.items() if k != "name"},
            }
        else:
            app = {"name": a["name"], "host": pinned[a["name"]], **app}
        apps.append(app)
    config: dict[str, Any] = {
        "critical_apps": apps,
        "best_effort_targets": [dict(t) for t in BEST_EFFORT_TARGETS],
        "metrics": {"listen": f"0.0.0.0:{CONTROLLER_METRICS_PORT}"},
    }
    if features.scope:
        config["control"] = {"scope": scope}
    if features.usage:
        config["usage"] = "agent"
    return config


def _accepted(config: Mapping[str, Any], tmp: Path) -> tuple[bool, str]:
    path = tmp / "probe.yaml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    done = subprocess.run(
        [*DETNET, "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return done.returncode == 0, done.stderr.strip().splitlines()[-1:][0] if done.stderr else ""


def detect_features() -> Features:
    """Which cluster features ``detnet config check`` accepts (module docstring)."""
    pinned = {a["name"]: "198.18.1.10" for a in APPS}
    with tempfile.TemporaryDirectory(prefix="detnet-cl-features-") as tmp:
        base_ok, why = _accepted(
            controller_config(features=Features(), scope="cluster", pinned=pinned), Path(tmp)
        )
        if not base_ok:
            raise LabError(f"detnet config check refuses the lab's config: {why}")
        every = Features(endpoints=True, scope=True, usage=True)
        if _accepted(controller_config(features=every, scope="node", pinned=pinned), Path(tmp))[0]:
            return every
        found = {}
        for name in ("endpoints", "scope", "usage"):
            one = Features(**{name: True})
            found[name] = _accepted(
                controller_config(features=one, scope="node", pinned=pinned), Path(tmp)
            )[0]
        return Features(**found)
