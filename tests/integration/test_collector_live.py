"""The Prometheus collector on a live loopback engine (a reflector, an engine probing it),
served by the metrics HTTP server and checked by promtool. Label sets and series counts on
a fake engine are tests/unit/test_collector.py."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from detnet.engine.collector import EngineCollector
from detnet.engine.core import ProbeEngine, ProbeRate
from detnet.engine.httpserver import HttpServerError, MetricsServer
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.engine.targets import parse_target
from tests.conftest import requires_tool
from tests.helpers import until
from tests.unit.test_collector import ENDPOINTS, FakeEngine, generate_latest_of

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


@pytest.fixture
async def engine():
    refl = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0)))
    await refl.start()
    port = refl.udp_address[1]  # type: ignore[index]
    eng = ProbeEngine(
        [
            parse_target(f"robot=udp://127.0.0.1:{port}", interval_ns=2_000_000),
            parse_target("gone=udp://127.0.0.1:9", interval_ns=5_000_000, timeout_ns=20_000_000),
        ],
        window_ns=10**10,
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.aclose()
        await refl.close()


async def test_collector_exports_the_documented_metrics(engine):
    registry = CollectorRegistry()
    registry.register(engine.collector())
    lv = {"target": "robot", "protocol": "udp"}

    def got(name: str, labels: dict[str, str] | None = None) -> float:
        value = registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    # A two-step reply is received before it is recorded (its stamp follows it), so wait
    # on the histogram itself, not on the received count.
    await until(
        lambda: (registry.get_sample_value("detnet_probe_rtt_seconds_count", lv) or 0) >= 20,
        timeout_s=5.0,
    )
    await until(lambda: engine.totals()["gone"].lost >= 3, timeout_s=5.0)

    assert got("detnet_probes_sent_total", lv) >= 20
    assert got("detnet_probe_rtt_seconds_count", lv) >= 20
    assert got("detnet_probe_rtt_window_seconds", {**lv, "quantile": "0.99"}) > 0
    assert got("detnet_probe_jitter_seconds", {**lv, "method": "iqr"}) >= 0
    assert got("detnet_probe_ipdv_seconds", {**lv, "direction": "forward", "quantile": "0.5"}) >= 0
    assert got("detnet_probe_loss_ratio", lv) == 0
    assert got("detnet_probe_loss_ratio", {"target": "gone", "protocol": "udp"}) == 1
    assert got("detnet_probes_lost_total", {"target": "gone", "protocol": "udp"}) >= 3
    assert got("detnet_probe_timestamp_source_info", {**lv, "source": "kernel-2step"}) == 1
    assert got("detnet_probes_foreign_replies_total", lv) == 0
    assert got("detnet_engine_send_lateness_seconds_count") >= 20
    assert got("detnet_engine_native_backend_info", {"backend": engine.backend}) == 1
    assert got("detnet_engine_clock_read_seconds") > 0


async def test_rtt_buckets_never_go_down(engine):
    registry = CollectorRegistry()
    registry.register(engine.collector())
    lv = {"target": "robot", "protocol": "udp"}
    prev: list[float] = []
    for _ in range(5):
        await asyncio.sleep(0.05)
        buckets = [
            s.value
            for m in registry.collect()
            if m.name == "detnet_probe_rtt_seconds"
            for s in m.samples
            if s.name.endswith("_bucket") and s.labels["target"] == lv["target"]
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert all(b >= a for a, b in zip(prev, buckets, strict=False))  # never decrease
        prev = buckets
    assert prev[-1] > 0


async def test_http_server_serves_metrics_and_checks(engine):
    registry = CollectorRegistry()
    registry.register(engine.collector())
    ready = {"ok": False}
    server = MetricsServer(
        "127.0.0.1", 0, registry=registry, readyz=lambda: (ready["ok"], "warming up")
    )
    host, port = await asyncio.to_thread(server.start)
    try:
        await until(lambda: engine.totals()["robot"].received >= 5, timeout_s=5.0)

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                with exc:
                    return exc.code, exc.read().decode()

        code, body = await asyncio.to_thread(get, "/metrics")
        assert code == 200
        assert "detnet_probes_sent_total" in body
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        assert await asyncio.to_thread(get, "/readyz") == (503, "warming up\n")
        ready["ok"] = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
    finally:
        await asyncio.to_thread(server.stop)


@requires_tool("promtool", "prometheus")
async def test_promtool_accepts_the_exposition(engine):

    registry = CollectorRegistry()
    registry.register(engine.collector())
    await until(lambda: engine.totals()["robot"].received >= 5, timeout_s=5.0)
    text = generate_latest(registry)
    proc = await asyncio.to_thread(
        subprocess.run, ["promtool", "check", "metrics"], input=text, capture_output=True
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_listen_on_a_busy_port_is_a_clear_error():
    registry = CollectorRegistry()
    with MetricsServer("127.0.0.1", 0, registry=registry) as first:
        port = first.address[1]
        with pytest.raises(HttpServerError, match="cannot listen"):
            MetricsServer("127.0.0.1", port, registry=registry).start()


@requires_tool("promtool", "prometheus")
def test_promtool_accepts_endpoint_labels_and_the_rate_gauges():
    capped = ProbeRate(cap_pps=500.0, demand_pps=1000.0, planned_pps=480.0, stretch=2.0)
    text = generate_latest_of(EngineCollector(FakeEngine(ENDPOINTS, capped)))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
