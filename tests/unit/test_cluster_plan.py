"""The cluster lab's address plan (lab/cluster/plan.py): every address in the test space,
each pod in its node's network, nothing shared, and the plan docs/lab.md states."""

from __future__ import annotations

import ipaddress

import pytest

from detnet.lab.cluster import plan as P
from detnet.lab.errors import LabError


def test_the_documented_plan() -> None:
    nodes = P.node_plans()
    assert [(n.name, n.pod_cidr, n.gateway, n.uplink_address) for n in nodes] == [
        ("node-a", "198.18.1.0/24", "198.18.1.1", "198.19.0.11"),
        ("node-b", "198.18.2.0/24", "198.18.2.1", "198.19.0.12"),
        ("node-c", "198.18.3.0/24", "198.18.3.1", "198.19.0.13"),
    ]
    assert {p.key: p.address for p in P.pod_plans()} == {
        "robot-control@node-a": "198.18.1.10",
        "robot-control@node-b": "198.18.2.10",
        "safety-scanner@node-a": "198.18.1.11",
        "telemetry-upload@node-a": "198.18.1.12",
        "telemetry-upload@node-b": "198.18.2.11",
        "erp-dashboard@node-b": "198.18.2.12",
        "detnet-agent@node-a": "198.18.1.13",
        "detnet-agent@node-b": "198.18.2.13",
        "detnet-agent@node-c": "198.18.3.10",
        "detnet-controller@node-c": "198.18.3.11",
    }


def test_every_address_is_in_the_test_space_and_unique() -> None:
    nodes = P.node_plans()
    addresses = [p.address for p in P.pod_plans()]
    addresses += [n.gateway for n in nodes] + [n.uplink_address for n in nodes]
    addresses += [P.SINK_ADDRESS, P.API_ADDRESS]
    assert len(set(addresses)) == len(addresses)
    assert all(P.in_test_space(a) for a in addresses)
    space = ipaddress.IPv4Network("198.18.0.0/15")
    for cidr in [n.pod_cidr for n in nodes] + [P.FABRIC_CIDR, P.SERVICE_CIDR]:
        assert ipaddress.IPv4Network(cidr).subnet_of(space)


def test_each_pod_is_in_its_nodes_network() -> None:
    nodes = P.node_plans()
    for pod in P.pod_plans():
        assert P.node_of_address(pod.address, nodes) == pod.node
    assert P.node_of_address(P.SINK_ADDRESS, nodes) is None
    assert P.node_of_address("not an address", nodes) is None


def test_the_workloads_of_the_issue() -> None:
    by_name = {w.name: w for w in P.WORKLOADS}
    assert by_name["robot-control"].nodes == ("node-a", "node-b")
    assert by_name["safety-scanner"].nodes == ("node-a",)
    assert by_name["telemetry-upload"].nodes == ("node-a", "node-b")
    assert by_name["erp-dashboard"].nodes == ("node-b",)
    assert (by_name["detnet-agent"].nodes, by_name["detnet-agent"].kind) == (P.NODES, "DaemonSet")
    assert by_name["detnet-controller"].nodes == ("node-c",)
    assert by_name["detnet-agent"].selector == {
        "app.kubernetes.io/name": "detnet-agent",
        "app.kubernetes.io/component": "agent",
    }
    assert by_name["erp-dashboard"].selector == {"app": "erp-dashboard"}


def test_bad_plans_are_refused() -> None:
    twice = P.WorkloadPlan("ns", "web", "Deployment", ("node-a", "node-a"), "best-effort")
    with pytest.raises(LabError, match="two replicas"):
        P.pod_plans([twice])
    elsewhere = P.WorkloadPlan("ns", "web", "Deployment", ("node-z",), "best-effort")
    with pytest.raises(LabError, match="no node"):
        P.pod_plans([elsewhere])
    with pytest.raises(LabError):
        P.node_plans(["a", "a"])
