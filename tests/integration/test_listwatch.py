"""ListWatch, the reusable list-then-watch loop, against the API server emulation through
the real kubernetes-asyncio client: resume, re-list, ERROR events, bookmarks."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from kubernetes_asyncio import client

from detnet.controller.kube.api import KubeClient
from detnet.controller.kube.listwatch import ListWatch
from detnet.controller.kube.objects import JsonObj, WatchEvent, name_of
from detnet.controller.retry import RetryPolicy
from detnet.lab.kubeapi import DROP, ApiServerEmulator
from tests.helpers import until

NS = "best-effort"
SELECTOR = "app=web"

# How long a behaviour may take to show: a bound, not a speed (the suite runs on 2 busy
# cores, and 3 s was once too short for a 410's time-out and re-list under its load).
LIMIT_S = 10.0


class Sink:
    """Records what the ListWatch feeds; ``on_list_hook`` runs inside on_list."""

    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.watch_ends = 0
        self.on_list_hook: Callable[[], object] | None = None

    def on_list(self, items: list[JsonObj]) -> None:
        self.lists.append([name_of(i) for i in items])
        if self.on_list_hook is not None:
            hook, self.on_list_hook = self.on_list_hook, None
            hook()

    def on_event(self, event: WatchEvent) -> None:
        assert event.type in ("ADDED", "MODIFIED", "DELETED")
        self.events.append((event.type, name_of(event.object)))

    def on_watch_end(self) -> None:
        self.watch_ends += 1


class Harness:
    def __init__(self, api: ApiServerEmulator, kube: KubeClient, errors: Counter[str]) -> None:
        self.api, self.kube, self.errors = api, kube, errors
        self.sink = Sink()
        self._tasks: list[asyncio.Task[None]] = []

    def watch(self, **kwargs: Any) -> ListWatch:
        return ListWatch(
            kube=self.kube,
            list_call=client.CoreV1Api(self.kube.api_client).list_namespaced_pod,
            args=(NS,),
            what=f"pods {NS} -l {SELECTOR}",
            label_selector=SELECTOR,
            **kwargs,
        )

    def run(self, lw: ListWatch) -> None:
        self._tasks.append(asyncio.create_task(lw.run(self.sink)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def requests(self, verb: str) -> list[Mapping[str, str]]:
        return [r.query for r in self.api.requests if r.verb == verb and r.path.endswith("/pods")]


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    async with ApiServerEmulator(bookmark_interval_s=60) as api:
        api.add_pod(NS, "web-0", labels={"app": "web"})
        api.add_pod(NS, "other", labels={"app": "other"})
        errors: Counter[str] = Counter()
        async with client.ApiClient(api.client_configuration()) as ac:
            kube = KubeClient(
                ac,
                retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02),
                on_api_error=lambda code: errors.update([code]),
            )
            harness = Harness(api, kube, errors)
            try:
                yield harness
            finally:
                await harness.stop()


async def test_lists_then_watches_from_the_lists_resource_version(h: Harness) -> None:
    lw = h.watch(watch_timeout_s=1)
    h.run(lw)
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=LIMIT_S)
    assert h.sink.lists == [["web-0"]]
    listed_rv = h.requests("watch")[0]["resourceVersion"]
    assert h.requests("list")[0]["labelSelector"] == SELECTOR
    h.api.add_pod(NS, "web-1", labels={"app": "web"}, phase="Pending")
    h.api.add_pod(NS, "other-1", labels={"app": "other"})
    h.api.set_pod_phase(NS, "web-1", "Running")
    h.api.delete_pod(NS, "web-0")
    expected = [("ADDED", "web-1"), ("MODIFIED", "web-1"), ("DELETED", "web-0")]
    await until(lambda: h.sink.events == expected, timeout_s=LIMIT_S)
    # The watch request ends after 1 s; the next one resumes where the last event was.
    await until(lambda: h.sink.watch_ends >= 1 and len(h.requests("watch")) >= 2, timeout_s=LIMIT_S)
    assert int(h.requests("watch")[1]["resourceVersion"]) > int(listed_rv)
    assert lw.resource_version == h.requests("watch")[1]["resourceVersion"]
    assert h.sink.lists == [["web-0"]]  # no re-list
    assert h.sink.events == expected  # and nothing replayed
    watch = h.requests("watch")[0]
    flags = (watch["watch"], watch["allowWatchBookmarks"], watch["timeoutSeconds"])
    assert tuple(f.lower() for f in flags) == ("true", "true", "1")


async def test_dropped_connection_resumes_from_the_last_resource_version(h: Harness) -> None:
    h.api.fail("watch /api/v1/namespaces/*/pods", DROP, times=2)
    # While the first watches are dropped, a pod appears: the resumed watch must see it.
    h.sink.on_list_hook = lambda: h.api.add_pod(NS, "web-1", labels={"app": "web"})
    h.run(h.watch())
    await until(lambda: h.sink.events == [("ADDED", "web-1")], timeout_s=LIMIT_S)
    watches = [q["resourceVersion"] for q in h.requests("watch")]
    assert len(watches) == 3
    assert len(set(watches)) == 1
    assert len(h.requests("list")) == 1  # no re-list
    # aiohttp itself retries a GET once on a reused connection the server closed, so
    # the two drops reach us as one or two failures.
    assert h.errors["connection"] in (1, 2)


async def test_inactivity_timeout_resumes_from_the_last_event(h: Harness) -> None:
    # No bookmarks (interval 60 s) and no events: the stream goes quiet and the client
    # gives up on it after 0.3 s, as if the connection had died without a FIN.
    lw = h.watch(inactivity_timeout_s=0.3)
    h.run(lw)
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=LIMIT_S)
    h.api.add_pod(NS, "web-1", labels={"app": "web"})
    await until(lambda: h.sink.events == [("ADDED", "web-1")], timeout_s=LIMIT_S)
    seen = lw.resource_version
    assert seen is not None
    assert int(seen) > int(h.requests("watch")[0]["resourceVersion"])
    await until(lambda: len(h.requests("watch")) >= 2, timeout_s=LIMIT_S)
    assert h.requests("watch")[1]["resourceVersion"] == seen
    assert len(h.requests("list")) == 1
    assert h.errors["connection"] >= 1
    assert h.sink.watch_ends == 0  # it did not end cleanly


async def test_410_error_event_mid_watch_relists(h: Harness) -> None:
    h.run(h.watch(watch_timeout_s=1))
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=LIMIT_S)
    h.api.fail("watch /api/v1/namespaces/*/pods", 410, times=1)  # an ERROR event, as served
    h.api.compact()  # and the history is gone for real too
    # While the first watch still runs, changes arrive; then it ends, the reopened watch
    # gets the ERROR 410 event, and the re-list brings the cache up to date.
    h.api.add_pod(NS, "web-1", labels={"app": "web"})
    await until(lambda: len(h.sink.lists) == 2, timeout_s=4.0)
    assert sorted(h.sink.lists[1]) == ["web-0", "web-1"]
    assert h.errors["410"] == 1
    h.api.add_pod(NS, "web-2", labels={"app": "web"})
    await until(lambda: ("ADDED", "web-2") in h.sink.events, timeout_s=LIMIT_S)


async def test_410_on_a_compacted_resource_version_relists(h: Harness) -> None:
    # No injected fault: the server's own answer to a resourceVersion it forgot.
    lw = h.watch(inactivity_timeout_s=0.3)
    h.run(lw)
    await until(lambda: len(h.requests("watch")) == 1, timeout_s=LIMIT_S)
    h.api.add_pod(NS, "web-1", labels={"app": "web"})
    await until(lambda: h.sink.events == [("ADDED", "web-1")], timeout_s=LIMIT_S)
    seen = lw.resource_version
    h.api.compact()  # our resourceVersion (web-1's) is now too old to watch from
    # The quiet stream times out; the resumed watch gets 410 (an ERROR event); re-list.
    await until(lambda: len(h.sink.lists) == 2, timeout_s=LIMIT_S)
    assert sorted(h.sink.lists[1]) == ["web-0", "web-1"]
    assert h.errors["410"] >= 1
    assert h.requests("watch")[1]["resourceVersion"] == seen  # the refused resume
    # The emulator refuses even the new list's resourceVersion until something changes
    # (a real server would not): the loop keeps re-listing, backing off, and recovers.
    h.api.add_pod(NS, "web-2", labels={"app": "web"})
    await until(lambda: any("web-2" in names for names in h.sink.lists), timeout_s=LIMIT_S)
    h.api.add_pod(NS, "web-3", labels={"app": "web"})
    await until(lambda: ("ADDED", "web-3") in h.sink.events, timeout_s=LIMIT_S)


async def test_failed_list_backs_off_and_retries(h: Harness) -> None:
    h.api.fail("list /api/v1/namespaces/*/pods", 500, times=4)  # more than one call's retries
    h.run(h.watch())
    await until(lambda: h.sink.lists == [["web-0"]], timeout_s=LIMIT_S)
    assert h.errors["500"] == 4


async def test_forbidden_watch_relists(h: Harness) -> None:
    h.api.fail("watch /api/v1/namespaces/*/pods", 403, times=1)
    h.run(h.watch())
    await until(lambda: len(h.sink.lists) == 2, timeout_s=LIMIT_S)
    assert h.errors["403"] == 1
    assert len(h.requests("watch")) >= 1


async def test_a_crashing_sink_does_not_end_the_watch(h: Harness) -> None:
    calls = 0

    def crash_once() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug in a sink")

    h.sink.on_list_hook = crash_once
    h.run(h.watch())
    await until(lambda: len(h.sink.lists) == 2 and len(h.requests("watch")) == 1, timeout_s=LIMIT_S)
    assert calls == 1


async def test_field_selector_is_sent(h: Harness) -> None:
    lw = ListWatch(
        kube=h.kube,
        list_call=client.CoreV1Api(h.kube.api_client).list_namespaced_pod,
        args=(NS,),
        what="pods of node-1",
        field_selector="spec.nodeName=node-1",
    )
    items, rv = await lw.list()
    assert rv
    assert isinstance(items, list)
    assert h.requests("list")[0]["fieldSelector"] == "spec.nodeName=node-1"
    assert "labelSelector" not in h.requests("list")[0]


@pytest.mark.parametrize(
    "kwargs",
    [{"watch_timeout_s": 0}, {"inactivity_timeout_s": 0}, {"resync_s": -1}],
)
def test_bad_timing_is_refused(h: Harness, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="watch_timeout_s >= 1"):
        h.watch(**kwargs)
