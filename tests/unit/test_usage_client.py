"""The controller's usage client, its pure parts (controller/usage.py): agents from
EndpointSlices, the token file and its rotation, sums with unknown counted."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from detnet.controller.agent.wire import PodUsage
from detnet.controller.kube.objects import WatchEvent
from detnet.controller.usage import (
    MAX_TOKEN_BYTES,
    OK,
    AgentEndpoint,
    AgentUsage,
    EndpointSliceAgents,
    StaticAgents,
    TokenError,
    TokenFile,
    UsageClient,
    UsageError,
    UsageReport,
)
from detnet.controller.workloads import PodRef, Scope


def endpoint(address: str, node: str, **conditions: bool) -> dict[str, Any]:
    return {
        "addresses": [address],
        "nodeName": node,
        "conditions": {"ready": True, "serving": True, "terminating": False, **conditions},
    }


def eps(name: str, *endpoints: dict[str, Any], ports: Any = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "detnet-agent"},
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "usage", "port": 9109, "protocol": "TCP"}] if ports is None else ports,
    }


def test_agents_from_endpoint_slices() -> None:
    agents = EndpointSliceAgents()
    agents.on_list(
        [
            eps("s1", endpoint("10.0.0.5", "node-a"), endpoint("10.0.1.5", "node-b")),
            eps("s2", endpoint("10.0.2.5", "node-c", ready=False)),  # not ready: not used
        ]
    )
    assert agents.synced
    assert agents.agent_for("node-a") == AgentEndpoint("node-a", "10.0.0.5", 9109)
    assert agents.agent_for("node-c") is None
    assert agents.nodes == {"node-a", "node-b"}
    agents.on_event(WatchEvent("MODIFIED", eps("s2", endpoint("10.0.2.6", "node-c"))))
    assert agents.agent_for("node-c") == AgentEndpoint("node-c", "10.0.2.6", 9109)
    agents.on_event(WatchEvent("DELETED", eps("s1")))
    assert agents.agent_for("node-a") is None


def test_a_rolling_update_picks_one_agent_stably_and_never_a_terminating_one() -> None:
    agents = EndpointSliceAgents()
    agents.on_list(
        [
            eps(
                "s1",
                endpoint("10.0.0.9", "node-a"),
                endpoint("10.0.0.7", "node-a"),
                endpoint("10.0.0.1", "node-a", terminating=True, ready=False),
            )
        ]
    )
    assert agents.agent_for("node-a") == AgentEndpoint("node-a", "10.0.0.7", 9109)


def test_a_nil_ready_is_ready() -> None:
    agents = EndpointSliceAgents()
    agents.on_list([eps("s", {"addresses": ["10.0.0.5"], "nodeName": "n"})])
    assert agents.agent_for("n") is not None


@pytest.mark.parametrize(
    "ports",
    [
        [],
        [{"name": "metrics", "port": 9110}, {"name": "other", "port": 1}],
        [{"name": "usage", "port": "9109"}],
        [{"name": "usage", "port": 0}],
        "x",
    ],
)
def test_slices_without_a_usable_port_give_no_agent(ports: Any) -> None:
    agents = EndpointSliceAgents()
    agents.on_list([eps("s", endpoint("10.0.0.5", "n"), ports=ports)])
    assert agents.agent_for("n") is None


def test_the_only_port_is_used_when_unnamed() -> None:
    agents = EndpointSliceAgents()
    agents.on_list([eps("s", endpoint("10.0.0.5", "n"), ports=[{"port": 9200}])])
    assert agents.agent_for("n") == AgentEndpoint("n", "10.0.0.5", 9200)


def test_broken_slices_are_ignored() -> None:
    agents = EndpointSliceAgents()
    agents.on_list(
        [
            {"metadata": {"name": "a"}, "endpoints": "x", "ports": [{"port": 1}]},
            {
                **eps("b", {"addresses": [], "nodeName": "n"}, {"addresses": ["1.2.3.4"]}),
                "endpoints": ["not an endpoint", {"addresses": [], "nodeName": "n"}],
            },
            {"metadata": {}},
        ]
    )
    assert agents.nodes == set()


def test_urls() -> None:
    assert AgentEndpoint("n", "10.0.0.5", 9109).url == "http://10.0.0.5:9109/v1/usage"
    assert AgentEndpoint("n", "fd00::5", 9109).url == "http://[fd00::5]:9109/v1/usage"
    assert StaticAgents({"n": ("127.0.0.1", 1)}).agent_for("n") == AgentEndpoint(
        "n", "127.0.0.1", 1
    )


def _kubelet_projected(dir_: Path, token: str, generation: int) -> None:
    """Write a token the way the kubelet's atomic writer does: a new timestamped
    directory, the ..data symlink swapped to it, token -> ..data/token."""
    ts = dir_ / f"..2026_11_29_10_00_0{generation}.{generation}"
    ts.mkdir()
    (ts / "token").write_text(token)
    tmp = dir_ / "..data_tmp"
    tmp.symlink_to(ts.name)
    tmp.rename(dir_ / "..data")
    if not (dir_ / "token").is_symlink():
        (dir_ / "token").symlink_to("..data/token")


def test_the_token_is_read_again_when_the_kubelet_rotates_it(tmp_path: Path) -> None:
    _kubelet_projected(tmp_path, "first\n", 1)
    tokens = TokenFile(tmp_path / "token")
    assert tokens.token() == "first"
    assert tokens.token() == "first"
    assert tokens.reads == 1  # unchanged: not read again
    _kubelet_projected(tmp_path, "second", 2)
    assert tokens.token() == "second"
    assert tokens.reads == 2


def test_invalidate_forces_a_read(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("aaaa")
    tokens = TokenFile(path)
    assert tokens.token() == "aaaa"
    st = path.stat()
    with open(path, "r+") as f:  # same inode, size and mtime: invisible to stat
        f.write("bbbb")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tokens.token() == "aaaa"
    tokens.invalidate()
    assert tokens.token() == "bbbb"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("", "no token"), (" \n", "no token"), ("a b", "no token"),
     ("x" * (MAX_TOKEN_BYTES + 1), "larger than")],
)  # fmt: skip
def test_bad_token_files(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TokenError, match=message):
        TokenFile(path).token()


def _report(pods: dict[tuple[str, str], PodUsage], nodes: dict[str, str]) -> UsageReport:
    return UsageReport(
        pods=MappingProxyType(pods), nodes=MappingProxyType(nodes), agents={}, elapsed_s=0.0
    )


def test_sums_count_what_is_unknown() -> None:
    report = _report(
        {
            ("be", "a"): PodUsage("be", "a", "u1", 10.0, 1.0, 12.0, 2.0),
            ("be", "b"): PodUsage("be", "b", "u2", 5.0, 1.0, None, None),  # too new for 1 s
            ("be", "h"): PodUsage("be", "h", "u3"),  # hostNetwork
        },
        {"node-a": OK, "node-b": "timeout"},
    )
    pods = [("be", "a"), ("be", "b"), ("be", "h"), ("be", "on-node-b")]
    assert report.egress(pods).bps == 12.0
    assert (report.egress(pods).known, report.egress(pods).unknown) == (1, 3)
    assert report.egress(pods, mean_1s=False).bps == 15.0
    assert report.egress(pods, mean_1s=False).unknown == 2
    assert report.ingress(pods).bps == 2.0
    assert report.unknown_nodes == {"node-b"}
    assert report.pod("be", "on-node-b") is None
    assert report.egress([]).known == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UsageError, match="deadline"):
        UsageClient(agents=StaticAgents({}), token=lambda: "t", deadline_s=0)


class _Answers:
    """Stands in for UsageClient.fetch: the report the agents would have given."""

    def __init__(self, report: UsageReport) -> None:
        self.report = report
        self.asked: list[set[str]] = []

    async def fetch(self, nodes: Any) -> UsageReport:
        self.asked.append(set(nodes))
        return self.report


async def test_agent_usage_sums_per_scope_and_drops_partly_known_ones() -> None:
    mbit = 1e6 / 8  # bytes/s of 1 Mbit/s
    report = _report(
        {
            ("be", "t1"): PodUsage("be", "t1", "u1", 20 * mbit, 0.0, 0.0, 0.0),
            ("be", "t2"): PodUsage("be", "t2", "u2", 30 * mbit, 0.0, 0.0, 0.0),
            ("be", "e1"): PodUsage("be", "e1", "u3", 5 * mbit, 0.0, 0.0, 0.0),
        },
        {"node-a": OK, "node-b": OK, "node-c": "timeout"},
    )
    answers = _Answers(report)
    seen: list[Mapping[str, int]] = []
    source = AgentUsage(answers, on_unknown=seen.append)  # type: ignore[arg-type]
    pods = {
        "telemetry": [PodRef("be", "t1", "node-a"), PodRef("be", "t2", "node-b")],
        "erp": [PodRef("be", "e1", "node-b"), PodRef("be", "e2", "node-c")],
    }
    usage = await source.usage(pods)
    assert answers.asked == [{"node-a", "node-b", "node-c"}]
    assert usage == {
        Scope("telemetry", "node-a"): pytest.approx(20.0),
        Scope("telemetry", "node-b"): pytest.approx(30.0),
        Scope("telemetry"): pytest.approx(50.0),
        Scope("erp", "node-b"): pytest.approx(5.0),
        # erp on node-c is unknown: neither its node scope nor its sum is reported
    }
    assert seen == [{"telemetry": 0, "erp": 1}]
    assert await source.usage({}) == {}
