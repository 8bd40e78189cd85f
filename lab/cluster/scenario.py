"""The cluster lab's runs: build the cluster, start its processes as deploy/ starts them,
then the runs ``without_controller``, ``cluster_scope`` and ``node_scope`` on one
timeline (quiet, congestion on node-a only, recovery), and the report.

Started once, for every run (each process in its pod's namespace and container cgroup,
its first process a ``sleep`` playing the pod's pause container):

- per node, the Cilium stand-in (``cilium.py``) in the node's namespace, its change
  log in the lab's directory;
- robot-control's replicas (``detnet reflect --udp 0.0.0.0:5201``) and safety-scanner
  (``detnet reflect --tcp 0.0.0.0:5202``): deploy/critical-apps' probe containers;
- a ``detnet agent`` per node with the DaemonSet's arguments and ``NODE_NAME``, given a
  kubeconfig instead of the in-cluster config (the emulation speaks plain HTTP);
- the sink behind the fabric, counting bytes per pod.

Per run: the cluster is reset (no egress annotation, no recorded limit, no Lease: the
stand-ins remove every limit), the controller's ConfigMap and file are written, and
``detnet control --config FILE --enforcer kubernetes --metrics 0.0.0.0:9090
--log-format json --stream FILE`` starts in the controller's pod on node-c with the
Deployment's environment (POD_NAME, POD_NAMESPACE) and its projected agent token
mounted where the Deployment mounts it (a private mount namespace, as the kubelet's
volume); ``without_controller`` runs the same with ``--dry-run``, which measures and
decides but enforces nothing. Once every probed endpoint answers: quiet, then the
senders (telemetry-upload on node-a: bursts beyond the uplink; on node-b telemetry-upload
and erp-dashboard: paced flows well below it), then recovery. With a step, halfway
through the congestion a second wave of node-a's uploads joins (``load``) or node-a's
uplink drops to ``knee_step_fraction`` of its rate (``knee``).

One module past 500 lines on purpose: the lab's runs, from setting the cluster up to the
report, in the order they happen; the network, the control plane, the recording and the
report are their own modules.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from detnet.engine.targets import DEFAULT_SIZE
from detnet.lab.cluster import plan as P
from detnet.lab.cluster.cilium import EGRESS_ANNOTATION
from detnet.lab.cluster.controlplane import (
    ControlPlane,
    PodObject,
    populate,
    reset_limits,
    set_controller_config,
)
from detnet.lab.cluster.detnetconfig import (
    DETNET,
    Features,
    app_slos,
    controller_config,
    detect_features,
)
from detnet.lab.cluster.network import ClusterNetwork, Container
from detnet.lab.cluster.recording import ClusterRecorder, Forward, Tail, pump
from detnet.lab.cluster.report import (
    ClusterRunData,
    ClusterSetup,
    PodRef,
    build_cluster_report,
    summarise_cluster_run,
)
from detnet.lab.errors import LabError
from detnet.lab.kubeapi import RecordedRequest
from detnet.lab.report import Timeline
from detnet.lab.scenario import check_step, step_time

RUNS = ("without_controller", "cluster_scope", "node_scope")
SCOPES = {"without_controller": "cluster", "cluster_scope": "cluster", "node_scope": "node"}
LEASE = "detnet-controller"
_TRAFFIC = [sys.executable, "-m", "detnet.lab.traffic"]
_STAND_IN = [sys.executable, "-m", "detnet.lab.cluster.cilium"]
_PAUSE = ["sleep", "infinity"]
_HEADERS = 8 + 20 + 14  # UDP + IPv4 + Ethernet
_TOKEN_DIR = "/var/run/secrets/detnet/agent"  # deploy/base/deployment.yaml's mount
# The projected volume, as the kubelet mounts it: a private mount namespace with a tmpfs
# over /run (so nothing is created on the host) and the token directory bound into it.
_MOUNT_TOKEN = (
    'set -e; d=$(readlink -f /var/run); mount -t tmpfs -o size=1m,mode=0755 detnet-lab "$d"; '
    'mkdir -p "$d/secrets/detnet/agent"; mount --bind "$0" "$d/secrets/detnet/agent"; '
    'exec "$@"'
)


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """What a cluster lab run can be told."""

    quiet_s: float = 5.0
    congestion_s: float = 30.0
    recovery_s: float = 5.0
    uplink_mbps: float = 100.0
    buffer_ms: float = 30.0
    bursty_flows: int = 4  # telemetry-upload on node-a, every upload_period_s
    upload_bytes: int = 2_500_000
    upload_period_s: float = 1.0
    steady_mbps: float = 30.0  # each best-effort pod off the congested node, paced
    steady_flows: int = 2
    runs: tuple[str, ...] = RUNS
    # The one-node lab's harder timelines, on the congested node: halfway through the
    # congestion a second wave of telemetry uploads joins ("load"), or node-a's uplink
    # drops to knee_step_fraction of its rate ("knee").
    step: str = "none"
    knee_step_fraction: float = 0.6

    def __post_init__(self) -> None:
        for name in ("quiet_s", "congestion_s", "recovery_s", "uplink_mbps", "buffer_ms"):
            if not getattr(self, name) > 0:
                raise LabError(f"{name.replace('_', ' ')} must be positive")
        if self.congestion_s < 2.0:
            raise LabError("the congestion phase needs at least 2 s to measure anything")
        if self.bursty_flows < 1 or self.steady_flows < 1 or self.upload_bytes < 1:
            raise LabError("flows and upload size must be at least 1")
        if not 0 < self.steady_mbps < self.uplink_mbps:
            raise LabError("the steady senders must send below the uplink rate")
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not self.runs:
            raise LabError(f"runs must be among {', '.join(RUNS)}")
        check_step(self.step, self.knee_step_fraction, of="uplink")
        if self.step == "knee" and not self.steady_mbps < self.stepped_mbps:
            raise LabError("the steady senders must send below the uplink rate after the knee step")

    @property
    def step_at_s(self) -> float | None:
        """When the step happens (run time), or None without one."""
        return step_time(self.step, self.timeline)

    @property
    def stepped_mbps(self) -> float:
        """The congested node's uplink rate after a knee step."""
        return self.uplink_mbps * self.knee_step_fraction

    @property
    def timeline(self) -> Timeline:
        """The phase durations."""
        return Timeline(
            quiet_s=self.quiet_s, congestion_s=self.congestion_s, recovery_s=self.recovery_s
        )


