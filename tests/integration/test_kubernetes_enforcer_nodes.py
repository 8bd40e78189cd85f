"""The Kubernetes enforcer's per-node limits against the API server emulation: each pod
carries its node's limit, new pods too, the per-node record resumes, a hostile record is
ignored, and placements and pods follow the watch."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from detnet.controller.enforce.kubernetes import (
    EGRESS_ANNOTATION,
    RECORD_ANNOTATION,
    RECORD_NODES_ANNOTATION,
    KubernetesEnforcer,
    parse_nodes_record,
)
from detnet.controller.errors import EnforcementError
from detnet.controller.retry import RetryPolicy
from detnet.controller.workloads import BestEffortTarget, PodRef, Scope
from detnet.lab.kubeapi import ApiServerEmulator
from tests.helpers import until

NS = "best-effort"
WL = "telemetry-upload"
A, B = Scope(WL, "node-a"), Scope(WL, "node-b")


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator(bookmark_interval_s=0.2) as server:
        for node in ("node-a", "node-b", "node-c"):
            server.add_node(node)
        server.add_deployment(NS, WL, replicas=4, nodes=("node-a", "node-b"))
        yield server


@pytest.fixture
def make(api: ApiServerEmulator) -> Callable[..., KubernetesEnforcer]:
    def factory(**kwargs: Any) -> KubernetesEnforcer:
        return KubernetesEnforcer(
            [BestEffortTarget(name=WL, namespace=NS)],
            configuration=api.client_configuration(),
            retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.05),
            **kwargs,
        )

    return factory


def by_node(api: ApiServerEmulator) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for pod in api.pods(NS):
        out.setdefault(pod["spec"].get("nodeName", ""), set()).add(
            (pod["metadata"].get("annotations") or {}).get(EGRESS_ANNOTATION)
        )
    return out


async def test_each_pod_carries_its_nodes_limit(api: ApiServerEmulator, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        await enforcer.apply({A: 40, B: 100})
        assert by_node(api) == {"node-a": {"40M"}, "node-b": {"100M"}}
        # A new pod on node-a gets node-a's limit through the watch; one on a node the
        # policy has not seen yet gets the lowest of the workload's limits.
        labels = {"app": WL}
        api.add_pod(NS, "fresh-a", labels=labels, node_name="node-a")
        api.add_pod(NS, "fresh-c", labels=labels, node_name="node-c")

        def carried() -> bool:
            values = by_node(api)
            return values.get("node-a") == {"40M"} and values.get("node-c") == {"40M"}

        await until(carried, timeout_s=5.0)
        assert enforcer.limits == {A: 40, B: 100}
        workload = api.workload("Deployment", NS, WL)
        annotations = workload["metadata"]["annotations"]
        assert json.loads(annotations[RECORD_NODES_ANNOTATION]) == {"node-a": 40, "node-b": 100}
        assert RECORD_ANNOTATION not in annotations
        # Back to one cluster-wide limit: every pod gets it, the node record goes.
        await enforcer.apply({Scope(WL): 70})
        assert set().union(*by_node(api).values()) == {"70M"}
        annotations = api.workload("Deployment", NS, WL)["metadata"]["annotations"]
        assert annotations[RECORD_ANNOTATION] == "70M"
        assert RECORD_NODES_ANNOTATION not in annotations
    finally:
        await enforcer.close()


async def test_events_name_the_nodes(api: ApiServerEmulator, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        await enforcer.apply({A: 100, B: 100})
        await enforcer.apply({A: 100, B: 80})
    finally:
        await enforcer.close()
    messages = [e["message"] for e in api.events(NS)]
    assert any("node-b 80M" in m and "from node-a 100M, node-b 100M" in m for m in messages)
    reasons = [e["reason"] for e in api.events(NS)]
    assert reasons[-1] == "EgressThrottled"


async def test_a_successor_resumes_the_per_node_limits(api: ApiServerEmulator, make) -> None:
    first = make()
    await first.start()
    await first.apply({A: 30, B: 60})
    await first.close()
    second = make()
    try:
        assert await second.start() == {A: 30, B: 60}
    finally:
        await second.close()


HOSTILE = [
    "not json",
    "[1, 2]",
    '{"node-a": -5}',
    '{"node-a": 1e30}',
    '{"node-a": 10000000000}',
    '{"node-a": true}',
    '{"node-a": {"x": 1}}',
    '{"Node_A": 10}',
    '{"node-a": 10, "' + "n" * 300 + '": 10}',
    "[" * 100_000 + "]" * 100_000,
    '{"node-a": 10}' + " " * 70_000,
]


@pytest.mark.parametrize("record", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_node_records_are_not_trusted(record: str) -> None:
    assert parse_nodes_record(record) is None


async def test_a_hostile_record_is_ignored_and_start_works(api: ApiServerEmulator, make) -> None:
    api.patch(
        "Deployment",
        WL,
        {"metadata": {"annotations": {RECORD_NODES_ANNOTATION: '{"node-a": 1e30}'}}},
        namespace=NS,
    )
    enforcer = make()
    try:
        assert await enforcer.start() == {}
    finally:
        await enforcer.close()
    assert parse_nodes_record('{"node-a": 10, "node-b.example": 20}') == {
        "node-a": 10,
        "node-b.example": 20,
    }


async def test_template_mode_refuses_node_scopes(make) -> None:
    enforcer = make(mode="template")
    await enforcer.start()
    try:
        with pytest.raises(EnforcementError, match="no per-node limits"):
            await enforcer.apply({A: 40})
    finally:
        await enforcer.close()


async def test_placements_and_pods_follow_the_watch(api: ApiServerEmulator, make) -> None:
    enforcer = make()
    await enforcer.start()
    try:
        await until(lambda: enforcer.placements() == {WL: {"node-a", "node-b"}}, timeout_s=5.0)
        names = sorted(p["metadata"]["name"] for p in api.pods(NS))
        pods = enforcer.pods()[WL]
        assert [p.name for p in pods] == names
        assert {p.node for p in pods} == {"node-a", "node-b"}
        assert all(isinstance(p, PodRef) and p.namespace == NS and p.uid for p in pods)
        api.add_pod(NS, "unscheduled", labels={"app": WL}, phase="Pending")
        for pod in [p for p in api.pods(NS) if p["spec"].get("nodeName") == "node-b"]:
            api.delete_pod(NS, pod["metadata"]["name"])
        await until(lambda: enforcer.placements() == {WL: {"node-a"}}, timeout_s=5.0)
        assert "unscheduled" not in {p.name for p in enforcer.pods()[WL]}
    finally:
        await enforcer.close()
