"""Lease leader election: two candidates against the API server emulation."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio import client

from detnet.controller.kube.api import KubeClient
from detnet.controller.leader import LeaseElector
from detnet.lab.kubeapi import ApiServerEmulator
from tests.helpers import until

NS = "detnet-system"
# Short periods keep the test quick; the ratios are the defaults' (15/10/2).
TIMING: Any = {"lease_duration_s": 1.5, "renew_deadline_s": 1.0, "retry_period_s": 0.1}


@pytest.fixture
async def api() -> AsyncIterator[ApiServerEmulator]:
    async with ApiServerEmulator() as server:
        yield server


class Worker:
    """The work a leader runs: counts how often it ran and records overlap."""

    def __init__(self, name: str, running: set[str], overlaps: list[set[str]]) -> None:
        self.name, self.running, self.overlaps = name, running, overlaps
        self.started = 0
        self.cancelled = 0

    async def __call__(self) -> None:
        self.started += 1
        self.running.add(self.name)
        if len(self.running) > 1:
            self.overlaps.append(set(self.running))
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running.discard(self.name)


async def test_only_the_leader_works_and_the_other_takes_over_on_release(api) -> None:
    running: set[str] = set()
    overlaps: list[set[str]] = []
    async with client.ApiClient(api.client_configuration()) as ac:
        electors = {
            name: LeaseElector(api_client=ac, namespace=NS, name="detnet", identity=name, **TIMING)
            for name in ("a", "b")
        }
        changes: list[tuple[str, bool]] = []

        def record(name: str, leading: bool) -> None:
            changes.append((name, leading))

        for name, el in electors.items():
            el.on_change(functools.partial(record, name))
        workers = {name: Worker(name, running, overlaps) for name in electors}
        tasks = {n: asyncio.create_task(e.run(workers[n])) for n, e in electors.items()}
        try:
            await until(lambda: len(running) == 1, timeout_s=2.0)
            await asyncio.sleep(0.5)  # several renew periods: still exactly one leader
            assert len(running) == 1
            first = next(iter(running))
            second = "b" if first == "a" else "a"
            assert electors[first].is_leader
            assert not electors[second].is_leader
            lease = api.lease(NS, "detnet")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == first

            await electors[first].release()
            await tasks[first]
            assert workers[first].cancelled == 1
            # Released, not expired: the standby takes over well before a lease duration.
            await until(lambda: running == {second}, timeout_s=0.8)
            assert electors[second].is_leader
            assert not electors[first].is_leader
            lease = api.lease(NS, "detnet")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == second
            assert lease["spec"]["leaseTransitions"] == 1
        finally:
            for el in electors.values():
                await el.release()
            await asyncio.gather(*tasks.values())
        assert overlaps == []
        assert (first, True) in changes
        assert (first, False) in changes
        assert (second, True) in changes
        assert api.lease(NS, "detnet")["spec"]["holderIdentity"] is None


async def test_standby_takes_over_when_the_leader_stops_renewing(api) -> None:
    running: set[str] = set()
    overlaps: list[set[str]] = []
    async with client.ApiClient(api.client_configuration()) as ac:
        a = LeaseElector(api_client=ac, namespace=NS, name="detnet", identity="a", **TIMING)
        task_a = asyncio.create_task(a.run(Worker("a", running, overlaps)))
        await until(lambda: a.is_leader, timeout_s=2.0)
        b = LeaseElector(api_client=ac, namespace=NS, name="detnet", identity="b", **TIMING)
        task_b = asyncio.create_task(b.run(Worker("b", running, overlaps)))
        try:
            await until(lambda: len(running) == 1 and not b.is_leader, timeout_s=1.0)
            # a crashes while the API refuses writes: its lease is not released, so b
            # must wait for it to expire (observed locally), then take over.
            api.fail("update /apis/coordination.k8s.io/v1/*/leases/detnet", 500, times=1000)
            task_a.cancel()
            await asyncio.gather(task_a, return_exceptions=True)
            assert not a.is_leader
            assert running == set()
            assert api.lease(NS, "detnet")["spec"]["holderIdentity"] == "a"
            api.clear_faults()
            # leading first, then its work starts on the next turn of the loop
            await until(lambda: b.is_leader and running == {"b"}, timeout_s=3.0)
        finally:
            await b.release()
            await asyncio.gather(task_b)
        assert overlaps == []


async def test_work_that_returns_ends_run_and_releases(api) -> None:
    done: list[bool] = []

    async def work() -> None:
        done.append(True)

    async with client.ApiClient(api.client_configuration()) as ac:
        el = LeaseElector(api_client=ac, namespace=NS, name="once", identity="x", **TIMING)
        await asyncio.wait_for(el.run(work), 5)
    assert done == [True]
    assert api.lease(NS, "once")["spec"]["holderIdentity"] is None


async def test_work_errors_propagate(api) -> None:
    async def work() -> None:
        raise RuntimeError("boom")

    async with client.ApiClient(api.client_configuration()) as ac:
        el = LeaseElector(api_client=ac, namespace=NS, name="err", identity="x", **TIMING)
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(el.run(work), 5)
    assert not el.is_leader


def test_bad_timing_is_refused() -> None:
    with pytest.raises(ValueError, match="lease_duration_s > renew_deadline_s"):
        LeaseElector(
            api_client=None,
            namespace=NS,
            name="x",
            identity="a",
            lease_duration_s=5,
            renew_deadline_s=5,
        )


async def test_lease_calls_share_the_limiter_but_never_queue_behind_it(api) -> None:
    """With the process's shared KubeClient, an exhausted QPS budget (a cut patching
    many pods) must not keep the leader from renewing: lease calls go first."""
    errors: list[str] = []
    async with client.ApiClient(api.client_configuration()) as ac:
        kube = KubeClient(ac, qps=0.01, burst=1, on_api_error=errors.append)
        await kube.bucket.acquire()  # the budget is spent: a queued call waits 100 s
        queued = asyncio.create_task(kube.bucket.acquire())  # a patch waiting its turn
        el = LeaseElector(kube=kube, namespace=NS, name="shared", identity="x", **TIMING)
        task = asyncio.create_task(el.run(Worker("x", set(), [])))
        try:
            await until(lambda: el.is_leader, timeout_s=2.0)
            renewed = api.lease(NS, "shared")["spec"]["renewTime"]
            await until(
                lambda: api.lease(NS, "shared")["spec"]["renewTime"] != renewed, timeout_s=2.0
            )
            assert not queued.done()  # the lease did not jump by refilling the bucket
        finally:
            queued.cancel()
            try:
                await asyncio.wait_for(el.release(), 5)  # bounded: a stuck run fails here
            finally:
                task.cancel()
                await asyncio.gather(task, queued, return_exceptions=True)
    assert errors == ["404"]  # the first read: no lease yet, so it is created
    assert api.lease(NS, "shared")["spec"]["holderIdentity"] is None


async def test_shared_client_or_own_client_not_both(api) -> None:
    async with client.ApiClient(api.client_configuration()) as ac:
        kube = KubeClient(ac)
        common: Any = {"namespace": NS, "name": "x", "identity": "a"}
        with pytest.raises(ValueError, match="need kube= or api_client="):
            LeaseElector(**common)
        with pytest.raises(ValueError, match="the kube client's"):
            LeaseElector(kube=kube, api_client=ac, **common)
        with pytest.raises(ValueError, match="the kube client's"):
            LeaseElector(kube=kube, on_api_error=print, **common)
