"""EndpointWatch against the API server emulation through the real kubernetes-asyncio
client: the Service's get at start, the slices its EndpointSlice controller keeps in step
with the pods, hand-written slices of a Service without a selector, and a 410 re-list."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client

from detnet.controller.endpoints.feed import EndpointDiff
from detnet.controller.endpoints.service import ServiceRef
from detnet.controller.endpoints.slices import ProbeEndpoint
from detnet.controller.endpoints.watch import EndpointsError, EndpointWatch
from detnet.controller.kube.api import KubeClient
from detnet.controller.retry import RetryPolicy
from detnet.lab.kubeapi import ApiServerEmulator
from detnet.lab.kubeapi.builders import endpoint
from tests.helpers import until

NS = "critical"
APP = "robot-control"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/critical/endpointslices"
LONG = 60_000_000_000  # a removal grace no test waits for: removals seen are at once


class Harness:
    def __init__(self, api: ApiServerEmulator, kube: KubeClient) -> None:
        self.api, self.kube = api, kube
        self.diffs: list[EndpointDiff] = []
        self._tasks: list[asyncio.Task[None]] = []

    def watch(self, service: str = "robot", **kwargs: Any) -> EndpointWatch:
        options: dict[str, Any] = {"port": 7000, "protocol": "udp", "removal_grace_ns": LONG}
        options.update(kwargs)
        return EndpointWatch(
            kube=self.kube,
            app=APP,
            service=ServiceRef(service, NS),
            on_change=self.diffs.append,
            **options,
        )

    async def run(self, watch: EndpointWatch) -> EndpointWatch:
        watches = len(self.requests("watch"))
        self._tasks.append(asyncio.create_task(watch.run()))
        await until(lambda: bool(self.diffs), timeout_s=3.0)
        # Watching: past start()'s list and the watch loop's own.
        await until(lambda: len(self.requests("watch")) > watches, timeout_s=3.0)
        return watch

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def names(self, watch: EndpointWatch) -> list[str]:
        return sorted(watch.endpoints)

    def requests(self, verb: str) -> list[dict[str, str]]:
        return [dict(r.query) for r in self.api.requests if r.verb == verb and r.path == SLICES]


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with ApiServerEmulator(bookmark_interval_s=0.2) as api:
        api.add_node("node-a", internal_ip="198.18.0.1")
        api.add_node("node-b", internal_ip="198.18.0.2")
        api.add_service(NS, "robot", selector={"app": "robot"}, ports=[7000])
        api.add_pod(
            NS, "robot-0", labels={"app": "robot"}, node_name="node-a", pod_ip="198.18.1.10"
        )
        api.add_pod(
            NS, "robot-1", labels={"app": "robot"}, node_name="node-b", pod_ip="198.18.1.11"
        )
        api.add_pod(NS, "web-0", labels={"app": "web"}, node_name="node-a", pod_ip="198.18.1.20")
        async with client.ApiClient(api.client_configuration()) as ac:
            kube = KubeClient(ac, retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02))
            harness = Harness(api, kube)
            try:
                yield harness
            finally:
                await harness.stop()


def ep(pod: str | None, address: str, node: str | None, port: int = 7000) -> ProbeEndpoint:
    return ProbeEndpoint(
        app=APP, name=f"{APP}/{pod or address}", address=address, port=port, pod=pod, node=node
    )


R0 = ep("robot-0", "198.18.1.10", "node-a")
R1 = ep("robot-1", "198.18.1.11", "node-b")
R2 = ep("robot-2", "198.18.1.12", "node-b")


async def test_initial_set_is_every_ready_pod_with_its_node(h: Harness) -> None:
    w = await h.run(h.watch())
    (first,) = h.diffs
    assert first.initial
    assert first.added == first.current == (R0, R1)
    assert w.info is not None
    assert (w.info.selector, w.info.family) == (True, "IPv4")
    # One list at start (so a refusal is an error there), one as the watch begins.
    listings = h.requests("list")
    assert [q["labelSelector"] for q in listings] == ["kubernetes.io/service-name=robot"] * 2
    assert len(h.diffs) == 1  # the second list found what the first did


async def test_an_endpoint_added_to_the_slice_is_reported(h: Harness) -> None:
    w = await h.run(h.watch())
    h.api.add_pod(NS, "robot-2", labels={"app": "robot"}, node_name="node-b", pod_ip="198.18.1.12")
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)
    assert (h.diffs[1].added, h.diffs[1].removed, h.diffs[1].changed) == ((R2,), (), ())
    assert h.names(w) == [R0.name, R1.name, R2.name]


async def test_a_pod_going_unready_is_withdrawn_at_once(h: Harness) -> None:
    w = await h.run(h.watch())
    h.api.set_pod_ready(NS, "robot-1", False)
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)  # despite a 60 s removal grace
    assert (h.diffs[1].added, h.diffs[1].removed) == ((), (R1,))
    h.api.set_pod_ready(NS, "robot-1", True)
    await until(lambda: len(h.diffs) == 3, timeout_s=3.0)
    assert h.diffs[2].added == (R1,)
    assert h.names(w) == [R0.name, R1.name]


async def test_a_terminating_pod_is_withdrawn_at_once(h: Harness) -> None:
    await h.run(h.watch())
    h.api.patch(
        "Pod", "robot-0", {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}, namespace=NS
    )
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)
    assert h.diffs[1].removed == (R0,)


async def test_an_endpoint_removed_from_the_slice_is_withdrawn_after_the_grace(h: Harness) -> None:
    w = await h.run(h.watch(removal_grace_ns=50_000_000))
    h.api.delete_pod(NS, "robot-1")  # gone from the slice at once, as with --grace-period=0
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)
    assert (h.diffs[1].added, h.diffs[1].removed) == ((), (R1,))
    assert h.names(w) == [R0.name]


async def test_a_missing_service_is_an_error_naming_the_app(h: Harness) -> None:
    with pytest.raises(EndpointsError) as err:
        await h.watch("robto").start()
    assert str(err.value) == (
        f"critical app {APP}: Service {NS}/robto does not exist "
        f"(service: robto.{NS}.svc; check its name and namespace)"
    )
    assert h.requests("list") == []  # nothing watched


async def test_a_forbidden_service_get_names_the_app_and_the_permission(h: Harness) -> None:
    h.api.fail(f"get /api/v1/namespaces/{NS}/services/robot", 403)
    with pytest.raises(
        EndpointsError, match=rf"critical app {APP}: get service {NS}/robot: HTTP 403 .*RBAC"
    ):
        await h.watch().start()


async def test_a_refused_slice_list_is_an_error_at_start(h: Harness) -> None:
    h.api.fail(f"list {SLICES}", 403)
    w = h.watch()
    with pytest.raises(
        EndpointsError, match=rf"critical app {APP}: list endpointslices .*403.*RBAC"
    ):
        await w.start()
    assert h.diffs == []
    assert not w.synced


async def test_start_delivers_the_initial_set_before_it_returns(h: Harness) -> None:
    w = h.watch()
    info = await w.start()
    assert (info.ref, w.synced) == (ServiceRef("robot", NS), True)
    assert [d.current for d in h.diffs] == [(R0, R1)]


async def test_a_410_mid_watch_relists_without_a_spurious_change(h: Harness) -> None:
    w = await h.run(h.watch(watch_timeout_s=1))
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=3.0)
    # The next watch request gets an ERROR 410 event, as the server sends it for a
    # compacted resourceVersion; the loop re-lists and watches from the new list.
    h.api.fail(f"watch {SLICES}", 410)
    await until(lambda: len(h.requests("list")) == 3, timeout_s=5.0)
    await until(lambda: len(h.requests("watch")) >= 3, timeout_s=5.0)
    assert len(h.diffs) == 1  # the re-list found what we had: nothing to say
    assert h.names(w) == [R0.name, R1.name]
    # The resumed watch carries on: one change, reported once.
    h.api.add_pod(NS, "robot-2", labels={"app": "robot"}, node_name="node-b", pod_ip="198.18.1.12")
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)
    assert (h.diffs[1].added, h.diffs[1].removed, h.diffs[1].changed) == ((R2,), (), ())
    await asyncio.sleep(0.3)
    assert len(h.diffs) == 2
    assert len(h.requests("list")) == 3


async def test_a_change_missed_while_the_watch_was_gone_arrives_with_the_relist(
    h: Harness,
) -> None:
    # A client that waits 0.2-0.4 s after a failed list, so the change below surely
    # lands between the refused watch and the re-list.
    h.kube = KubeClient(h.kube.api_client, retry=RetryPolicy(attempts=1, base_s=0.4, cap_s=0.4))
    w = await h.run(h.watch(watch_timeout_s=1))
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=3.0)
    h.api.fail(f"watch {SLICES}", 410)
    h.api.fail(f"list {SLICES}", 500)
    await until(lambda: len(h.requests("list")) == 3, timeout_s=5.0)  # the failed one
    changed_at = time.time()
    h.api.set_pod_ready(NS, "robot-0", False)
    await until(lambda: len(h.diffs) == 2, timeout_s=5.0)
    assert (h.diffs[1].added, h.diffs[1].removed, h.diffs[1].changed) == ((), (R0,), ())
    assert h.names(w) == [R1.name]
    # It came with the re-list: no watch was open between the refused one and the list.
    await until(lambda: len(h.requests("watch")) == 3, timeout_s=3.0)
    lists = [r.at for r in h.api.requests if r.verb == "list" and r.path == SLICES]
    watches = [r.at for r in h.api.requests if r.verb == "watch" and r.path == SLICES]
    assert len(lists) == 4
    assert watches[1] < changed_at < lists[3] < watches[2]


async def test_a_named_port_comes_from_the_slice(h: Harness) -> None:
    h.api.add_service(
        NS,
        "robot-named",
        selector={"app": "robot"},
        ports=[{"name": "probe", "port": 80, "targetPort": 7001, "protocol": "UDP"}],
    )
    await h.run(h.watch("robot-named", port="probe"))
    assert h.diffs[0].current == (
        ep("robot-0", "198.18.1.10", "node-a", port=7001),
        ep("robot-1", "198.18.1.11", "node-b", port=7001),
    )


# -------------------------------------------------- a Service without a selector


@pytest.fixture
def manual(h: Harness) -> Harness:
    h.api.add_service(NS, "manual", ports=[7000])  # no selector: slices come from us
    return h


def manual_slice(
    h: Harness, name: str, *endpoints: dict[str, Any], address_type: str = "IPv4"
) -> None:
    h.api.add_endpoint_slice(
        NS,
        "manual",
        name=name,
        endpoints=endpoints,
        ports=[{"name": "", "port": 7000, "protocol": "UDP"}],
        address_type=address_type,
    )


def set_endpoints(h: Harness, name: str, *endpoints: dict[str, Any]) -> None:
    h.api.patch("EndpointSlice", name, {"endpoints": list(endpoints)}, namespace=NS)


async def test_a_service_without_a_selector_uses_its_hand_written_slices(manual: Harness) -> None:
    h = manual
    manual_slice(h, "manual-a", endpoint("198.18.1.30", node_name="node-a"))
    # Not the Service's family, but not a pod's second address either: its own endpoint.
    manual_slice(h, "manual-v6", endpoint("fd00::30"), address_type="IPv6")
    manual_slice(h, "manual-names", endpoint("robot.example.org"), address_type="FQDN")
    w = await h.run(h.watch("manual"))
    assert w.info is not None
    assert w.info.selector is False
    assert h.diffs[0].current == (ep(None, "198.18.1.30", "node-a"), ep(None, "fd00::30", None))


@pytest.mark.parametrize("add_first", [True, False], ids=["add-then-remove", "remove-then-add"])
async def test_an_address_moving_between_slices_never_leaves(
    manual: Harness, add_first: bool
) -> None:
    h = manual
    moving = endpoint("198.18.1.31", node_name="node-b")
    manual_slice(h, "manual-a", endpoint("198.18.1.30", node_name="node-a"), moving)
    manual_slice(h, "manual-b")
    w = await h.run(h.watch("manual", removal_grace_ns=300_000_000))
    assert h.names(w) == [f"{APP}/198.18.1.30", f"{APP}/198.18.1.31"]
    stay = endpoint("198.18.1.30", node_name="node-a")
    if add_first:
        set_endpoints(h, "manual-b", moving)
        await asyncio.sleep(0.05)
        set_endpoints(h, "manual-a", stay)
    else:
        set_endpoints(h, "manual-a", stay)
        await asyncio.sleep(0.05)
        set_endpoints(h, "manual-b", moving)
    # Both writes are seen (the watch is past them), and nothing was ever said.
    rv = h.api.get("EndpointSlice", "manual-b" if not add_first else "manual-a", namespace=NS)
    await until(
        lambda: int(w.resource_version or 0) >= int(rv["metadata"]["resourceVersion"]),
        timeout_s=3.0,
    )
    await asyncio.sleep(0.5)  # past the grace: a held removal would be out
    assert len(h.diffs) == 1
    assert h.names(w) == [f"{APP}/198.18.1.30", f"{APP}/198.18.1.31"]


async def test_a_deleted_slice_withdraws_its_endpoints_after_the_grace(manual: Harness) -> None:
    h = manual
    manual_slice(h, "manual-a", endpoint("198.18.1.30"))
    manual_slice(h, "manual-b", endpoint("198.18.1.31"))
    w = await h.run(h.watch("manual", removal_grace_ns=50_000_000))
    h.api.delete("EndpointSlice", "manual-b", namespace=NS)
    await until(lambda: len(h.diffs) == 2, timeout_s=3.0)
    assert h.diffs[1].removed == (ep(None, "198.18.1.31", None),)
    assert h.names(w) == [f"{APP}/198.18.1.30"]
