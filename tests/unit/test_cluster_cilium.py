"""The Cilium stand-in's pure parts (lab/cluster/cilium.py): which pod updates become
changes, the change records, and its inputs (kubeconfig, endpoints file). Its behaviour
against the API emulation and real namespaces: tests/integration/test_cilium_standin.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from detnet.lab.cluster.cilium import (
    EGRESS_ANNOTATION,
    BandwidthPolicies,
    Endpoint,
    Endpoints,
    StandIn,
    StandInError,
    main,
    read_endpoints,
    read_kubeconfig,
)


def pod(name: str, value: str | None = None, *, node: str = "n1", uid: str = "u1",
        host_network: bool = False) -> dict[str, Any]:  # fmt: skip
    annotations = {} if value is None else {EGRESS_ANNOTATION: value}
    return {
        "metadata": {"namespace": "be", "name": name, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node, "hostNetwork": host_network},
    }


def values(changes: list[Any]) -> list[tuple[str, str | None]]:
    return [(c.name, c.value) for c in changes]


def test_first_list_applies_every_pod_of_the_node() -> None:
    p = BandwidthPolicies("n1")
    got = p.on_list(
        [pod("a", "80M"), pod("b"), pod("c", "10M", node="n2"), pod("d", "5M", host_network=True)],
        now=1.0,
    )
    assert values(got) == [("a", "80M"), ("b", None)]
    assert (got[0].seen, got[0].uid) == (1.0, "u1")


def test_only_a_changed_annotation_is_a_change() -> None:
    p = BandwidthPolicies("n1")
    p.on_list([pod("a", "80M")], now=0.0)
    assert p.on_event("MODIFIED", pod("a", "80M"), now=1.0) == []  # a status update
    assert values(p.on_event("MODIFIED", pod("a", "64M"), now=2.0)) == [("a", "64M")]
    assert values(p.on_event("MODIFIED", pod("a", "bogus"), now=3.0)) == [("a", "bogus")]
    assert values(p.on_event("MODIFIED", pod("a"), now=4.0)) == [("a", None)]
    assert p.on_event("BOOKMARK", pod("a", "1M"), now=5.0) == []


def test_other_nodes_deleted_and_recreated_pods() -> None:
    p = BandwidthPolicies("n1")
    p.on_list([], now=0.0)
    assert p.on_event("ADDED", pod("x", "10M", node="n2"), now=1.0) == []
    assert values(p.on_event("ADDED", pod("a", "10M"), now=1.0)) == [("a", "10M")]
    assert p.on_event("DELETED", pod("a", "10M"), now=2.0) == []
    assert values(p.on_event("ADDED", pod("a", "10M"), now=3.0)) == [("a", "10M")]
    # the same name with another UID: a new pod, applied again
    assert values(p.on_event("MODIFIED", pod("a", "10M", uid="u2"), now=4.0)) == [("a", "10M")]


def test_a_relist_applies_only_what_changed_meanwhile() -> None:
    p = BandwidthPolicies("n1")
    p.on_list([pod("a", "80M"), pod("b", "80M")], now=0.0)
    got = p.on_list([pod("a", "80M"), pod("b", "40M"), pod("c")], now=5.0)
    assert values(got) == [("b", "40M"), ("c", None)]


async def test_records_say_what_was_applied_and_when(tmp_path: Path) -> None:
    ep_file = tmp_path / "endpoints.json"
    ep_file.write_text(json.dumps({"be/a": {"netns": "ns-a"}}))
    applied: list[tuple[Endpoint, int | None]] = []

    async def apply(ep: Endpoint, rate: int | None) -> str | None:
        applied.append((ep, rate))
        return None

    out = io.StringIO()
    clock = iter([10.5, 11.5, 12.5])
    stand_in = StandIn(node="n1", server="http://x", token="t", endpoints=Endpoints(str(ep_file)),
                       out=out, apply=apply, clock=lambda: next(clock))  # fmt: skip
    stand_in._dispatch(stand_in.policies.on_list([pod("a", "80M"), pod("b", "1M")], now=10.0))
    await stand_in.drain()
    stand_in._dispatch(stand_in.policies.on_event("MODIFIED", pod("a", "nope"), now=11.0))
    await stand_in.drain()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert applied == [(Endpoint("ns-a", "eth0"), 10_000_000), (Endpoint("ns-a", "eth0"), None)]
    by_pod = {(r["pod"], r["value"]): r for r in records}
    a = by_pod[("a", "80M")]
    assert (a["action"], a["rate_bytes_per_s"], a["seen"], a["node"]) == (
        "set",
        10_000_000,
        10.0,
        "n1",
    )
    assert a["applied"] >= a["seen"]
    assert by_pod[("b", "1M")]["error"] == "no endpoint for this pod on this node"
    bad = by_pod[("a", "nope")]
    assert (bad["action"], bad["reason"], bad["rate_bytes_per_s"]) == ("remove", "unparsable", None)


def test_kubeconfig(tmp_path: Path) -> None:
    path = tmp_path / "kc"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        'clusters: [{name: c, cluster: {server: "http://198.19.0.3:6443"}}]\n'
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    assert read_kubeconfig(str(path)) == ("http://198.19.0.3:6443", "abc")
    path.write_text("current-context: nowhere\n")
    with pytest.raises(StandInError, match="not a usable kubeconfig"):
        read_kubeconfig(str(path))
    with pytest.raises(StandInError, match="No such file"):
        read_kubeconfig(str(tmp_path / "missing"))


def test_endpoints_file(tmp_path: Path) -> None:
    path = tmp_path / "ep.json"
    path.write_text(json.dumps({"be/a": {"netns": "ns-a", "device": "eth1"}}))
    assert read_endpoints(str(path)) == {"be/a": Endpoint("ns-a", "eth1")}
    for bad in ("[]", "{", json.dumps({"be/a": {"netns": "../x"}}), json.dumps({"be/a": 1})):
        path.write_text(bad)
        with pytest.raises(StandInError):
            read_endpoints(str(path))


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--node", "n1", "--kubeconfig", str(tmp_path / "none"),
                 "--endpoints", str(tmp_path / "none")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cilium stand-in: error: --kubeconfig")
    assert err.count("\n") == 1
