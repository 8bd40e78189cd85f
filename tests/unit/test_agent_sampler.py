"""One sampling tick (controller/agent/sampler.py) over a scripted counter source: what
the snapshot says of measured, unresolved and hostNetwork pods, the node's totals, and
pods that are gone."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from detnet.controller.agent.pods import NodePods
from detnet.controller.agent.procfs import Reading
from detnet.controller.agent.sampler import Sampler, Snapshot
from tests.unit.test_agent_rates import net_dev

MS = 1_000_000
UID_A = "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad"
UID_B = "fd698699-eabf-4c23-92ef-cf0bbdb78261"
UID_H = "3d274242-8ee0-11e9-a8a6-1e68d864ef1a"


class Script:
    """Counters by cgroup UID, set by the test; records what is wanted."""

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        self.tx: dict[str, int] = {}
        self.now = 0
        self.source = 1

    def want(self, keys: Collection[str]) -> None:
        self.wanted = set(keys)

    def scan(self, now_ns: int) -> int:
        return 0

    def forget(self, key: str) -> None:
        self.tx.pop(key, None)

    def read(self) -> dict[str, Reading]:
        return {
            k: (self.now, net_dev({b"eth0": (tx // 2, tx)}), self.source)
            for k, tx in self.tx.items()
            if k in self.wanted
        }


def tick(sampler: Sampler, now_ns: int) -> Snapshot:
    sampler.tick(now_ns)
    snap = sampler.snapshot()
    assert snap is not None
    return snap


def pod(name: str, uid: str, *, host_network: bool = False) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "be", "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "n", "hostNetwork": host_network},
        "status": {"phase": "Running"},
    }


def test_a_tick_measures_resolved_pods_only() -> None:
    pods = NodePods("n")
    pods.on_list([pod("a", UID_A), pod("b", UID_B), pod("h", UID_H, host_network=True)])
    script = Script()
    sampler = Sampler(pods=pods, resolver=script, interval_ns=100 * MS, wall=lambda: 0.0)
    script.tx = {UID_A: 0}
    assert sampler.snapshot() is None  # no tick yet
    snap = tick(sampler, 0)
    assert script.wanted == {UID_A, UID_B}  # hostNetwork: not even looked for
    assert (snap.measured, snap.unknown, snap.not_measurable) == (0, 2, 1)
    script.now, script.tx = 100 * MS, {UID_A: 10_000}
    snap = tick(sampler, 100 * MS)
    by_name = {s.pod.name: s.rates for s in snap.pods}
    assert by_name["a"].egress_bps == pytest.approx(100_000)
    assert by_name["a"].ingress_bps == pytest.approx(50_000)
    assert by_name["b"].egress_bps is None  # not resolved: unknown, not 0
    assert by_name["h"].egress_bps is None  # hostNetwork: not measurable
    assert (snap.measured, snap.unknown, snap.not_measurable) == (1, 1, 1)
    assert snap.egress_bps == pytest.approx(100_000)
    assert snap.at == "1970-01-01T00:00:00.000000Z"
    assert snap.interval_s == 0.1
    assert sampler.ticks == 2
    assert sum(sampler.cost_buckets) == 2


def test_a_re_resolved_pod_is_unknown_for_one_interval() -> None:
    pods = NodePods("n")
    pods.on_list([pod("a", UID_A)])
    script = Script()
    sampler = Sampler(pods=pods, resolver=script, interval_ns=100 * MS)
    for k in range(3):
        script.now, script.tx = k * 100 * MS, {UID_A: k * 1000}
        sampler.tick(script.now)
    script.source = 2
    script.now, script.tx = 300 * MS, {UID_A: 3000}
    assert tick(sampler, script.now).measured == 0
    assert sampler.outcomes["source"] == 1
    script.now, script.tx = 400 * MS, {UID_A: 4000}
    assert tick(sampler, script.now).measured == 1


def test_pods_that_are_gone_leave_no_meter() -> None:
    pods = NodePods("n")
    pods.on_list([pod("a", UID_A), pod("b", UID_B)])
    script = Script()
    sampler = Sampler(pods=pods, resolver=script, interval_ns=100 * MS)
    sampler.tick(0)
    pods.on_list([pod("b", UID_B)])
    snap = tick(sampler, 100 * MS)
    assert [s.pod.name for s in snap.pods] == ["b"]
    assert script.wanted == {UID_B}
    assert sampler._meter.keys == [UID_B]  # a's column is gone with it


def test_no_tick_counts_as_synced_before_the_pod_list() -> None:
    pods = NodePods("n")
    sampler = Sampler(pods=pods, resolver=Script(), interval_ns=100 * MS)
    sampler.tick(0)
    assert not sampler.synced
    pods.on_list([])
    sampler.tick(100 * MS)
    assert sampler.synced


def test_a_snapshot_is_built_once_per_tick() -> None:
    pods = NodePods("n")
    pods.on_list([pod("a", UID_A)])
    sampler = Sampler(pods=pods, resolver=Script(), interval_ns=100 * MS)
    sampler.tick(0)
    first = sampler.snapshot()
    assert sampler.snapshot() is first
    sampler.tick(100 * MS)
    assert sampler.snapshot() is not first
    assert sampler.last_snapshot is sampler.snapshot()
