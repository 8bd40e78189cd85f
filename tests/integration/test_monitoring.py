"""deploy/monitoring: the alert rules and the prototype-compatibility recording rules pass
promtool (the latter also promtool's rule tests, which pin their units and labels), the
dashboard is well formed, every metric name the dashboard and the rules use exists in a
real controller's /metrics, and a real Prometheus (Debian's binary, on 127.0.0.1) scraping
a running `detnet control --dry-run` (probing reflectors on 127.0.0.1) answers every
dashboard query with data, evaluates every rule without error, and records the prototype's
series with the prototype's labels."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import requires_tool
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "detnet-rules.yaml"
COMPAT_RULES = MONITORING / "compat" / "prototype-rules.yaml"
RULE_FILES = (RULES, COMPAT_RULES)
DASHBOARD = MONITORING / "dashboards" / "detnet.json"
DATASOURCES = MONITORING / "grafana" / "datasources.yaml"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
APPS = ("robot-control", "safety-scanner")
WORKLOADS = ("telemetry-upload", "erp-dashboard")
# Series Prometheus itself synthesises for every target; not in the controller's output.
PROMETHEUS_SERIES = {"up"}
# Grafana's range variable, replaced as Grafana would with the 1 s test scrape interval.
GRAFANA_VARS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}
STARTUP_TIMEOUT_S = 60.0  # a bound on waiting, not a performance assertion
OPERATOR = MONITORING / "operator"
# Labels prometheus-operator attaches to every ServiceMonitor/PodMonitor target itself.
OPERATOR_TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint"}
# Labels of per-endpoint probe series (docs/metrics.md), which the dry-run live setup,
# probing fixed addresses, does not produce.
ENDPOINT_LABELS = {"app", "pod", "node"}

requires_promtool = requires_tool("promtool", "prometheus")
requires_prometheus = requires_tool("prometheus", "prometheus")

T = TypeVar("T")


# ------------------------------------------------------------------ expressions


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(title, expr) for title, _, expr in dashboard_targets()]


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    return [
        (p["title"], t["refId"], t["expr"])
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def rules_of(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def rule_exprs(*paths: Path) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule of ``paths`` (default: every rule file)."""
    return [
        (str(r.get("alert") or r["record"]), str(r["expr"]))
        for path in paths or RULE_FILES
        for r in rules_of(path)
    ]


# What the prototype exported (its flow manager and its metrics exporter), with its labels.
PROTOTYPE_SERIES = {
    "flowmanager_udp_jitter_ms": {"service", "target_host"},
    "flowmanager_tcp_jitter_ms": {"service", "target_host"},
    "flowmanager_udp_latency_ms": {"service", "target_host"},
    "flowmanager_tcp_latency_ms": {"service", "target_host"},
    "flowmanager_bandwidth_limit_mbps": {"deployment", "namespace"},
    "kubernetes_deployment_bandwidth_limit_mbps": {"namespace", "deployment"},
    "flowmanager_best_effort_throughput_mbps": {"deployment"},
    "flowmanager_tcp_throughput_mbps": {"service", "target_host"},
}
# Not recorded at all, and why (docs/migrating.md says the same).
NOT_RECORDED = {
    "flowmanager_tcp_throughput_mbps": "the prototype made it up from connect times",
}
# Prototype labels no detnet series carries, so no recording can fill them.
NOT_CARRIED = {
    "target_host": "detnet's series name the app (target), not the address probed",
    "namespace": "detnet's series name the workload, not its namespace",
}
# The series the prototype's flow manager served itself, scraped as job flow-manager (the
# job its dashboard selects them by): the compat rules give them that job.
FLOW_MANAGER_JOB = {
    "flowmanager_udp_jitter_ms",
    "flowmanager_tcp_jitter_ms",
    "flowmanager_bandwidth_limit_mbps",
}
USAGE = "detnet_egress_usage_bytes_per_second"
# Why the dry-run live setup has no usage: it comes from the node agents, which only the
# Kubernetes enforcer asks (or from the tc enforcer's counters); a dry run has neither.
NO_USAGE_LIVE = f"{USAGE} needs node agents or the tc enforcer; a dry run has neither"
# Recorded series the dry-run live setup cannot produce (the usage-derived ones).
NOT_PRODUCED_LIVE = {"flowmanager_best_effort_throughput_mbps": NO_USAGE_LIVE}
# Dashboard queries without data in the dry-run live setup, (panel title, refId): the
# usage-derived ones, for the same reason.
NO_DATA_LIVE = {("Best-effort usage against limit, per workload and node", "A"): NO_USAGE_LIVE}


