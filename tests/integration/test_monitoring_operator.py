"""deploy/monitoring/operator: the prometheus-operator objects render offline, carry exactly
the plain rules and dashboard (one source each, generated), and select what the manifests
deploy. `python -m tests.integration.test_monitoring_operator` regenerates the two files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
OPERATOR = MONITORING / "operator"
RULES = MONITORING / "rules" / "detnet-rules.yaml"
DASHBOARD = MONITORING / "dashboards" / "detnet.json"
HEADER = (
    "# Generated from {source} by `python -m tests.integration.test_monitoring_operator`:\n"
    "# edit the source, not this file (tests/integration/test_monitoring_operator.py checks).\n"
)


class _Literal(str):
    """A string YAML writes as a literal block (the dashboard JSON stays readable)."""


def _literal(dumper: yaml.SafeDumper, text: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")


yaml.SafeDumper.add_representer(_Literal, _literal)


def prometheus_rule() -> str:
    """The PrometheusRule carrying ../rules/detnet-rules.yaml's groups unchanged."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "detnet",
            "namespace": "detnet-system",
            "labels": {
                "app.kubernetes.io/name": "detnet",
                "app.kubernetes.io/component": "monitoring",
            },
        },
        "spec": yaml.safe_load(RULES.read_text(encoding="utf-8")),
    }
    body = yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
    return HEADER.format(source="../rules/detnet-rules.yaml") + body


def dashboard_configmap() -> str:
    """The dashboard as a ConfigMap for Grafana's sidecar (label grafana_dashboard=1)."""
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "detnet-dashboard",
            "namespace": "detnet-system",
            "labels": {
                "app.kubernetes.io/name": "detnet",
                "app.kubernetes.io/component": "monitoring",
                "grafana_dashboard": "1",
            },
        },
        "data": {"detnet.json": _Literal(DASHBOARD.read_text(encoding="utf-8"))},
    }
    body = yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
    return HEADER.format(source="../dashboards/detnet.json") + body


GENERATED = {"prometheusrule.yaml": prometheus_rule, "dashboard.yaml": dashboard_configmap}


def render(path: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (make test installs it as root)")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_the_generated_files_agree_with_their_source(name: str) -> None:
    assert (OPERATOR / name).read_text(encoding="utf-8") == GENERATED[name](), (
        f"deploy/monitoring/operator/{name} is stale: "
        "run `python -m tests.integration.test_monitoring_operator`"
    )


def test_the_objects_carry_the_plain_rules_and_dashboard() -> None:
    docs = render(OPERATOR)
    rule = one(docs, "PrometheusRule", "detnet")
    assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
    board = one(docs, "ConfigMap", "detnet-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["detnet.json"]) == json.loads(DASHBOARD.read_text())
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "detnet"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_the_monitors_select_what_the_manifests_deploy() -> None:
    docs = render(OPERATOR)
    base, agent = render(ROOT / "deploy" / "base"), render(ROOT / "deploy" / "agent")

    monitor = one(docs, "ServiceMonitor", "detnet-controller")
    service = one(base, "Service", "detnet-metrics")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # The rules and the dashboard select job="detnet-controller", as the plain config names it.
    jobs = {r["replacement"] for e in monitor["spec"]["endpoints"] for r in e["relabelings"]
            if r.get("targetLabel") == "job"}  # fmt: skip
    assert jobs == {"detnet-controller"}

    pods = one(docs, "PodMonitor", "detnet-agent")
    daemonset = one(agent, "DaemonSet", "detnet-agent")
    template = daemonset["spec"]["template"]
    assert pods["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert _matches(pods["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    container_ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in pods["spec"]["podMetricsEndpoints"]} <= container_ports


if __name__ == "__main__":
    for name, generate in GENERATED.items():
        (OPERATOR / name).write_text(generate(), encoding="utf-8")
        print(f"wrote deploy/monitoring/operator/{name}")
