"""The controller process in-process: a plan, ``await Daemon.run()``, ``stop()``.

A real loopback reflector, the real engine, policy and DryRunEnforcer, the real
metrics server; no subprocess, no signal.
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from detnet.controller.config import load_config
from detnet.controller.daemon import Daemon, make_plan
from detnet.controller.errors import CommandError, ConfigError
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.engine.stream import SampleStream

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


@pytest.fixture
async def reflector():
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def write_config(tmp_path: Path, udp_port: int, *, max_jitter_ms: float = 50) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "critical_apps:\n"
        f"  - {{name: robot, host: 127.0.0.1, port: {udp_port}, protocol: UDP,"
        f" max_jitter_ms: {max_jitter_ms}, interval: 5ms}}\n"
        "best_effort_targets:\n  - {deployment: telemetry-upload, initial_bandwidth: 100}\n"
        "control: {control_interval: 50ms, window: 1s}\n"
        "policy: {decrease_cooldown: 100ms}\n"
    )
    return cfg


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_serves_health_until_stopped(reflector, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, reflector.udp_address[1]))
    plan = make_plan(config, enforcer="dry-run", listen=("127.0.0.1", 0))
    decisions = io.StringIO()
    daemon = Daemon(plan, log_stream=decisions)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.serving.wait(), 30)
        assert daemon.address is not None
        base = f"http://127.0.0.1:{daemon.address[1]}"
        status = 0
        for _ in range(300):  # until the engine has replies and the loop started; bounded
            status, _body = await asyncio.to_thread(get, base + "/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        assert (await asyncio.to_thread(get, base + "/healthz"))[0] == 200
        _, metrics = await asyncio.to_thread(get, base + "/metrics")
        assert 'detnet_probes_sent_total{protocol="udp",target="robot"}' in metrics
        assert not task.done()
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
    assert daemon.stopping
    assert "telemetry-upload=100M" in decisions.getvalue()


async def test_a_duration_ends_the_run_and_streams_every_probe(reflector, tmp_path: Path) -> None:
    # A jitter SLO no path meets: the dry run cuts, and every probe is streamed.
    cfg = write_config(tmp_path, reflector.udp_address[1], max_jitter_ms=0.000001)
    plan = make_plan(
        load_config(cfg),
        enforcer="dry-run",
        listen=("127.0.0.1", 0),
        duration_s=0.5,
        log_format="json",
    )
    decisions = io.StringIO()
    records = tmp_path / "probes.jsonl"
    with records.open("w") as file:
        daemon = Daemon(plan, stream=SampleStream(file.fileno()), log_stream=decisions)
        await asyncio.wait_for(daemon.run(), 30)  # returns by itself
    probes = [json.loads(line) for line in records.read_text().splitlines()]
    assert daemon.engine.stream_dropped == 0
    assert probes
    assert {p["target"] for p in probes} == {"robot"}
    assert sum(not p["lost"] for p in probes) == daemon.engine.stats()["robot"].received
    cuts = [
        r for r in map(json.loads, decisions.getvalue().splitlines()) if r["action"] == "decrease"
    ]
    assert cuts[0]["limits"] == {"telemetry-upload": 80}


async def test_a_plan_checks_before_anything_runs(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, 9)
    config = load_config(cfg)
    with pytest.raises(CommandError, match=r"--enforcer tc needs a tc: \{device: \.\.\.\} block"):
        make_plan(config, enforcer="tc", listen=("127.0.0.1", 0))
    with pytest.raises(CommandError, match="duration"):
        make_plan(config, enforcer="dry-run", listen=("127.0.0.1", 0), duration_s=0)
    cfg.write_text(cfg.read_text().replace("host: 127.0.0.1", "service: no-such-host.invalid"))
    with pytest.raises(ConfigError, match="cannot resolve"):
        make_plan(load_config(cfg), enforcer="dry-run", listen=("127.0.0.1", 0))
