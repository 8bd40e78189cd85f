"""The metrics/health HTTP server under hostile input, over real loopback connections.

Each class of abuse from the first release has its regression test: a burst of
concurrent scrapes (listen backlog), slowloris heads, clients that go away before the
answer, readers that stop reading, floods past the connection bound. Timeouts are
configured small and the tests wait for the condition, never for a wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from detnet.engine.httpserver import HttpLimits, HttpServerError, MetricsServer
from tests.helpers import until

Response = tuple[int, dict[str, str], bytes]


class _Wide:
    """A collector with many series: an exposition of about ``samples * 40`` bytes."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("detnet_test_wide", "many series", labels=["i"])
        for i in range(self.samples):
            family.add_metric([str(i)], float(i))
        yield family


def _registry(samples: int = 0) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("detnet_test_scrapes", "a counter", registry=registry).inc(3)
    if samples:
        registry.register(_Wide(samples))
    return registry


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    servers: list[MetricsServer] = []

    def start(*, registry: CollectorRegistry | None = None, **kwargs: object) -> MetricsServer:
        server = MetricsServer(
            "127.0.0.1",
            0,
            registry=registry or _registry(),
            **kwargs,  # type: ignore[arg-type]
        )
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    assert not [t for t in threading.enumerate() if t.name == "detnet-http"]


def _parse(data: bytes) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out = bytearray()
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += body[:size]
            body = body[size + 2 :]
        body = bytes(out)
    elif "content-length" in headers:
        assert len(body) == int(headers["content-length"])
    return status, headers, body


