"""The image installs what we test: the wheel, built from this tree with the Cython core
compiled, installed into a fresh virtual environment outside the checkout, runs.

No container image can be built on these machines (no registry for base images), so this
checks what deploy/Dockerfile relies on: `pip wheel .` builds, the wheel installs with its
declared dependencies only, and the installed `detnet` (not the checkout's) loads the
Cython backend, checks the shipped config and measures a reflector."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DETNET_NO_EXTENSIONS")}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
         cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("detnet-*.whl")
    assert "-cp3" in wheel.name, f"{wheel.name}: not a platform wheel (no compiled core?)"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, detnet = env_dir / "bin" / "python", env_dir / "bin" / "detnet"
    _run([str(py), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)

    where = _run([str(py), "-c", "import detnet.native as n; print(n.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout
    version = _run([str(detnet), "--version"], cwd=tmp_path)
    assert "native backend: cython" in version.stdout, version.stdout
    _run([str(detnet), "config", "check", str(ROOT / "deploy" / "base" / "configmap.yaml")],
         cwd=tmp_path)  # fmt: skip

    port = free_port(socket.SOCK_DGRAM)
    with subprocess.Popen(
        [str(detnet), "reflect", "--udp", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as reflector:
        try:
            assert reflector.stderr is not None
            assert "serving udp" in reflector.stderr.readline()
            probe = _run(
                [str(detnet), "probe", "--target", f"r=udp://127.0.0.1:{port}",
                 "--duration", "1", "--json"],
                cwd=tmp_path,
                timeout=30,
            )  # fmt: skip
        finally:
            reflector.terminate()
            reflector.wait(timeout=10)
    report = json.loads(probe.stdout)
    assert report["backend"] == "cython"
    assert report["targets"]["r"]["received"] > 0
