"""Shared fixtures: root detection, the native backends, kernel RX stamps kept on, and
guards that fail a test which leaves asyncio tasks or network namespaces behind."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import select
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

from detnet import native
from detnet.native import _fallback

try:
    _core: ModuleType | None = importlib.import_module("detnet.native._core")
except ImportError:  # not built: test_backend_matches_environment fails the run
    _core = None

# The native backend a test runs on is a fixture for the whole example run, not per
# example: hypothesis may share it between examples. No deadline: a wall-clock bound
# per example is a timed test, and these machines are shared.
settings.register_profile(
    "detnet", suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
settings.load_profile("detnet")

IS_ROOT = os.geteuid() == 0

requires_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root (CAP_NET_ADMIN) for network namespaces; CI runs as root"
)


def requires_tool(tool: str, package: str) -> pytest.MarkDecorator:
    """Skip unless ``tool`` is on PATH (``make test`` installs ``package`` when root)."""
    return pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} not installed (Debian package {package}; `make test` installs it as root)",
    )


NATIVE_BACKENDS = [
    pytest.param(
        "cython", marks=pytest.mark.skipif(_core is None, reason="Cython extension not built")
    ),
    pytest.param("python"),
]


@pytest.fixture(params=NATIVE_BACKENDS)
def native_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on each native backend in turn (``[cython]``, ``[python]``).

    detnet's own modules look up ``native.X`` when they call it, so swapping the
    package's names swaps the backend under everything in this process; the environment
    variable carries the choice into the ``detnet`` processes a test starts."""
    impl = _core if request.param == "cython" else _fallback
    assert impl is not None
    for name in impl.__all__:
        monkeypatch.setattr(native, name, getattr(impl, name))
    monkeypatch.setattr(native, "BACKEND", request.param)
    if request.param == "python":
        monkeypatch.setenv("DETNET_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("DETNET_NO_EXTENSIONS", raising=False)
    return str(request.param)


_BACKEND_ID = re.compile(r"[\[-](cython|python)[\]-]")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many tests ran on each native backend (their ids name it), and how."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            _, bracket, params = getattr(report, "nodeid", "").rpartition("[")
            found = _BACKEND_ID.search(bracket + params)
            if found and (report.when == "call" or outcome in ("error", "skipped")):
                per = counts.setdefault(found.group(1), {})
                per[outcome] = per.get(outcome, 0) + 1
    if counts:
        line = "; ".join(
            f"{b}: " + ", ".join(f"{n} {o}" for o, n in sorted(c.items()))
            for b, c in sorted(counts.items())
        )
        terminalreporter.write_line(f"native backends: {line}")


@pytest.fixture(scope="session")
def kernel_rx_stamps() -> Iterator[None]:
    """Kernel RX timestamping switched on, and kept on, for the whole session.

    The kernel turns RX stamping on machine-wide through deferred work when the first
    socket asks for it, and off again when the last one closes: tests that open and
    close sockets would see a first packet now and then without a kernel stamp (worse on
    a busy machine). One socket asking for the whole session keeps it on.
    """
    keeper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        keeper.bind(("127.0.0.1", 0))
        keeper.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
        for _ in range(500):
            keeper.sendto(b"warm-up", keeper.getsockname())
            assert select.select([keeper], [], [], 2.0)[0]
            if keeper.recvmsg(16, 64)[1]:  # a control message: the stamp is there
                break
            select.select([], [], [], 0.01)
        else:
            pytest.fail("the kernel gave no RX timestamp in 500 tries")
        yield
    finally:
        keeper.close()


def _netns() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(autouse=True)
def _no_leftover_netns() -> object:
    before = _netns()
    yield
    left = _netns() - before
    assert not left, f"test left network namespaces behind: {sorted(left)}"


@pytest.fixture
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves asyncio tasks running (opt in with usefixtures)."""
    yield
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not left, f"tasks left behind: {left}"