# ------------------------------------------------------------------------ the lab

View = Callable[[str, float, str, ClusterRecorder], None]


class ClusterLab:
    """The built cluster and its long-lived processes (module docstring)."""

    def __init__(
        self,
        settings: ClusterSettings,
        net: ClusterNetwork,
        cp: ControlPlane,
        *,
        features: Features,
        log: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.net = net
        self.cp = cp
        self.features = features
        self.log = log
        self.tmp = net.tmp
        self.nodes = net.nodes
        self.pods: dict[str, PodObject] = {}
        self.apps: dict[str, Container] = {}  # each pod's app container
        self.stand_in_logs = {n.name: Tail(self.tmp / f"cilium-{n.name}.jsonl") for n in self.nodes}
        self.forward = Forward()

    # ------------------------------------------------------------ setting up

    def pod(self, workload: str, node: str) -> PodObject:
        """The pod of ``workload`` on ``node``."""
        return self.pods[f"{workload}@{node}"]

    def pinned(self) -> dict[str, str]:
        """Each critical app's replica on the congested node (probed without endpoints)."""
        plans = {p.key: p for p in self.net.pods}
        return {a: plans[f"{a}@{P.CONGESTED_NODE}"].address for a in P.CRITICAL_APPS}

    def config(self, run: str) -> dict[str, Any]:
        """The controller's config for ``run``."""
        return controller_config(features=self.features, scope=SCOPES[run], pinned=self.pinned())

    def _kubeconfig(self, name: str, token: str) -> Path:
        path = self.tmp / f"kubeconfig-{name}"
        path.write_text(self.cp.api.kubeconfig(user=name, token=token))
        return path

    def setup(self) -> None:
        """Populate the control plane and start every long-lived process."""
        api = self.cp.api
        text = yaml.safe_dump(self.config("cluster_scope"), sort_keys=False)
        self.pods = self.cp.call(
            populate, api, nodes=self.nodes, pods=self.net.pods, controller_config=text
        )
        for key, pod in self.pods.items():
            ns = self.net.pod_ns(pod.plan)
            self.net.spawn(ns, _PAUSE, container=self.net.container(pod.plan, uid=pod.uid))
            self.apps[key] = self.net.container(pod.plan, uid=pod.uid)
        for node in self.nodes:
            self._start_stand_in(node.name)
        for key, pod in self.pods.items():
            role, ns = pod.plan.workload.role, self.net.pod_ns(pod.plan)
            if role in ("reflect-udp", "reflect-tcp"):
                flag, port = (
                    ("--udp", P.UDP_PROBE_PORT)
                    if role == "reflect-udp"
                    else ("--tcp", P.TCP_PROBE_PORT)
                )
                with (self.tmp / f"reflect-{key}.err").open("wb") as err:
                    self.net.spawn(ns, [*DETNET, "reflect", flag, f"0.0.0.0:{port}"],
                                   container=self.apps[key], stderr=err)  # fmt: skip
            elif role == "agent":
                self._start_agent(pod)
        sink = self.net.spawn(
            self.net.sink, [*_TRAFFIC, "sink", "--listen", f"0.0.0.0:{P.SINK_PORT}"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        pump(sink.stdout, self.forward)
        for pod in self.pods.values():
            role, ns = pod.plan.workload.role, self.net.pod_ns(pod.plan)
            if role == "reflect-udp":
                self._wait_port(ns, P.UDP_PROBE_PORT, "udp")
            elif role == "reflect-tcp":
                self._wait_port(ns, P.TCP_PROBE_PORT, "tcp")
            elif role == "agent":
                self._wait_port(ns, P.AGENT_PORT, "tcp")
        self._wait_port(self.net.sink, P.SINK_PORT, "tcp")
        for node in self.nodes:
            self._wait_stand_in_ready(node.name)
        self._controller_tokens()

    def _controller_tokens(self) -> None:
        """The controller's API token (its kubeconfig) and its projected token for the
        agents (audience detnet-agent), bound to its pod as the kubelet's would be."""
        api, ctl = self.cp.api, self.pod("detnet-controller", "node-c")
        token = self.cp.call(
            api.issue_token, P.CONTROLLER_NAMESPACE, P.CONTROLLER_ACCOUNT, pod=ctl.name
        )
        self._kubeconfig("controller", token)
        agent_token = self.cp.call(
            api.issue_token, P.CONTROLLER_NAMESPACE, P.CONTROLLER_ACCOUNT,
            audiences=[P.AGENT_AUDIENCE], pod=ctl.name,
        )  # fmt: skip
        token_dir = self.tmp / "agent-token"
        token_dir.mkdir(mode=0o755, exist_ok=True)
        (token_dir / "token").write_text(agent_token)

    def _start_stand_in(self, node: str) -> None:
        token = f"cilium-{node}-{os.urandom(8).hex()}"
        self.cp.call(
            self.cp.api.add_token, token, username="system:serviceaccount:kube-system:cilium"
        )
        endpoints = {
            f"{p.namespace}/{p.name}": {"netns": self.net.pod_ns(p.plan), "device": P.POD_DEVICE}
            for p in self.pods.values()
            if p.plan.node == node
        }
        ep_file = self.tmp / f"endpoints-{node}.json"
        ep_file.write_text(json.dumps(endpoints, indent=1))
        kubeconfig = self._kubeconfig(f"cilium-{node}", token)
        log = self.stand_in_logs[node].path
        argv = [*_STAND_IN, "--node", node, "--kubeconfig", str(kubeconfig),
                "--endpoints", str(ep_file), "--log", str(log)]  # fmt: skip
        with (self.tmp / f"cilium-{node}.err").open("wb") as err:
            self.net.spawn(self.net.node_ns(node), argv, stderr=err)

    def _start_agent(self, pod: PodObject) -> None:
        api = self.cp.api
        token = self.cp.call(api.issue_token, P.AGENT_NAMESPACE, P.AGENT_ACCOUNT, pod=pod.name)
        kubeconfig = self._kubeconfig(f"agent-{pod.plan.node}", token)
        # deploy/agent/daemonset.yaml's arguments and environment, plus the kubeconfig.
        argv = [
            *DETNET, "agent", "--listen", f"0.0.0.0:{P.AGENT_PORT}",
            "--metrics", f"0.0.0.0:{P.AGENT_METRICS_PORT}", "--interval", "100ms",
            "--allow", f"{P.CONTROLLER_NAMESPACE}:{P.CONTROLLER_ACCOUNT}",
            "--kubeconfig", str(kubeconfig),
        ]  # fmt: skip
        with (self.tmp / f"agent-{pod.plan.node}.err").open("wb") as err:
            self.net.spawn(
                self.net.pod_ns(pod.plan),
                argv,
                container=self.apps[pod.plan.key],
                env={"NODE_NAME": pod.plan.node, "PYTHONUNBUFFERED": "1"},
                stderr=err,
            )

    def _check_processes(self) -> None:
        failed = self.net.failed()
        if failed:
            proc = failed[0]
            args = proc.args if isinstance(proc.args, list) else [proc.args]
            raise LabError(
                f"a lab process exited with status {proc.returncode}: "
                f"{' '.join(str(a) for a in args[-8:])}{self._error_tail()}"
            )

    def _error_tail(self) -> str:
        for err in sorted(self.tmp.glob("*.err")):
            text = err.read_text(errors="replace").strip()
            if "error" in text.lower() or "Traceback" in text:
                return f" ({err.name}: {text.splitlines()[-1][:300]})"
        return ""

    def _wait_port(self, netns: str, port: int, proto: str, timeout_s: float = 20.0) -> None:
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["ip", "netns", "exec", netns, "ss", flag, f"sport = :{port}"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.stdout.strip():
                return
            self._check_processes()
            time.sleep(0.05)
        raise LabError(f"nothing listens on {proto} port {port} in {netns} after {timeout_s:g} s")

    def _wait_stand_in_ready(self, node: str, timeout_s: float = 20.0) -> None:
        tail = Tail(self.stand_in_logs[node].path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(r.get("event") == "ready" for r in tail.records()):
                return
            self._check_processes()
            time.sleep(0.05)
        raise LabError(f"the Cilium stand-in of {node} did not list its pods in {timeout_s:g} s")

    # ------------------------------------------------------------------- runs

    def _has_tbf(self, pod: PodObject) -> bool:
        out = subprocess.run(
            ["tc", "-n", self.net.pod_ns(pod.plan), "qdisc", "show", "dev", P.POD_DEVICE],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return " tbf " in f" {out.stdout} "

    def _reset(self) -> None:
        self.cp.call(reset_limits, self.cp.api, self.pods, lease=LEASE)
        deadline = time.monotonic() + 15.0
        be = [p for p in self.pods.values() if p.plan.workload.role == "best-effort"]
        while any(self._has_tbf(p) for p in be):
            if time.monotonic() > deadline:
                raise LabError("the Cilium stand-ins did not remove the last run's limits")
            time.sleep(0.1)

    def endpoint_of(self, rec: Mapping[str, Any]) -> str | None:
        """The endpoint (``APP@NODE``) a probe record is of; None when not one of ours."""
        target = str(rec.get("target", ""))
        apps = sorted((a for a in P.CRITICAL_APPS if target.startswith(a)), key=len)
        if not apps:
            return None
        app = str(rec.get("app") or apps[-1])
        if target == app and not self.features.endpoints:
            return f"{app}@{P.CONGESTED_NODE}"  # the pinned replica
        node = rec.get("node")
        if isinstance(node, str) and node:
            return f"{app}@{node}"
        for pod in self.pods.values():
            if pod.plan.workload.name == app and (
                pod.name in target or pod.plan.address in target or pod.plan.node in target
            ):
                return pod.plan.key
        return None

    def expected_endpoints(self) -> list[str]:
        """The endpoints the controller probes with this detnet."""
        if self.features.endpoints:
            return [
                p.plan.key for p in self.pods.values() if p.plan.workload.name in P.CRITICAL_APPS
            ]
        return [f"{a}@{P.CONGESTED_NODE}" for a in P.CRITICAL_APPS]

    def setup_for_report(self) -> ClusterSetup:
        """The report's view of the cluster."""
        endpoints, knee = self.expected_endpoints(), self.settings.step == "knee"
        per_probe = (DEFAULT_SIZE + _HEADERS) * 8 / 0.01 / 1e6  # replies at the default 10 ms
        return ClusterSetup(
            slos=app_slos(),
            endpoints=[
                p.plan.key for p in self.pods.values() if p.plan.workload.name in P.CRITICAL_APPS
            ],
            pods=[
                PodRef(name=p.name, workload=p.plan.workload.name, node=p.plan.node)
                for p in self.pods.values() if p.plan.workload.role == "best-effort"
            ],
            nodes=[n.name for n in self.nodes if any(
                p.plan.node == n.name and p.plan.workload.role == "best-effort"
                for p in self.pods.values())],
            congested=[P.CONGESTED_NODE],
            uplink_mbps=self.settings.uplink_mbps,
            step_at_s=self.settings.step_at_s,
            stepped_uplink_mbps=self.settings.stepped_mbps if knee else None,
            critical_mbps={
                n.name: per_probe * sum(1 for e in endpoints if e.endswith(f"@{n.name}"))
                for n in self.nodes
            },
        )  # fmt: skip

    def usage_source(self, run: str) -> str:
        """``agent`` when the controller asks agents that can find pods, else ``none``."""
        if run == "without_controller" or not self.features.usage:
            return "none"
        return "none" if self.net.cgroups_missing else "agent"

    def _controller_argv(self, run: str, cfg_path: Path, stream: Path) -> list[str]:
        argv = [*DETNET, "control", "--config", str(cfg_path)]
        if run == "without_controller":
            argv.append("--dry-run")
        else:
            argv += ["--enforcer", "kubernetes"]
        argv += ["--metrics", f"0.0.0.0:{P.CONTROLLER_METRICS_PORT}",
                 "--log-format", "json", "--stream", str(stream)]  # fmt: skip
        token_dir = self.tmp / "agent-token"
        return ["unshare", "--mount", "--propagation", "private",
                "sh", "-c", _MOUNT_TOKEN, str(token_dir), *argv]  # fmt: skip

    def _senders(self, at: float, *, congested_only: bool = False) -> list[subprocess.Popen[bytes]]:
        """The best-effort senders, launched ahead and told to start at unix time ``at``;
        ``congested_only``: only those on the congested node (a load step's second wave)."""
        s, procs = self.settings, []
        sink = f"{P.SINK_ADDRESS}:{P.SINK_PORT}"
        for key, pod in self.pods.items():
            if pod.plan.workload.role != "best-effort":
                continue
            if congested_only and pod.plan.node != P.CONGESTED_NODE:
                continue
            if pod.plan.node == P.CONGESTED_NODE:
                mode = [
                    "--mode",
                    "bursty",
                    "--flows",
                    str(s.bursty_flows),
                    "--upload-bytes",
                    str(s.upload_bytes),
                    "--period",
                    str(s.upload_period_s),
                ]
            else:
                mode = ["--mode", "steady", "--flows", str(s.steady_flows),
                        "--rate", f"{s.steady_mbps / s.steady_flows:g}"]  # fmt: skip
            procs.append(
                self.net.spawn(
                    self.net.pod_ns(pod.plan),
                    [*_TRAFFIC, "send", "--to", sink, *mode, "--start-at", f"{at:.6f}"],
                    container=self.apps[key],
                )
            )
        return procs

    def _patches(self, controller_pod: str, t0: float) -> list[dict[str, Any]]:
        agent = f"detnet/{controller_pod}"
        out = []
        requests: list[RecordedRequest] = self.cp.call(list, self.cp.api.requests)
        for r in requests:
            parts = r.path.strip("/").split("/")
            if (
                r.verb == "patch" and r.user_agent == agent and len(parts) == 6
                and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods"
            ):  # fmt: skip
                body = r.body if isinstance(r.body, dict) else {}
                annotations = (body.get("metadata") or {}).get("annotations") or {}
                out.append(
                    {
                        "namespace": parts[3],
                        "pod": parts[5],
                        "t_s": round(r.at - t0, 3),
                        "value": annotations.get(EGRESS_ANNOTATION),
                    }
                )
        return out

    def run(self, name: str, *, view: View | None) -> tuple[dict[str, Any], ClusterRunData | None]:
        """One run; its summary and data (None when skipped)."""
        if name == "node_scope" and not self.features.scope:
            return {"skipped": "this detnet has no control.scope: node (issue 13)"}, None
        self._reset()
        cfg = self.config(name)
        text = yaml.safe_dump(cfg, sort_keys=False)
        cfg_path = self.tmp / f"{name}.yaml"
        cfg_path.write_text(text)
        self.cp.call(set_controller_config, self.cp.api, text)
        self.cp.call(self.cp.api.requests.clear)
        stream = self.tmp / f"{name}.jsonl"
        rec = ClusterRecorder(
            stream=stream,
            endpoint_of=self.endpoint_of,
            node_of_ip={p.plan.address: p.plan.node for p in self.pods.values()},
        )
        ctl = self.pod("detnet-controller", "node-c")
        for tail in self.stand_in_logs.values():
            tail.records()  # skip what earlier runs logged
        with (self.tmp / f"controller-{name}.err").open("wb") as err:
            proc = self.net.spawn(
                self.net.pod_ns(ctl.plan),
                self._controller_argv(name, cfg_path, stream),
                container=self.apps[ctl.plan.key],
                env={"KUBECONFIG": str(self.tmp / "kubeconfig-controller"), "POD_NAME": ctl.name,
                     "POD_NAMESPACE": P.CONTROLLER_NAMESPACE, "PYTHONUNBUFFERED": "1"},
                stdout=subprocess.PIPE,
                stderr=err,
            )  # fmt: skip
        pump(proc.stdout, rec.control_line)
        senders: list[subprocess.Popen[bytes]] = []
        try:
            self._wait_warm(rec, proc, name)
            rec.t0 = time.time() + 1.0  # a second more: the windows start on quiet samples
            rec.probes.clear()
            tl = self.settings.timeline
            c_start, c_end = tl.bounds("congestion")
            launched = stopped = False
            step_at = self.settings.step_at_s
            stepped = step_at is None
            # senders launch ahead and are told the start time; a rate changes on the spot
            step_due = (step_at or 0.0) - (1.5 if self.settings.step == "load" else 0.0)
            self.forward.rec = rec
            while (now := time.time() - rec.t0) < tl.total_s:
                if not launched and now >= c_start - 1.5:
                    senders = self._senders(rec.t0 + c_start)
                    launched = True
                if not stepped and now >= step_due:
                    if self.settings.step == "load":
                        at = rec.t0 + (step_at or 0.0)
                        senders += self._senders(at, congested_only=True)
                    else:
                        self.net.set_uplink(P.CONGESTED_NODE, self.settings.stepped_mbps)
                    stepped = True
                if launched and not stopped and now >= c_end:
                    for s in senders:
                        self.net.stop(s, timeout_s=2.0)
                    stopped = True
                if proc.poll() is not None:
                    raise LabError(
                        f"`detnet control` exited with status {proc.returncode} during the "
                        f"{name.replace('_', ' ')} run{self._error_tail()}"
                    )
                self._check_processes()
                rec.read_stream()
                self._take_bandwidth(rec)
                if view is not None:
                    phase = (
                        "quiet" if now < c_start else "congestion" if now < c_end else "recovery"
                    )
                    view(name, now, phase, rec)
                time.sleep(0.25)
        finally:
            self.forward.rec = None
            for s in senders:
                self.net.stop(s, timeout_s=2.0)
            self.net.stop(proc, timeout_s=20.0)
            if self.settings.step == "knee":  # the next run starts at full rate
                self.net.set_uplink(P.CONGESTED_NODE, self.settings.uplink_mbps)
        rec.read_stream()
        self._take_bandwidth(rec)
        data = rec.run_data(self._patches(ctl.name, rec.t0))
        summary = summarise_cluster_run(
            data,
            setup=self.setup_for_report(),
            timeline=self.settings.timeline,
            enforcer="dry-run" if name == "without_controller" else "kubernetes",
            usage_source=self.usage_source(name),
        )
        if rec.unknown_targets:
            summary["unattributed_targets"] = sorted(rec.unknown_targets)
        return summary, data

    def _take_bandwidth(self, rec: ClusterRecorder) -> None:
        for tail in self.stand_in_logs.values():
            for r in tail.records():
                if r.get("event") == "bandwidth":
                    at = r.get("applied")
                    if isinstance(at, int | float):
                        r["t_s"] = round(at - rec.t0, 3)
                    rec.bandwidth.append(r)

    def _wait_warm(self, rec: ClusterRecorder, proc: subprocess.Popen[bytes], name: str) -> None:
        want = set(self.expected_endpoints())
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(
                    f"`detnet control` exited with status {proc.returncode} before probing "
                    f"started in the {name.replace('_', ' ')} run{self._error_tail()}"
                )
            rec.read_stream()
            answered = {e for e, s in rec.probes.items() if any(not math.isnan(r) for _, r in s)}
            if want <= answered:
                return
            time.sleep(0.1)
        missing = ", ".join(sorted(want - answered))
        raise LabError(f"no probe replies from {missing} within 30 s")


def run_cluster_lab(
    settings: ClusterSettings,
    *,
    view: View | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the cluster, run the runs, tear everything down; the report (JSON form),
    each run's recorded data under ``"_data"`` for the plot."""
    features = detect_features()
    nodes, pods = P.node_plans(), P.pod_plans()
    with ClusterNetwork(
        nodes=nodes, pods=pods, uplink_mbps=settings.uplink_mbps, buffer_ms=settings.buffer_ms
    ) as net:
        log(
            f"lab: cluster of {len(nodes)} nodes in namespaces {net.prefix}*, uplinks "
            f"{settings.uplink_mbps:g} Mbit/s with {settings.buffer_ms:g} ms of buffer"
        )
        if net.cgroups_missing:
            log(
                f"lab: no pod cgroups ({net.cgroups_missing}): the node agents find no pod, "
                "so the controller runs without usage"
            )
        missing = [k for k, v in asdict(features).items() if not v]
        if missing:
            log(f"lab: this detnet has no {', '.join(missing)} yet: running without it")
        with ControlPlane(netns=net.control_plane, host=P.API_ADDRESS, port=P.API_PORT) as cp:
            lab = ClusterLab(settings, net, cp, features=features, log=log)
            lab.setup()
            runs: dict[str, Any] = {}
            configs: dict[str, Any] = {}
            for name in settings.runs:
                log(f"lab: run {name.replace('_', ' ')} ({settings.timeline.total_s:g} s)")
                summary, data = lab.run(name, view=view)
                if data is not None:
                    summary["_data"] = data
                    configs[name] = lab.config(name)
                runs[name] = summary
        config = {
            "lab": asdict(settings),
            "features": asdict(features),
            "cgroups": net.cgroups_missing or "ok",
            "controller": configs,
            "addresses": {
                "nodes": {n.name: {"pods": n.pod_cidr, "uplink": n.uplink_address} for n in nodes},
                "sink": P.SINK_ADDRESS,
                "api": f"{P.API_ADDRESS}:{P.API_PORT}",
            },
        }
        return build_cluster_report(config, runs)
