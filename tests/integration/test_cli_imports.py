"""`detnet` imports only what the command it runs needs: the child's `sys.modules` at exit.

The child runs `detnet` as the console script does and writes the names in `sys.modules`
when it exits (atexit; `-X importtime` misses what `importlib.import_module` loads, and
the CLI loads its commands that way): `detnet --help` loads no command,
`detnet control` (its help and a real dry run) never the benchmark harness or the lab
(nor the Kubernetes API server emulation's aiohttp app through them), `detnet probe`
never kubernetes-asyncio. `detnet bench --help` is the control case: it does load the
harness, so the check sees what it looks for.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detnet.engine.reflector import ReflectorConfig, ReflectorServer

# detnet's entry point, then the names of every module loaded, one a line, into a file.
CHILD = """
import atexit, sys
def dump(path=sys.argv.pop(1)):
    with open(path, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(dump)
from detnet.controller.cli import main
sys.exit(main())
"""
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NEVER_FOR_CONTROL = ("detnet.bench", "detnet.lab")
HEAVY = ("numpy", "yaml", "aiohttp", "prometheus_client", "kubernetes_asyncio")


def under(modules: set[str], *packages: str) -> set[str]:
    """The modules of ``modules`` that are ``packages`` or inside them."""
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


async def run(tmp_path: Path, *args: str, limit_s: float = 60.0) -> tuple[int, set[str], str]:
    """Run ``detnet ARGS``: its exit status, the modules it had loaded, its stderr."""
    dump = tmp_path / "modules.txt"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(dump), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, set(dump.read_text().splitlines()), err.decode()


@pytest.fixture
async def reflector():
    server = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_the_check_sees_the_benchmark_harness_where_it_is_used(tmp_path: Path) -> None:
    rc, modules, _ = await run(tmp_path, "bench", "--help")
    assert rc == 0
    assert "detnet.bench.common" in modules
    assert "detnet.controller.cli.bench" in modules


def test_the_entry_point_loads_nothing_the_interpreter_has_not(tmp_path: Path) -> None:
    # The console script imports `main` before any of our code can catch a SIGINT: every
    # module that import loads (`signal` did, at 1 ms) widens the window for a traceback.
    child = (
        "import sys; before = set(sys.modules); from detnet.controller.cli import main; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no bytecode cache to load
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.split() == ["detnet", "detnet.controller", "detnet.controller.cli"]


async def test_help_imports_no_command(tmp_path: Path) -> None:
    rc, modules, _ = await run(tmp_path, "--help")
    assert rc == 0
    assert under(modules, "detnet") == {"detnet", "detnet.controller", "detnet.controller.cli"}
    assert not under(modules, *HEAVY)


@pytest.mark.parametrize("command", ["control", "probe", "reflect", "config", "lab"])
async def test_a_commands_help_imports_that_command_only(command: str, tmp_path: Path) -> None:
    rc, modules, _ = await run(tmp_path, command, "--help")
    assert rc == 0
    commands = under(modules, "detnet.controller.cli") - {"detnet.controller.cli"}
    assert commands == {f"detnet.controller.cli.{command}"}
    assert not under(modules, *NEVER_FOR_CONTROL, *HEAVY, "detnet.native")


async def test_a_running_control_imports_neither_bench_nor_lab(reflector, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "critical_apps:\n"
        f"  - {{name: robot, host: 127.0.0.1, port: {reflector.udp_address[1]}, protocol: UDP,"
        " max_jitter_ms: 50, interval: 10ms}\n"
        "best_effort_targets:\n  - {deployment: telemetry-upload}\n"
        "control: {control_interval: 100ms, window: 1s}\n"
    )
    rc, modules, err = await run(
        tmp_path,
        "control", "--config", str(cfg), "--dry-run", "--duration", "1s",
        "--metrics", "127.0.0.1:0",
    )  # fmt: skip
    assert rc == 0, err
    assert "detnet.controller.daemon" in modules  # it did run the controller
    assert "aiohttp" in modules  # the metrics server: aiohttp, but not the emulation's
    assert not under(modules, *NEVER_FOR_CONTROL)
    assert not under(modules, "kubernetes_asyncio")  # a dry run talks to no cluster


async def test_a_running_probe_imports_no_kubernetes_client(reflector, tmp_path: Path) -> None:
    rc, modules, err = await run(
        tmp_path,
        "probe", "--target", f"r=udp://127.0.0.1:{reflector.udp_address[1]}",
        "--duration", "300ms", "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert "detnet.engine.core" in modules
    assert not under(modules, "kubernetes_asyncio", *NEVER_FOR_CONTROL)


async def test_a_probe_of_a_config_imports_no_kubernetes_client(tmp_path: Path) -> None:
    # The config names Kubernetes workloads; reading it must not load the client.
    rc, modules, err = await run(
        tmp_path,
        "probe",
        "--config",
        str(FIXTURES / "detnet.yaml"),
        "--duration",
        "200ms",
        "--json",
    )
    assert rc == 0, err
    assert "detnet.controller.config" in modules
    assert not under(modules, "kubernetes_asyncio", *NEVER_FOR_CONTROL)