def for_prometheus(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unresolved Grafana variable in {expr!r}"
    return expr


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def series_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, keywords, label names,
    strings, durations and numbers left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def documented_names() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    return set(re.findall(r"`(detnet_[a-z0-9_]+)", text))


def family_of(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


# ---------------------------------------------------------------- static checks


@requires_promtool
@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path: Path) -> None:
    out = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rule_exprs(path))} rules found" in out.stdout


def test_compat_rules_record_the_prototype_series() -> None:
    """Every series the prototype exported is recorded, but the one with no honest
    source; each keeps the prototype's labels but those detnet cannot know; the flow
    manager's own carry its scrape job."""
    rules = {r["record"]: r for r in rules_of(COMPAT_RULES)}
    assert set(rules) == set(PROTOTYPE_SERIES) - set(NOT_RECORDED)
    for name, rule in rules.items():
        assert rule.get("labels", {}) == (
            {"job": "flow-manager"} if name in FLOW_MANAGER_JOB else {}
        )
        wanted = PROTOTYPE_SERIES[name] - set(NOT_CARRIED)
        assert f"by ({', '.join(sorted(wanted))})" in rule["expr"], name
    assert {n for n, r in rules.items() if USAGE in r["expr"]} == set(NOT_PRODUCED_LIVE)


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@requires_promtool
def test_compat_rules_units_and_labels(tmp_path: Path) -> None:
    """promtool's rule tests on made-up detnet series: ms from seconds, Mbit/s from bytes
    per second, one series per app over its endpoints (the worst) and replicas, the
    tightest limit of a workload over its nodes, measured usage over all of its pods."""
    ctl = {"job": "detnet-controller"}
    rc = {**ctl, "app": "robot-control", "protocol": "udp"}
    ep_a = {**rc, "target": "robot-control/rc-a", "pod": "rc-a", "node": "node-a"}
    ep_b = {**rc, "target": "robot-control/rc-b", "pod": "rc-b", "node": "node-b"}
    ss = {**ctl, "target": "safety-scanner", "app": "safety-scanner", "protocol": "tcp"}
    jitter, window = "detnet_probe_jitter_seconds", "detnet_probe_rtt_window_seconds"
    limit = "detnet_egress_limit_bytes_per_second"
    tu = {**ctl, "workload": "telemetry-upload"}
    series = {
        _series(jitter, {**ep_a, "method": "iqr"}): 0.0004,
        _series(jitter, {**ep_b, "method": "iqr"}): 0.0009,  # the worst endpoint
        _series(jitter, {**ep_b, "method": "rfc3550"}): 0.005,  # not the prototype's jitter
        _series(jitter, {**ss, "method": "iqr"}): 0.0015,
        _series(window, {**ep_a, "quantile": "0.5"}): 0.00025,
        _series(window, {**ep_a, "quantile": "0.99"}): 0.004,
        _series(window, {**ss, "quantile": "0.5"}): 0.0012,
        # telemetry-upload under scope node, seen by two replicas; erp cluster-wide.
        _series(limit, {**tu, "pod": "ctl-1", "node": "node-a"}): 1e7,
        _series(limit, {**tu, "pod": "ctl-2", "node": "node-a"}): 1e7,
        _series(limit, {**tu, "pod": "ctl-1", "node": "node-b"}): 1.25e8,
        _series(limit, {**ctl, "pod": "ctl-1", "workload": "erp-dashboard"}): 5e6,
        _series(USAGE, {**ctl, "workload": "telemetry-upload"}): 7.5e6,  # node="": all pods
        _series(USAGE, {**ctl, "workload": "telemetry-upload", "node": "node-a"}): 5e6,
        _series(jitter, {"job": "other", "target": "x", "protocol": "udp", "method": "iqr"}): 1.0,
    }  # fmt: skip
    fm = {"job": "flow-manager"}
    expected = {
        "flowmanager_udp_jitter_ms": [({**fm, "service": "robot-control"}, 0.0009 * 1000)],
        "flowmanager_tcp_jitter_ms": [({**fm, "service": "safety-scanner"}, 0.0015 * 1000)],
        "flowmanager_udp_latency_ms": [({"service": "robot-control"}, 0.00025 * 1000)],
        "flowmanager_tcp_latency_ms": [({"service": "safety-scanner"}, 0.0012 * 1000)],
        "flowmanager_bandwidth_limit_mbps": [
            ({**fm, "deployment": "telemetry-upload"}, 1e7 * 8 / 1e6),
            ({**fm, "deployment": "erp-dashboard"}, 5e6 * 8 / 1e6),
        ],
        "kubernetes_deployment_bandwidth_limit_mbps": [
            ({"deployment": "telemetry-upload"}, 1e7 * 8 / 1e6),
            ({"deployment": "erp-dashboard"}, 5e6 * 8 / 1e6),
        ],
        "flowmanager_best_effort_throughput_mbps": [
            ({"deployment": "telemetry-upload"}, 7.5e6 * 8 / 1e6)
        ],
    }
    assert set(expected) == {r["record"] for r in rules_of(COMPAT_RULES)}
    spec = {
        "rule_files": [str(COMPAT_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": f"{v!r}x5"} for s, v in series.items()],
                "promql_expr_test": [
                    {
                        "expr": name,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": _series(name, labels), "value": value}
                            for labels, value in samples
                        ],
                    }
                    for name, samples in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "compat-test.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@requires_promtool
def test_promtool_check_prometheus_config(tmp_path: Path) -> None:
    """The scrape config, rules included. Debian builds Prometheus without Kubernetes
    service discovery, so each kubernetes_sd_configs becomes a static target here; the
    rest (globals, relabelling, rule files) is checked as written."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"detnet-controller", "detnet-probes"}
    for job in config["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs")
        assert sd[0]["role"] == "pod"
        assert sd[0]["namespaces"]["names"] == ["detnet-system"]  # what the Role allows
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    config["rule_files"] = [str(p) for p in RULE_FILES]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = subprocess.run(
        ["promtool", "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    uid = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"][0]["uid"]
    assert dash["uid"]
    assert dash["title"]
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    # What the issue asks for: a heatmap per app from the histogram, and the rest.
    for app in APPS:
        (heat,) = [p for p in panels if p["type"] == "heatmap" and app in p["title"]]
        (target,) = heat["targets"]
        assert target["format"] == "heatmap"
        assert (
            f'detnet_probe_rtt_seconds_bucket{{job="detnet-controller", target=~"{app}(/.+)?"}}'
            in (target["expr"])
        )
        assert "by (le)" in target["expr"]
    used = {n for _, e in dashboard_queries() for n in series_names(e)}
    for name in (
        "detnet_probe_jitter_seconds",
        "detnet_slo_threshold_seconds",
        "detnet_probe_queue_delay_seconds",
        "detnet_probe_loss_ratio",
        "detnet_egress_limit_bytes_per_second",
        "detnet_decisions_total",
        "detnet_enforcement_latency_seconds_bucket",
        USAGE,
    ):
        assert name in used, f"no panel shows {name}"
    # Usage against limit in one panel, by workload and node.
    (panel,) = [p for p in panels if USAGE in json.dumps(p["targets"])]
    exprs = [t["expr"] for t in panel["targets"]]
    assert {n for e in exprs for n in series_names(e)} == {
        USAGE,
        "detnet_egress_limit_bytes_per_second",
    }
    assert all("by (workload, node)" in e for e in exprs), exprs


def test_queries_name_only_documented_metrics() -> None:
    documented = {family_of(n) for n in documented_names()}
    for where, expr in dashboard_queries() + rule_exprs():
        for name in series_names(expr) - PROMETHEUS_SERIES:
            assert family_of(name) in documented, f"{where}: {name} is not in docs/metrics.md"


def test_series_names_parser() -> None:
    expr = (
        'sum by (target) (rate(detnet_probes_lost_total{job="x", a=~"b|c"}[5m])) > on (target)'
        " group_left max by (target) (detnet_slo_max_loss_ratio) and absent(up == 1) * 8"
    )
    assert series_names(expr) == {"detnet_probes_lost_total", "detnet_slo_max_loss_ratio", "up"}


# --------------------------------------------------------------- live processes


def shipped_target_labels(job: str) -> dict[str, str]:
    """The labels the shipped scrape config gives a target of ``job`` from Kubernetes
    service discovery, with stand-in values (Debian's Prometheus has no Kubernetes SD)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    (found,) = [j for j in config["scrape_configs"] if j["job_name"] == job]
    return {
        r["target_label"]: f"detnet-test-{r['target_label']}"
        for r in found["relabel_configs"]
        if "target_label" in r
    }


def operator_target_labels() -> set[str]:
    """Every label the operator's monitors attach to a target: its own, and ours."""
    labels = set(OPERATOR_TARGET_LABELS)
    for path in sorted(OPERATOR.glob("*monitor*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            spec = doc["spec"]
            for endpoint in spec.get("endpoints", []) + spec.get("podMetricsEndpoints", []):
                labels |= {r["targetLabel"] for r in endpoint.get("relabelings", [])}
    return labels


def _detnet() -> str:
    exe = Path(sys.executable).with_name("detnet")
    return str(exe) if exe.exists() else "detnet"


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode("utf-8"))


@dataclass
class Proc:
    """A child process we started, with its output in files."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")


@contextlib.contextmanager
def started(name: str, argv: list[str], logdir: Path) -> Iterator[Proc]:
    """Run ``argv``; on exit stop it by its PID (SIGTERM, then SIGKILL)."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=logdir)
    proc = Proc(name, popen, log)
    try:
        yield proc
    finally:
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)


def wait_for(what: str, probe: Callable[[], T | None], procs: list[Proc]) -> T:
    """Poll ``probe`` until it returns a value (not None); fail when a process dies or
    the bound passes."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        try:
            value = probe()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last, value = exc, None
        if value is not None:
            return value
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}:\n{p.output()}" for p in procs)
    pytest.fail(f"timed out waiting for {what} (last error: {last!r})\n{logs}")


@dataclass
class Live:
    metrics_url: str
    prometheus_url: str
    scrape: str
    procs: list[Proc]

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(_get(url))
        assert body["status"] == "success", body
        return list(body["data"]["result"])


def _control_config(udp_port: int, tcp_port: int) -> dict[str, Any]:
    return {
        "critical_apps": [
            {
                "name": "robot-control",
                "host": "127.0.0.1",
                "port": udp_port,
                "protocol": "UDP",
                "max_jitter_ms": 1.0,
                "max_latency_ms": 5.0,
                "max_queue_delay_ms": 2.0,
                "max_loss_ratio": 0.01,
                "priority": 100,
            },
            {
                "name": "safety-scanner",
                "host": "127.0.0.1",
                "port": tcp_port,
                "protocol": "TCP",
                "mode": "echo",
                "max_jitter_ms": 2.0,
                "max_latency_ms": 10.0,
                "max_queue_delay_ms": 4.0,
                "max_loss_ratio": 0.01,
                "priority": 90,
            },
        ],
        "best_effort_targets": [
            {"deployment": w, "namespace": "best-effort", "initial_bandwidth": 500}
            for w in WORKLOADS
        ],
        # Modest rates: the machine is shared.
        "control": {"probe_interval": "20ms", "control_interval": "250ms", "window": "5s"},
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package prometheus; `make test` installs it)")
    tmp = tmp_path_factory.mktemp("monitoring-live")
    udp_port = free_port(socket.SOCK_DGRAM)
    tcp_port = free_port(socket.SOCK_STREAM)
    metrics_port = free_port(socket.SOCK_STREAM)
    prom_port = free_port(socket.SOCK_STREAM)
    config = tmp / "detnet.yaml"
    config.write_text(yaml.safe_dump(_control_config(udp_port, tcp_port)), encoding="utf-8")
    prom_config = tmp / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(p) for p in RULE_FILES],
                "scrape_configs": [
                    {
                        "job_name": "detnet-controller",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{metrics_port}"],
                                "labels": shipped_target_labels("detnet-controller"),
                            }
                        ],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    detnet = _detnet()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    prometheus_url = f"http://127.0.0.1:{prom_port}"
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                started("reflect-udp", [detnet, "reflect", "--udp", f"127.0.0.1:{udp_port}"], tmp)
            ),
            stack.enter_context(
                started("reflect-tcp", [detnet, "reflect", "--tcp", f"127.0.0.1:{tcp_port}"], tmp)
            ),
        ]

        def tcp_listening() -> bool | None:
            with socket.create_connection(("127.0.0.1", tcp_port), timeout=2):
                return True

        # The controller refuses to start against a TCP endpoint that is not up yet.
        wait_for("the TCP endpoint to listen", tcp_listening, procs)
        procs.append(
            stack.enter_context(
                started(
                    "control",
                    [
                        detnet,
                        "control",
                        "--dry-run",
                        "--config",
                        str(config),
                        "--metrics",
                        f"127.0.0.1:{metrics_port}",
                    ],
                    tmp,
                )
            )
        )

        def scrape_with_both_apps() -> str | None:
            text = _get(metrics_url)
            ok = all("detnet_probe_rtt_seconds_bucket{" in text and f'"{a}"' in text for a in APPS)
            return text if ok and "detnet_leader" in text else None

        wait_for("the controller's /metrics to show both apps", scrape_with_both_apps, procs)
        procs.append(
            stack.enter_context(
                started(
                    "prometheus",
                    [
                        "prometheus",
                        f"--config.file={prom_config}",
                        f"--storage.tsdb.path={tmp / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=warn",
                    ],
                    tmp,
                )
            )
        )
        wait_for("Prometheus to be ready", lambda: _get(f"{prometheus_url}/-/ready") or None, procs)
        # Wait until some traffic has gone through, then take the reference scrape.
        scrape = wait_for("probes to be received", lambda: _received(metrics_url), procs)
        yield Live(metrics_url, prometheus_url, scrape, procs)


def _received(metrics_url: str) -> str | None:
    text = _get(metrics_url)
    got = {
        s.labels.get("target"): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "detnet_probes_received_total"
    }
    return text if all(got.get(a, 0) > 0 for a in APPS) else None


def exposed_names(scrape: str) -> tuple[set[str], set[str]]:
    """(names with samples, names declared by a # TYPE line) in an exposition."""
    sampled = {s.name for fam in text_string_to_metric_families(scrape) for s in fam.samples}
    declared: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", scrape, flags=re.M):
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        declared |= {name + suffix for suffix in suffixes}
    return sampled, declared


def test_metric_names_exist_in_the_live_scrape(live: Live) -> None:
    """Dashboard names must have samples (the panels need data), but usage, which this
    setup cannot produce (NO_USAGE_LIVE) and the controller declares; rules may also use
    a family the controller declares but has no series of yet (API errors by code exist
    only once an error happened)."""
    sampled, declared = exposed_names(live.scrape)
    assert USAGE in declared
    assert USAGE not in sampled, "usage has samples: drop the NO_USAGE_LIVE exemptions"
    for source, exposed in (
        (dashboard_queries(), sampled | {USAGE}),
        (rule_exprs(), sampled | declared),
    ):
        for where, expr in source:
            names = series_names(expr)
            assert names, f"{where}: no metric in {expr!r}"
            for name in names - PROMETHEUS_SERIES:
                assert name in exposed, f"{where}: {name} is not in the controller's /metrics"


def test_target_labels_never_hide_the_series_own(live: Live) -> None:
    """The labels the shipped configs attach to a scraped pod (plain and operator) are
    none of those detnet's series carry, so Prometheus renames none to exported_* and a
    workload-wide limit (node="") is not given the controller's node. ``pod`` is the one
    overlap, on purpose: it names the scraped replica in both setups (the operator always
    attaches it); a per-endpoint probe series' own pod arrives as exported_pod, and its
    ``target`` (APP/POD) carries it too."""
    own = {k for fam in text_string_to_metric_families(live.scrape) for s in fam.samples
           for k in s.labels} | ENDPOINT_LABELS  # fmt: skip
    attached = set(shipped_target_labels("detnet-controller"))
    attached |= set(shipped_target_labels("detnet-probes")) | operator_target_labels()
    assert own & attached == {"pod"}
    series = wait_for(
        "Prometheus to store the controller's limits",
        lambda: live.query('detnet_egress_limit_bytes_per_second{job="detnet-controller"}') or None,
        live.procs,
    )
    for s in live.query('{job="detnet-controller"}'):
        assert not [k for k in s["metric"] if k.startswith("exported_")], s["metric"]
    # Cluster scope in this setup: every limit is workload-wide.
    assert {s["metric"]["workload"] for s in series} == set(WORKLOADS)
    assert all("node" not in s["metric"] for s in series), series


def test_controller_serves_health_endpoints(live: Live) -> None:
    base = live.metrics_url.removesuffix("/metrics")
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            assert resp.status == 200, path


def test_prometheus_answers_every_dashboard_query(live: Live) -> None:
    target = wait_for(
        "Prometheus to scrape the controller",
        lambda: next(
            (
                t
                for t in json.loads(_get(f"{live.prometheus_url}/api/v1/targets"))["data"][
                    "activeTargets"
                ]
                if t["health"] == "up"
            ),
            None,
        ),
        live.procs,
    )
    assert target["labels"]["job"] == "detnet-controller"
    # The queries exempt from data here are exactly the usage-derived ones.
    exempt = {(title, ref) for title, ref, expr in dashboard_targets() if USAGE in expr}
    assert exempt == set(NO_DATA_LIVE)
    for title, ref, expr in dashboard_targets():
        promql = for_prometheus(expr)
        if (title, ref) in NO_DATA_LIVE:
            assert live.query(promql) == [], f"{title} {ref}: {NO_DATA_LIVE[title, ref]}"
            continue

        def answered(e: str = promql) -> list[dict[str, Any]] | None:
            return live.query(e) or None

        result = wait_for(f"data for {title!r}: {promql}", answered, live.procs)
        values = [float(r["value"][1]) for r in result]
        assert values, title
        if "target=" in promql or "target=~" in promql:
            shown = {r["metric"].get("target") for r in result} - {None}
            if shown:
                assert shown <= set(APPS), f"{title}: {shown}"


def test_prometheus_evaluates_every_alert_rule(live: Live) -> None:
    """Prometheus loaded the rules (alerts and compat recordings) and evaluated each one
    without an error; with both reflectors answering and a controller up, the outage
    alerts stay quiet."""

    def evaluated() -> list[dict[str, Any]] | None:
        body = json.loads(_get(f"{live.prometheus_url}/api/v1/rules"))
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else None

    rules = wait_for("every rule to be evaluated", evaluated, live.procs)
    assert sorted(r["name"] for r in rules) == sorted(name for name, _ in rule_exprs())
    for r in rules:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
    firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"}
    assert not firing & {"DetnetControllerDown", "DetnetProbeTargetUnreachable"}, firing


def test_prometheus_records_the_prototype_series(live: Live) -> None:
    """Every compat series detnet produces in this setup comes back from Prometheus with
    the prototype's labels (less those detnet cannot know), one per app or workload, in
    the prototype's units (ms, Mbit/s: within a factor of detnet's own series in seconds
    and bytes/s at the same instant). Those it cannot produce here are exactly the
    usage-derived ones, and come back empty, for the reason NOT_PRODUCED_LIVE names."""
    sampled, _ = exposed_names(live.scrape)
    assert USAGE not in sampled  # the reason below holds: no agents, no usage
    per_app = {"service": set(APPS), "deployment": set(WORKLOADS)}
    median = 'max(detnet_probe_rtt_window_seconds{quantile="0.5", protocol="%s"})'
    tightest = "min(detnet_egress_limit_bytes_per_second)"
    reference = {  # the detnet series each is in, and the factor to the prototype's unit
        "flowmanager_udp_latency_ms": (median % "udp", 1000),
        "flowmanager_tcp_latency_ms": (median % "tcp", 1000),
        "flowmanager_bandwidth_limit_mbps": (tightest, 8e-6),
        "kubernetes_deployment_bandwidth_limit_mbps": (tightest, 8e-6),
    }
    for rule in rules_of(COMPAT_RULES):
        name = rule["record"]
        if name in NOT_PRODUCED_LIVE:
            assert live.query(name) == [], f"{name}: {NOT_PRODUCED_LIVE[name]}"
            continue
        wanted = (PROTOTYPE_SERIES[name] - set(NOT_CARRIED)) | set(rule.get("labels", {}))

        def recorded(n: str = name) -> list[dict[str, Any]] | None:
            return live.query(n) or None

        result = wait_for(f"Prometheus to record {name}", recorded, live.procs)
        for s in result:
            labels = dict(s["metric"])
            assert labels.pop("__name__") == name
            assert set(labels) == wanted, f"{name}: {labels}"
            assert labels.get("job", "flow-manager") == "flow-manager", labels
            assert float(s["value"][1]) >= 0, s
        key = "service" if "service" in wanted else "deployment"
        shown = {s["metric"][key] for s in result}
        assert shown <= per_app[key], f"{name}: {shown}"
        if name in reference:
            expr, factor = reference[name]
            ours = max(float(s["value"][1]) for s in result)
            if "limit" in name:
                ours = min(float(s["value"][1]) for s in result)
            theirs = float(live.query(expr)[0]["value"][1]) * factor
            assert theirs / 2 <= ours <= theirs * 2, f"{name}: {ours} against {theirs}"
