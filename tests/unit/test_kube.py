"""The Kubernetes client pieces without a server: the QPS limiter on a fake clock, watch
event parsing, object helpers, client configuration errors."""

from __future__ import annotations

import asyncio

import pytest

from detnet.controller.errors import EnforcementError
from detnet.controller.kube import DEFAULT_BURST, DEFAULT_CONCURRENCY, DEFAULT_QPS
from detnet.controller.kube.api import (
    USER_AGENT_PREFIX,
    QpsLimiter,
    load_client_configuration,
    new_api_client,
)
from detnet.controller.kube.listwatch import ListWatch
from detnet.controller.kube.objects import (
    WatchEvent,
    annotations_of,
    name_of,
    parse_watch_event,
    resource_version,
)


class FakeTime:
    """A nanosecond clock that only moves when the limiter sleeps (or a test says so)."""

    def __init__(self) -> None:
        self.now_ns = 0
        self.slept: list[float] = []

    @property
    def now(self) -> float:
        return self.now_ns / 1e9

    def clock(self) -> int:
        return self.now_ns

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_ns += round(seconds * 1e9)


def bucket(rate: float, burst: int, t: FakeTime) -> QpsLimiter:
    return QpsLimiter(qps=rate, burst=burst, clock=t.clock, sleep=t.sleep)


async def test_bucket_lets_a_burst_through_then_paces_at_the_rate() -> None:
    t = FakeTime()
    b = bucket(10, 3, t)
    for _ in range(3):
        await b.acquire()
    assert t.slept == []
    for _ in range(4):
        await b.acquire()
    assert t.slept == [0.1] * 4  # 4 more at 10/s, one sleep each: no spin on rounding
    t.now_ns += 10_000_000_000  # idle: refills, but never beyond the burst
    for _ in range(3):
        await b.acquire()
    await b.acquire()
    assert t.now == pytest.approx(10.5)


async def test_urgent_goes_first_and_the_queue_pays_its_debt() -> None:
    t = FakeTime()
    b = bucket(10, 1, t)
    await b.acquire()  # the bucket is empty now
    await b.acquire(urgent=True)  # at once, in debt
    assert t.slept == []
    await b.acquire()  # waits for the debt and its own token
    assert t.slept == [pytest.approx(0.2)]


async def test_waiters_are_served_in_order() -> None:
    t = FakeTime()
    b = bucket(100, 1, t)
    order: list[int] = []

    async def take(i: int) -> None:
        await b.acquire()
        order.append(i)

    await asyncio.gather(*(take(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert t.now == pytest.approx(0.04)
    assert len(t.slept) == 4


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (float("nan"), 1)])
def test_bucket_refuses_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be > 0 and burst >= 1"):
        QpsLimiter(qps=rate, burst=burst)


def test_one_set_of_client_defaults() -> None:
    assert (DEFAULT_QPS, DEFAULT_BURST, DEFAULT_CONCURRENCY) == (100.0, 50, 8)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"type":"ADDED","object":{"metadata":{"name":"a"}}}\n', "ADDED"),
        ('{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"7"}}}', "BOOKMARK"),
        (b'{"type":"ERROR","object":{"kind":"Status","code":410}}', "ERROR"),
    ],
)
def test_parse_watch_event(line: bytes | str, expected: str) -> None:
    assert parse_watch_event(line, what="watch pods").type == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "unparsable watch event"),
        (b"[1, 2]", "watch event is list, not an object"),
        (b'{"type":"ADDED"}', "unknown type 'ADDED' or no object"),
        (b'{"type":"SYNC","object":{}}', "unknown type 'SYNC'"),
        (b'{"type":"ADDED","object":"pod"}', "or no object"),
    ],
)
def test_parse_watch_event_refuses_what_is_not_an_event(line: bytes, message: str) -> None:
    with pytest.raises(EnforcementError, match=f"^watch pods: .*{message}"):
        parse_watch_event(line, what="watch pods")


def test_object_helpers() -> None:
    obj = {"metadata": {"name": "a", "resourceVersion": "12", "annotations": {"k": "v"}}}
    assert (name_of(obj), resource_version(obj), annotations_of(obj)) == ("a", 12, {"k": "v"})
    assert WatchEvent("ADDED", obj).resource_version == "12"
    for broken in ({}, {"metadata": None}, {"metadata": {"resourceVersion": "x1"}}):
        assert (name_of(broken), resource_version(broken), annotations_of(broken)) == ("", 0, {})
    assert WatchEvent("BOOKMARK", {}).resource_version == ""


BAD_KUBECONFIGS = [
    "clusters: [\n",  # not YAML
    "[1, 2]\n",  # not a mapping
    "clusters: 5\n",
    "current-context: x\n",
    "apiVersion: v1\nclusters: [{name: c, cluster: {server: 5}}]\n"
    "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
    "users: [{name: u, user: {}}]\ncurrent-context: x\n",
]


@pytest.mark.parametrize("text", [None, *BAD_KUBECONFIGS])
async def test_no_usable_kubeconfig_is_one_clear_error(tmp_path, text: str | None) -> None:
    path = tmp_path / "config"
    if text is not None:
        path.write_text(text)
    with pytest.raises(EnforcementError, match=r"^no Kubernetes access: .*kubeconfig \(.+\)$"):
        await load_client_configuration(kubeconfig=str(path))


async def test_api_client_names_the_caller() -> None:
    from kubernetes_asyncio import client

    api = new_api_client(client.Configuration(), identity="detnet-a")
    try:
        assert api.user_agent == f"{USER_AGENT_PREFIX}detnet-a" == "detnet/detnet-a"
    finally:
        await api.close()


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Chunk too big"),
        __import__("aiohttp").http_exceptions.LineTooLong(b"x", "4194304"),
    ],
)
async def test_an_over_long_watch_line_is_our_error_not_a_crash(error: Exception) -> None:
    class Content:
        async def readline(self) -> bytes:
            raise error

    class Response:
        content = Content()

    lw = ListWatch.__new__(ListWatch)
    with pytest.raises(EnforcementError, match="unreadable watch stream"):
        await lw._readline(Response(), "watch pods")  # type: ignore[arg-type]
