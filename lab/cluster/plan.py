"""The cluster lab's plan: which nodes, which workloads and pods on which node, and every
address, port and name. Pure data and functions, so the address plan is tested without
root (tests/unit/test_cluster_plan.py) and docs/lab.md can state it once.

Address plan (all inside 198.18.0.0/15, RFC 2544 benchmarking space, and only inside
the lab's namespaces):

- node N (node-a = 1, node-b = 2, node-c = 3): pods in ``198.18.N.0/24``, the node's
  pod bridge ``br0`` at ``198.18.N.1`` (the pods' gateway), pods from ``198.18.N.10``
  in the order of ``WORKLOADS``;
- the fabric ``198.19.0.0/24``: the sink ``198.19.0.2``, the control plane (the API
  server emulation) ``198.19.0.3``, node N's uplink ``198.19.0.(10 + N)`` (its
  InternalIP);
- Service cluster IPs (never routed: the lab has no kube-proxy) ``198.19.240.0/20``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from detnet.lab.errors import LabError

NODES = ("node-a", "node-b", "node-c")
CONGESTED_NODE = "node-a"  # where telemetry-upload bursts beyond the uplink
FABRIC_CIDR = "198.19.0.0/24"
FABRIC_PREFIX = 24
SINK_ADDRESS = "198.19.0.2"
API_ADDRESS = "198.19.0.3"
SERVICE_CIDR = "198.19.240.0/20"
API_PORT = 6443
SINK_PORT = 5301
UDP_PROBE_PORT = 5201  # robot-control's reflector container (deploy/critical-apps)
TCP_PROBE_PORT = 5202  # safety-scanner's probe-endpoint container
AGENT_PORT = 9109  # deploy/agent: usage
AGENT_METRICS_PORT = 9110
CONTROLLER_METRICS_PORT = 9090  # deploy/base: --metrics 0.0.0.0:9090
POD_DEVICE = "eth0"
POD_BRIDGE = "br0"
UPLINK_DEVICE = "up0"
FIRST_POD_HOST = 10
MAX_PODS_PER_NODE = 240

CONTROLLER_NAMESPACE = "detnet-system"
CONTROLLER_ACCOUNT = "detnet-controller"
AGENT_NAMESPACE = "detnet-agent"
AGENT_ACCOUNT = "detnet-agent"
AGENT_AUDIENCE = "detnet-agent"


@dataclass(frozen=True)
class NodePlan:
    """One node: its name and number (1, 2, 3: the third octet of its pods)."""

    name: str
    number: int

    @property
    def pod_cidr(self) -> str:
        """The node's pod network."""
        return f"198.18.{self.number}.0/24"

    @property
    def gateway(self) -> str:
        """The node's address on its pod bridge: the pods' default route."""
        return f"198.18.{self.number}.1"

    @property
    def uplink_address(self) -> str:
        """The node's address on the fabric (its InternalIP)."""
        return f"198.19.0.{10 + self.number}"


@dataclass(frozen=True)
class WorkloadPlan:
    """A workload as deploy/ describes it: its kind, namespace, labels, the nodes its
    replicas run on (one each) and what its pods run (``role``)."""

    namespace: str
    name: str
    kind: str  # Deployment or DaemonSet
    nodes: tuple[str, ...]
    role: str  # reflect-udp, reflect-tcp, best-effort, agent, controller
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def selector(self) -> dict[str, str]:
        """The workload's pod labels (``app=<name>`` unless given)."""
        return dict(self.labels) if self.labels else {"app": self.name}


@dataclass(frozen=True)
class PodPlan:
    """One pod of the plan: its workload, node and address."""

    workload: WorkloadPlan
    node: str
    address: str

    @property
    def key(self) -> str:
        """``<workload>@<node>``: unique in the plan (one replica per node)."""
        return f"{self.workload.name}@{self.node}"


_NAME, _COMPONENT = "app.kubernetes.io/name", "app.kubernetes.io/component"
_AGENT_LABELS = ((_NAME, "detnet-agent"), (_COMPONENT, "agent"))
_CONTROLLER_LABELS = ((_NAME, "detnet"), (_COMPONENT, "controller"))
_A, _B, _C = NODES

WORKLOADS: tuple[WorkloadPlan, ...] = (
    WorkloadPlan("critical-apps", "robot-control", "Deployment", (_A, _B), "reflect-udp"),
    WorkloadPlan("critical-apps", "safety-scanner", "Deployment", (_A,), "reflect-tcp"),
    WorkloadPlan("best-effort", "telemetry-upload", "Deployment", (_A, _B), "best-effort"),
    WorkloadPlan("best-effort", "erp-dashboard", "Deployment", (_B,), "best-effort"),
    WorkloadPlan(AGENT_NAMESPACE, "detnet-agent", "DaemonSet", NODES, "agent", _AGENT_LABELS),
    WorkloadPlan(
        CONTROLLER_NAMESPACE, "detnet-controller", "Deployment", (_C,), "controller",
        _CONTROLLER_LABELS,
    ),
)  # fmt: skip
CRITICAL_APPS = ("robot-control", "safety-scanner")
BEST_EFFORT = ("telemetry-upload", "erp-dashboard")


def node_plans(names: Sequence[str] = NODES) -> tuple[NodePlan, ...]:
    """The nodes, numbered from 1 in order."""
    if not names or len(set(names)) != len(names) or len(names) > 200:
        raise LabError("the lab needs 1..200 distinct node names")
    return tuple(NodePlan(name, i + 1) for i, name in enumerate(names))


def pod_plans(
    workloads: Sequence[WorkloadPlan] = WORKLOADS, nodes: Sequence[str] = NODES
) -> tuple[PodPlan, ...]:
    """Every pod, in workload order; addresses per node from ``.10`` in that order."""
    by_name = {n.name: n for n in node_plans(nodes)}
    next_host = dict.fromkeys(by_name, FIRST_POD_HOST)
    out = []
    for wl in workloads:
        for node in wl.nodes:
            if node not in by_name:
                raise LabError(f"{wl.name}: no node {node!r} in the plan")
            host = next_host[node]
            if host >= FIRST_POD_HOST + MAX_PODS_PER_NODE:
                raise LabError(f"more than {MAX_PODS_PER_NODE} pods on {node}")
            next_host[node] = host + 1
            out.append(PodPlan(wl, node, f"198.18.{by_name[node].number}.{host}"))
    keys = [p.key for p in out]
    if len(set(keys)) != len(keys):
        raise LabError("a workload has two replicas on one node: the plan allows one")
    return tuple(out)


def node_of_address(address: str, nodes: Sequence[NodePlan]) -> str | None:
    """The node whose pod network holds ``address``, None for any other address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    for node in nodes:
        if ip in ipaddress.ip_network(node.pod_cidr):
            return node.name
    return None


def in_test_space(address: str) -> bool:
    """True when ``address`` is in 198.18.0.0/15, the only space the lab may use."""
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network("198.18.0.0/15")
    except ValueError:
        return False
