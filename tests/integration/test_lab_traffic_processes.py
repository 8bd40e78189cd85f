"""The lab's traffic generator as processes: a sink counting a real sender on loopback, and
the sender refusing bad numbers (endpoint parsing is tests/unit/test_lab_traffic.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import free_port


@pytest.mark.parametrize("mode", ["steady", "bursty"])
def test_sink_counts_what_a_sender_sends(mode: str) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "detnet.lab.traffic"]
    sink = subprocess.Popen(
        [*cmd, "sink", "--listen", f"127.0.0.1:{port}", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    sender = None
    try:
        assert sink.stdout is not None
        assert json.loads(sink.stdout.readline())["event"] == "listening"
        sender = subprocess.Popen(
            [
                *cmd,
                "send",
                "--to",
                f"127.0.0.1:{port}",
                "--mode",
                mode,
                "--flows",
                "2",
                "--upload-bytes",
                "100000",
                "--period",
                "0.1",
                "--start-at",
                f"{time.time():.3f}",
            ]
        )
        total = 0
        for _ in range(30):  # up to ~6 s of reports; loopback moves this in a fraction
            report = json.loads(sink.stdout.readline())
            total += report["bytes"].get("127.0.0.1", 0)
            if total >= 400_000:
                break
        assert total >= 400_000
    finally:
        for proc in (sender, sink):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        if sink.stdout is not None:
            sink.stdout.close()
    assert sink.returncode == 0
    assert sender is not None
    assert sender.returncode == 0


def test_sender_rejects_bad_numbers() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "detnet.lab.traffic",
            "send",
            "--to",
            "127.0.0.1:9",
            "--mode",
            "steady",
            "--flows",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "must be positive" in done.stderr
