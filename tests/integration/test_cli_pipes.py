"""A reader that goes away (`detnet probe --stream | head`) ends `detnet` quietly, exit 0.

Real pipes: either the test reads a few lines and closes its end while the command
still writes, or the command starts with a pipe whose reading end is already closed.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import pytest

from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from tests.helpers import DETNET

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
async def reflector():
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def _read_then_hang_up(argv: tuple[str, ...], lines: int) -> tuple[int, bytes]:
    with subprocess.Popen([*DETNET, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            for _ in range(lines):
                assert proc.stdout.readline()
            proc.stdout.close()  # our reading end: the reader has gone
            err = proc.stderr.read()  # until the command exits and closes it
            return proc.wait(timeout=30), err
        finally:
            if proc.poll() is None:
                proc.kill()


async def read_then_hang_up(*argv: str, lines: int = 3) -> tuple[int, bytes]:
    """Run ``detnet ARGV``, read ``lines`` lines of its stdout, close the pipe; the exit
    status and stderr."""
    return await asyncio.wait_for(asyncio.to_thread(_read_then_hang_up, argv, lines), 60)


def into_a_closed_pipe(*argv: str) -> tuple[int, bytes]:
    """Run ``detnet ARGV`` with stdout a pipe nobody reads any more."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*DETNET, *argv], stdout=write_end, stderr=subprocess.PIPE, timeout=60, check=False
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


def _control_config(tmp_path: Path, udp_port: int) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "critical_apps:\n"
        f"  - {{name: robot, host: 127.0.0.1, port: {udp_port}, protocol: UDP,"
        " max_jitter_ms: 50, interval: 5ms}\n"
        "best_effort_targets:\n  - {deployment: telemetry-upload}\n"
        "control: {control_interval: 10ms, window: 1s}\n"
    )
    return cfg


async def test_probe_stream_into_head(reflector) -> None:
    rc, err = await read_then_hang_up(
        "probe", "--target", f"r=udp://127.0.0.1:{reflector.udp_address[1]}",
        "--interval", "2ms", "--stream",
    )  # fmt: skip
    assert (rc, err) == (0, b"")


async def test_control_stream_to_stdout_into_head(reflector, tmp_path: Path) -> None:
    cfg = _control_config(tmp_path, reflector.udp_address[1])
    rc, err = await read_then_hang_up(
        "control", "--config", str(cfg), "--dry-run", "--metrics", "127.0.0.1:0",
        "--stream", "-",
    )  # fmt: skip
    assert rc == 0
    first, *decisions = err.decode().splitlines()  # decisions go to stderr here
    assert "metrics on http://" in first
    assert all(re.match(r"\d\d:\d\d:\d\d (hold|decrease|increase) ", d) for d in decisions)


async def test_control_decision_log_into_head(reflector, tmp_path: Path) -> None:
    # A jitter SLO no path meets: a cut every step, so decisions keep coming.
    cfg = _control_config(tmp_path, reflector.udp_address[1])
    cfg.write_text(cfg.read_text().replace("max_jitter_ms: 50", "max_jitter_ms: 0.000001"))
    rc, err = await read_then_hang_up(
        "control", "--config", str(cfg), "--dry-run", "--metrics", "127.0.0.1:0",
        "--log-format", "json", lines=1,
    )  # fmt: skip
    assert rc == 0
    assert err.decode().splitlines()[1:] == []


async def test_probe_summary_into_a_closed_pipe(reflector) -> None:
    port = reflector.udp_address[1]
    for output in ([], ["--json"]):
        rc, err = await asyncio.to_thread(
            into_a_closed_pipe,
            "probe", "--target", f"r=udp://127.0.0.1:{port}", "--duration", "200ms", *output,
        )  # fmt: skip
        assert (rc, err) == (0, b"")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["probe", "--help"], ["config", "check", str(FIXTURES / "detnet.yaml")]],
)
def test_help_and_config_check_into_a_closed_pipe(argv: list[str]) -> None:
    assert into_a_closed_pipe(*argv) == (0, b"")
