"""deploy/monitoring/operator: the prometheus-operator objects render offline, carry exactly
the plain rules and dashboard (one source each, generated), and select what the manifests
deploy; deploy/monitoring/compat: the prototype-compatibility rules, as a Component of the
plain setup and as a PrometheusRule of the operator's, render with exactly their one source.
`python -m tests.integration.test_monitoring_operator` regenerates the generated files."""

from __future__ import annotations

import fnmatch
import json
import os
import re
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
COMPAT = MONITORING / "compat"
COMPAT_RULES = COMPAT / "prototype-rules.yaml"
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


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version = "([^"]+)"$', text, flags=re.M)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def _readable(value: Any) -> Any:
    """``value`` with every multi-line string (an expression laid out on several lines)
    marked to be written as a literal block, as it reads in its source."""
    if isinstance(value, dict):
        return {k: _readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_readable(v) for v in value]
    return _Literal(value) if isinstance(value, str) and "\n" in value else value


def _rule_object(source: Path, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": "detnet-system", "labels": labels},
        "spec": _readable(yaml.safe_load(source.read_text(encoding="utf-8"))),
    }


def prometheus_rule() -> str:
    """The PrometheusRule carrying ../rules/detnet-rules.yaml's groups unchanged."""
    labels = {"app.kubernetes.io/name": "detnet", "app.kubernetes.io/component": "monitoring"}
    body = yaml.safe_dump(
        _rule_object(RULES, "detnet", labels), sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER.format(source="../rules/detnet-rules.yaml") + body


def compat_prometheus_rule() -> str:
    """The PrometheusRule carrying ../prototype-rules.yaml's groups unchanged. A Component
    adds no labels of its own: the object carries all the recommended ones itself."""
    labels = {
        "app.kubernetes.io/name": "detnet",
        "app.kubernetes.io/instance": "detnet",
        "app.kubernetes.io/component": "monitoring",
        "app.kubernetes.io/part-of": "detnet",
        "app.kubernetes.io/version": _version(),
    }
    doc = _rule_object(COMPAT_RULES, "detnet-prototype-compat", labels)
    body = yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True)
    return HEADER.format(source="../prototype-rules.yaml") + body


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


# Path under deploy/monitoring -> the function that writes it.
GENERATED = {
    "operator/prometheusrule.yaml": prometheus_rule,
    "operator/dashboard.yaml": dashboard_configmap,
    "compat/operator/prometheusrule.yaml": compat_prometheus_rule,
}


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
    assert (MONITORING / name).read_text(encoding="utf-8") == GENERATED[name](), (
        f"deploy/monitoring/{name} is stale: "
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


def _with_component(tmp_path: Path, base: Path, component: Path) -> list[dict[str, Any]]:
    """What an overlay of ``base`` with ``component`` enabled renders (kustomize refuses
    absolute paths, so the overlay names both relative to itself)."""
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base, tmp_path)],
        "components": [os.path.relpath(component, tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay), encoding="utf-8")
    return render(tmp_path)


def _rules_configmap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("prometheus-rules-")
    ]
    return cm


def test_the_compat_component_adds_its_rules_to_the_plain_prometheus(tmp_path: Path) -> None:
    """Enabled on deploy/monitoring, the Component adds prototype-rules.yaml to the rules
    ConfigMap Prometheus mounts and loads, beside the alert rules, and changes nothing else."""
    plain = render(MONITORING)
    docs = _with_component(tmp_path, MONITORING, COMPAT)
    alerts = RULES.read_text(encoding="utf-8")
    cm = _rules_configmap(docs)
    assert _rules_configmap(plain)["data"] == {"detnet-rules.yaml": alerts}
    assert cm["data"] == {
        "detnet-rules.yaml": alerts,
        "prototype-compat.yaml": COMPAT_RULES.read_text(encoding="utf-8"),
    }
    # Prometheus mounts that ConfigMap where its rule_files glob looks, and the glob
    # takes the new key.
    dep = one(docs, "Deployment", "prometheus")
    spec = dep["spec"]["template"]["spec"]
    (volume,) = [
        v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
    ]
    (mount,) = [
        m for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]
    ]
    config = yaml.safe_load(
        (MONITORING / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    )
    loaded = [
        key
        for key in cm["data"]
        if any(fnmatch.fnmatch(f"{mount['mountPath']}/{key}", g) for g in config["rule_files"])
    ]
    assert sorted(loaded) == sorted(cm["data"])

    def rest(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The ConfigMap's name hash changes, and so does the Deployment's reference to it.
        skip = {
            ("ConfigMap", _rules_configmap(ds)["metadata"]["name"]),
            ("Deployment", "prometheus"),
        }
        return [d for d in ds if (d["kind"], d["metadata"]["name"]) not in skip]

    assert rest(docs) == rest(plain)


def test_the_compat_prometheusrule_carries_the_compat_rules(tmp_path: Path) -> None:
    """Enabled on deploy/monitoring/operator, compat/operator adds one PrometheusRule with
    exactly prototype-rules.yaml's groups, labelled like the rest, and nothing else."""
    docs = _with_component(tmp_path, OPERATOR, COMPAT / "operator")
    rule = one(docs, "PrometheusRule", "detnet-prototype-compat")
    assert rule["spec"] == yaml.safe_load(COMPAT_RULES.read_text(encoding="utf-8"))
    labels = rule["metadata"]["labels"]
    for key in ("name", "instance", "component", "part-of", "version"):
        assert labels[f"app.kubernetes.io/{key}"], key
    assert labels["app.kubernetes.io/version"] == _version()
    assert [d for d in docs if d is not rule] == render(OPERATOR)


if __name__ == "__main__":
    for name, generate in GENERATED.items():
        (MONITORING / name).write_text(generate(), encoding="utf-8")
        print(f"wrote deploy/monitoring/{name}")
