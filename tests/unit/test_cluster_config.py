"""The cluster lab's controller config (lab/cluster/detnetconfig.py): the critical apps
and best-effort targets are deploy/base/configmap.yaml's, the policy is the product's
default, and the config the lab generates loads with the controller's own reader."""

from __future__ import annotations

from pathlib import Path

import yaml

from detnet.controller.aimd import PolicyParams
from detnet.controller.config import load_config, parse_config
from detnet.lab.cluster.detnetconfig import Features, app_slos, controller_config

CONFIGMAP = Path(__file__).resolve().parents[2] / "deploy" / "base" / "configmap.yaml"
PINNED = {"robot-control": "198.18.1.10", "safety-scanner": "198.18.1.11"}


def test_apps_and_targets_are_the_deployed_ones() -> None:
    deployed = load_config(CONFIGMAP)
    lab = parse_config(
        yaml.safe_dump(controller_config(features=Features(), scope="cluster", pinned=PINNED))
    )
    fields = ("name", "protocol", "port", "mode", "max_jitter_ms", "max_latency_ms",
              "max_queue_delay_ms", "max_loss_ratio", "priority")  # fmt: skip
    assert [[getattr(a, f) for f in fields] for a in lab.critical_apps] == [
        [getattr(a, f) for f in fields] for a in deployed.critical_apps
    ]
    assert [(t.workload, t.namespace) for t in lab.best_effort_targets] == [
        (t.workload, t.namespace) for t in deployed.best_effort_targets
    ]
    slos = app_slos()
    for app in deployed.critical_apps:
        assert slos[app.name].max_latency_ms == app.max_latency_ms
        assert slos[app.name].max_jitter_ms == app.max_jitter_ms


def test_the_policy_is_the_products_default() -> None:
    cfg = controller_config(features=Features(), scope="cluster", pinned=PINNED)
    assert "policy" not in cfg
    assert parse_config(yaml.safe_dump(cfg)).policy == PolicyParams()


def test_without_features_apps_are_probed_at_the_pinned_replica() -> None:
    cfg = controller_config(features=Features(), scope="node", pinned=PINNED)
    assert [a["host"] for a in cfg["critical_apps"]] == ["198.18.1.10", "198.18.1.11"]
    assert "control" not in cfg
    assert "usage" not in cfg


def test_features_switch_on_their_keys() -> None:
    cfg = controller_config(features=Features(True, True, True), scope="node", pinned=PINNED)
    app = cfg["critical_apps"][0]
    assert (app["service"], app["endpoints"]) == (
        "robot-control.critical-apps.svc.cluster.local", "pods"
    )  # fmt: skip
    assert "host" not in app
    assert cfg["control"] == {"scope": "node"}
    assert cfg["usage"] == "agent"