def _head(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _get(
    server: MetricsServer, path: str = "/metrics", headers: dict[str, str] | None = None
) -> Response:
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        writer.write(_head(path, headers))
        return _parse(await reader.read())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Read until the server closes (EOF or reset); True when it did."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return True


async def test_routes_checks_and_unknown_paths(serve):
    ready = {"ok": False}

    async def usage(request: web.Request) -> web.StreamResponse:
        return web.json_response({"pods": []})

    def broken() -> tuple[bool, str]:
        raise RuntimeError("no engine")

    server = serve(
        readyz=lambda: (ready["ok"], "warming up"), healthz=broken, routes={"/v1/usage": usage}
    )
    assert (await _get(server, "/readyz"))[::2] == (503, b"warming up\n")
    ready["ok"] = True
    assert (await _get(server, "/readyz"))[::2] == (200, b"warming up\n")
    assert (await _get(server, "/healthz"))[::2] == (503, b"check failed: no engine\n")
    assert (await _get(server, "/v1/usage"))[::2] == (200, b'{"pods": []}')
    assert (await _get(server, "/nope"))[0] == 404


def test_route_paths_must_be_new_and_absolute():
    async def h(request: web.Request) -> web.StreamResponse:
        return web.Response()

    for path in ("/metrics", "v1/usage"):
        with pytest.raises(HttpServerError, match="route"):
            MetricsServer("127.0.0.1", 0, registry=_registry(), routes={path: h})


async def test_exposition_negotiation_is_prometheus_clients(serve):
    server = serve()
    status, headers, body = await _get(server)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "content-encoding" not in headers
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "detnet_test_scrapes" in names

    status, headers, body = await _get(
        server, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    status, headers, body = await _get(server, headers={"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip"
    assert b"detnet_test_scrapes_total 3.0" in gzip.decompress(body)


def _listen_backlog(port: int) -> int:
    """The listening socket's backlog as the kernel holds it (``ss`` Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "LISTEN", out
    return int(out[2])


def _sysctl(name: str) -> str:
    return Path("/proc/sys", name).read_text().strip()


async def test_two_hundred_concurrent_scrapes_are_all_answered(serve):
    server = serve(registry=_registry(samples=100))
    somaxconn = int(_sysctl("net/core/somaxconn"))
    # The first release's backlog of 5 left most of a burst waiting for SYN retransmits.
    assert _listen_backlog(server.address[1]) == min(HttpLimits().backlog, somaxconn) >= 200
    async with asyncio.timeout(60):
        answers = await asyncio.gather(*(_get(server) for _ in range(200)))
    assert [status for status, _, _ in answers] == [200] * 200
    assert all(b"detnet_test_wide" in body for _, _, body in answers)
    stats = server.stats()
    assert (stats["accepted"], stats["refused"], stats["evicted"]) == (200, 0, 0)


async def _slowloris(server: MetricsServer, *, trickle: bool) -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")  # and never the blank line

    async def dribble() -> None:
        with contextlib.suppress(ConnectionError):
            while not reader.at_eof():
                writer.write(b"X-Slow: 1\r\n")  # bytes keep coming: no reset of the deadline
                await writer.drain()
                await asyncio.sleep(0.05)

    if trickle:
        task = asyncio.create_task(dribble())
        reader._dribble = task  # type: ignore[attr-defined]
    reader._writer = writer  # type: ignore[attr-defined]
    return reader


async def test_slowloris_heads_are_closed_and_do_not_block_a_scrape(serve):
    server = serve(limits=HttpLimits(header_timeout=0.5))
    readers = [await _slowloris(server, trickle=i % 2 == 0) for i in range(100)]
    try:
        await until(lambda: server.stats()["open"] == 100, timeout_s=30.0)
        status, _, _ = await _get(server)  # answered while the 100 are still held
        assert status == 200
        async with asyncio.timeout(30):
            closed = await asyncio.gather(*(_closed_by_server(r) for r in readers))
        assert all(closed)
        await until(lambda: server.stats()["header_timeouts"] == 100, timeout_s=30.0)
        assert server.stats()["open"] == 0
    finally:
        for r in readers:
            task = getattr(r, "_dribble", None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            r._writer.close()  # type: ignore[attr-defined]


async def test_idle_connection_is_closed_after_the_idle_timeout(serve):
    server = serve(limits=HttpLimits(idle_timeout=0.3))
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        async with asyncio.timeout(30):
            assert await _closed_by_server(reader)
        # A keep-alive connection that answered a request idles out the same way.
        reader2, writer2 = await asyncio.open_connection(*server.address)
        writer2.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert (await reader2.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        async with asyncio.timeout(30):
            assert await _closed_by_server(reader2)
        writer2.close()
    finally:
        writer.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_clients_that_go_away_leave_no_trace(serve, caplog, capfd, reset):
    server = serve(registry=_registry(samples=1000))  # ~40 kB: written after the client left
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        sock = socket.socket()
        sock.connect(server.address)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.sendall(_head("/metrics"))
        sock.close()
    await until(
        lambda: server.stats()["accepted"] == 50 and server.stats()["open"] == 0, timeout_s=30.0
    )
    assert (await _get(server, "/healthz"))[0] == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []
    assert capfd.readouterr().err == ""


async def test_malformed_requests_get_400_without_a_traceback(serve, caplog, capfd):
    server = serve(limits=HttpLimits(max_line_size=1024, max_headers=8))
    caplog.set_level(logging.DEBUG)
    cases = [
        b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",  # request line too long
        b"GET / HTTP/1.1\r\nX: " + b"b" * 9000 + b"\r\n\r\n",  # header field too long
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100) + b"\r\n\r\n",  # TLS hello
    ]
    for data in cases:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(data)
        status = (await reader.read()).split(b" ", 2)[1]
        writer.close()
        assert status == b"400", data[:40]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []
    assert capfd.readouterr().err == ""
    assert (await _get(server, "/healthz"))[0] == 200


async def test_a_reader_that_stops_reading_is_cut_off(serve):
    big = b"x" * (32 << 20)  # far more than both socket buffers and the transport's

    async def download(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    server = serve(routes={"/big": download}, limits=HttpLimits(write_timeout=0.3))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(server.address)
    try:
        sock.sendall(_head("/big"))  # and never read
        await until(lambda: server.stats()["write_timeouts"] == 1, timeout_s=30.0)
        await until(lambda: server.stats()["open"] == 0, timeout_s=30.0)
        assert (await _get(server, "/healthz"))[0] == 200
    finally:
        sock.close()


async def test_failing_and_slow_routes_answer_500_and_503_in_one_log_line(serve, caplog):
    async def broken(request: web.Request) -> web.StreamResponse:
        raise ValueError("boom")

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    server = serve(
        routes={"/broken": broken, "/slow": slow}, limits=HttpLimits(handler_timeout=0.2)
    )
    assert (await _get(server, "/broken"))[::2] == (500, b"internal error\n")
    assert (await _get(server, "/slow"))[::2] == (503, b"timed out\n")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "GET /broken failed: ValueError: boom",
        "GET /slow: no answer within 0.2 s",
    ]
    assert not any(r.exc_info for r in warnings)


async def test_full_table_evicts_the_oldest_idle_connection(serve):
    server = serve(limits=HttpLimits(max_connections=3))
    conns = [await asyncio.open_connection(*server.address) for _ in range(3)]
    try:
        await until(lambda: server.stats()["open"] == 3, timeout_s=30.0)
        assert (await _get(server, "/healthz"))[0] == 200
        assert server.stats()["evicted"] == 1
        async with asyncio.timeout(30):
            assert await _closed_by_server(conns[0][0])  # the oldest went
        for reader, writer in conns[1:]:  # the others still work
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in conns:
            writer.close()


async def test_when_every_connection_is_busy_a_newcomer_gets_503(serve):
    gate = threading.Event()
    entered = []

    async def hold(request: web.Request) -> web.StreamResponse:
        entered.append(1)
        await asyncio.to_thread(gate.wait)
        return web.Response(text="done\n")

    server = serve(
        routes={"/hold": hold}, limits=HttpLimits(max_connections=4, handler_timeout=300)
    )
    held = [asyncio.create_task(_get(server, "/hold")) for _ in range(4)]
    try:
        await until(lambda: len(entered) == 4, timeout_s=30.0)
        # Refused before anything is read: a client that already sent its request may see
        # the close as a reset, so this one reads first.
        reader, writer = await asyncio.open_connection(*server.address)
        status, _, body = _parse(await reader.read())
        writer.close()
        assert (status, body) == (503, b"too many connections\r\n")
        assert server.stats()["refused"] == 1
    finally:
        gate.set()
    assert [(await t)[::2] for t in held] == [(200, b"done\n")] * 4
    assert (await _get(server, "/healthz"))[0] == 200


def test_unusable_addresses_and_limits_are_clear_errors():
    with pytest.raises(HttpServerError, match=r"cannot listen on no-such-host\.invalid:0"):
        MetricsServer("no-such-host.invalid", 0, registry=_registry()).start()
    with pytest.raises(HttpServerError, match=r"cannot listen on 192\.0\.2\.1:0"):
        MetricsServer("192.0.2.1", 0, registry=_registry()).start()  # not our address
    with pytest.raises(HttpServerError, match="header_timeout must be > 0"):
        HttpLimits(header_timeout=0)
    with pytest.raises(HttpServerError, match="max_connections must be at least 1"):
        HttpLimits(max_connections=0)


def test_stop_closes_the_port_and_start_twice_is_an_error():
    server = MetricsServer("127.0.0.1", 0, registry=_registry())
    host, port = server.start()
    try:
        with pytest.raises(HttpServerError, match="already started"):
            server.start()
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
