"""SIGINT ends every `detnet` command with exit status 130 and no traceback, SIGTERM a
running one with 0, whenever the signal comes.

"During start-up" is hit exactly, not by guessing a delay: the child installs an import
hook that sends SIGINT to itself when a chosen module starts to import (and says so on
stderr, so a test whose module is never imported fails), then runs `detnet` as the
console script does. A running command gets its signal after its readiness line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from tests.helpers import DETNET

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# SIGINT to ourselves as MODULE starts importing, then detnet with the remaining argv.
INTERRUPT_AT = """
import os, signal, sys
MODULE = sys.argv.pop(1)
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            print("interrupting at", name, file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
from detnet.controller.cli import main
sys.exit(main())
"""


@pytest.fixture
async def reflector():
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def control_config(tmp_path: Path, udp_port: int) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "critical_apps:\n"
        f"  - {{name: robot, host: 127.0.0.1, port: {udp_port}, protocol: UDP,"
        " max_jitter_ms: 50, interval: 10ms}\n"
        "best_effort_targets:\n  - {deployment: telemetry-upload}\n"
        "control: {control_interval: 100ms, window: 1s}\n"
    )
    return cfg


async def interrupted_at(module: str, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", INTERRUPT_AT, module, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# (module to interrupt, command): the parser's import, a command's module, its heavy
# dependencies before the event loop starts, and inside the loop before the command's
# own signal handlers exist (asyncio.run's handler cancels, detnet still exits 130).
START_UP = [
    ("argparse", ["probe", "--help"]),
    ("detnet.controller.cli.probe", ["probe", "--target", "x=udp://127.0.0.1:9"]),
    ("numpy", ["probe", "--target", "x=udp://127.0.0.1:9", "--duration", "30s"]),
    ("yaml", ["probe", "--config", str(FIXTURES / "detnet.yaml"), "--duration", "30s"]),
    ("yaml", ["config", "check", str(FIXTURES / "detnet.yaml")]),
    ("detnet.engine.reflector", ["reflect", "--udp", "127.0.0.1:0"]),
    ("detnet.bench.stats", ["bench", "stats", "--help"]),
    ("detnet.lab.scenario", ["lab", "--congestion", "1"]),
]


@pytest.mark.parametrize(("module", "argv"), START_UP, ids=lambda v: str(v).split()[0][:40])
async def test_sigint_during_start_up_exits_130_quietly(module: str, argv: list[str]) -> None:
    rc, out, err = await interrupted_at(module, *argv)
    assert (rc, err) == (130, f"interrupting at {module}\n")
    assert out == ""


@pytest.mark.parametrize("module", ["detnet.controller.daemon", "aiohttp", "prometheus_client"])
async def test_sigint_while_control_starts_exits_130_quietly(
    module: str, tmp_path: Path, reflector
) -> None:
    cfg = control_config(tmp_path, reflector.udp_address[1])
    rc, out, err = await interrupted_at(
        module, "control", "--config", str(cfg), "--dry-run", "--metrics", "127.0.0.1:0"
    )
    assert (rc, err) == (130, f"interrupting at {module}\n")
    assert out == ""


async def _spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *DETNET, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, bytes, bytes]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_a_running_probe_stops_prints_its_summary_and_exits(reflector, sig, status):
    proc = await _spawn(
        "probe", "--target", f"r=udp://127.0.0.1:{reflector.udp_address[1]}",
        "--interval", "5ms", "--stream", "--json",
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)  # probing: a record came
    assert json.loads(first)["target"] == "r"
    proc.send_signal(sig)
    rc, out, err = await _finish(proc)
    assert (rc, err) == (status, b"")
    summary = json.loads(out.splitlines()[-1])
    assert summary["targets"]["r"]["received"] > 0


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_a_running_reflector_stops_and_exits(sig, status):
    proc = await _spawn("reflect", "--udp", "127.0.0.1:0", "--stats-interval", "0", "-v")
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert ready.startswith(b"detnet reflect: serving udp 127.0.0.1:")
    proc.send_signal(sig)
    rc, _out, err = await _finish(proc)
    assert rc == status
    assert err.startswith(b"detnet reflect: received=")  # -v: the last stats line
    assert b"Traceback" not in err


async def test_a_quiet_reflector_prints_no_counters() -> None:
    proc = await _spawn("reflect", "--udp", "127.0.0.1:0")
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert ready.startswith(b"detnet reflect: serving udp 127.0.0.1:")
    proc.send_signal(signal.SIGTERM)
    rc, _out, err = await _finish(proc)
    assert (rc, err) == (0, b"")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_a_running_controller_stops_and_exits(reflector, tmp_path: Path, sig, status):
    cfg = control_config(tmp_path, reflector.udp_address[1])
    proc = await _spawn("control", "--config", str(cfg), "--dry-run", "--metrics", "127.0.0.1:0")
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"metrics on http://127.0.0.1:" in ready
    decision = await asyncio.wait_for(proc.stdout.readline(), 30)  # the loop is stepping
    assert b" hold " in decision
    proc.send_signal(sig)
    rc, _out, err = await _finish(proc)
    assert (rc, err) == (status, b"")
