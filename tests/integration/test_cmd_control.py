"""`detnet control` end to end: a real reflector on loopback, the real engine, the policy
and DryRunEnforcer, run as a subprocess; plus `detnet config check` and bad input."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import textwrap
import urllib.request
from pathlib import Path

import pytest

from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from tests.helpers import DETNET, free_port, until

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def config_text(udp_port: int, tcp_port: int, *, max_jitter_ms: float) -> str:
    return textwrap.dedent(
        f"""\
        critical_apps:
          - name: robot-control
            host: 127.0.0.1
            port: {udp_port}
            protocol: UDP
            interval: 10ms
            max_jitter_ms: {max_jitter_ms}
          - name: safety-scanner
            host: 127.0.0.1
            port: {tcp_port}
            protocol: TCP
            mode: connect
            interval: 50ms
            max_latency_ms: 500
        best_effort_targets:
          - deployment: telemetry-upload
            initial_bandwidth: 100
          - name: erp-dashboard
            selector: app=erp
        control:
          control_interval: 100ms
          window: 1s
        policy:
          decrease_cooldown: 300ms
          increase_interval: 300ms
        """
    )


async def run_detnet(*args: str, limit_s: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *DETNET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def reflector():
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_dry_run_cuts_on_violation_and_streams(reflector, tmp_path: Path) -> None:
    # A jitter SLO no real path meets (1 ns): every window violates, so the loop must cut
    # once per cooldown, never increase, and log each cut as JSON.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        config_text(reflector.udp_address[1], reflector.tcp_address[1], max_jitter_ms=0.000001)
    )
    stream = tmp_path / "probes.jsonl"
    rc, out, err = await run_detnet(
        "control",
        "--config",
        str(cfg),
        "--dry-run",
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--duration",
        "2",
        "--stream",
        str(stream),
    )
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records, err
    assert all(r["event"] == "decision" for r in records)
    cuts = [r for r in records if r["action"] == "decrease"]
    assert cuts, records
    assert not [r for r in records if r["action"] == "increase"]
    first = cuts[0]
    assert first["previous"] == {"telemetry-upload": 100, "erp-dashboard": 1000}
    assert first["limits"] == {"telemetry-upload": 80, "erp-dashboard": 800}
    assert any(r.startswith("robot-control jitter_iqr") for r in first["reasons"])
    assert isinstance(first["enforce_s"], float)
    for a, b in itertools.pairwise(cuts):
        assert b["ts"] - a["ts"] >= 0.29  # one cut per 300 ms cooldown at most
    probes = [json.loads(line) for line in stream.read_text().splitlines()]
    assert {p["target"] for p in probes} == {"robot-control", "safety-scanner"}
    assert set(probes[0]) == {
        "target",
        "seq",
        "sent_ns",
        "rtt_ns",
        "user_rtt_ns",
        "fwd_ns",
        "back_ns",
        "lost",
        "timestamp_source",
    }
    assert any(p["rtt_ns"] is not None for p in probes)


async def test_sigterm_exits_zero_and_serves_health(reflector, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        config_text(reflector.udp_address[1], reflector.tcp_address[1], max_jitter_ms=50)
    )
    port = free_port()  # port 0 would hide the address from us
    proc = await asyncio.create_subprocess_exec(
        *DETNET,
        "control",
        "--config",
        str(cfg),
        "--dry-run",
        "--metrics",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError:
                return 0, ""

        async def ready() -> bool:
            return (await asyncio.to_thread(get, "/readyz"))[0] == 200

        await until(ready, what="/readyz to answer 200", interval_s=0.1)
        status, _ = await asyncio.to_thread(get, "/healthz")
        assert status == 200
        status, metrics = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        limit = 'detnet_egress_limit_bytes_per_second{node="",workload="telemetry-upload"}'
        assert f"{limit} 1.25e+07" in metrics
        assert 'detnet_slo_threshold_seconds{signal="jitter",target="robot-control"}' in metrics
        assert "detnet_probe_rtt_seconds_bucket" in metrics
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


async def test_bad_config_exits_2_before_anything(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        config_text(5201, 5202, max_jitter_ms=1).replace("max_jitter_ms: 1", 'max_jitter_ms: "abc"')
    )
    rc, out, err = await run_detnet("control", "--config", str(cfg), "--dry-run")
    assert rc == 2
    assert out == ""
    assert err.strip() == (
        f"detnet control: error: {cfg}:7: critical_apps[0].max_jitter_ms: "
        'must be a positive number, got "abc"'
    )


async def test_tc_enforcer_needs_devices(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text(5201, 5202, max_jitter_ms=1))
    rc, _, err = await run_detnet("control", "--config", str(cfg), "--enforcer", "tc")
    assert rc == 2
    assert "--enforcer tc needs a tc: {device: ...} block" in err
    assert "telemetry-upload, erp-dashboard" in err


async def test_config_check_prints_effective_config() -> None:
    rc, out, err = await run_detnet("config", "check", str(FIXTURES / "prototype-configmap.yaml"))
    assert rc == 0
    assert "decrease_factor: 0.2" in out
    assert "window_size: 20" in out
    assert "control.step_down" in err  # the warning about the prototype's Mbit/s figure


async def test_config_check_bad_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("critical_apps: [\n")
    rc, out, err = await run_detnet("config", "check", str(bad))
    assert rc == 2
    assert out == ""
    assert err.startswith(f"detnet config: error: {bad}:2: invalid YAML")
    assert len(err.strip().splitlines()) == 1
