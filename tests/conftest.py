"""Shared fixtures: root detection, the native backends, kernel RX stamps kept on, and
guards that fail a test which leaves asyncio tasks or network namespaces behind."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
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


_BACKEND_OF: dict[str, str] = {}  # test id -> the native backend it ran on


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Note which tests run on a given native backend: through ``native_backend``, or
    handed a backend module as a parameter (the parity tests)."""
    names = {id(_fallback): "python", **({id(_core): "cython"} if _core else {})}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for key, value in params.items():
            backend = value if key == "native_backend" else names.get(id(value))
            if backend:
                _BACKEND_OF[item.nodeid] = str(backend)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many tests ran on each native backend, and how they ended."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            backend = _BACKEND_OF.get(getattr(report, "nodeid", ""))
            if backend and (report.when == "call" or outcome in ("error", "skipped")):
                per = counts.setdefault(backend, {})
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


# How long a task already cancelling at a test's end may take to finish (not a timing
# assertion: a leaked task never finishes, a cancelled one takes a few loop rounds).
LEAK_GRACE_S = 1.0


@pytest.fixture
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves asyncio tasks running (every coroutine test has it:
    see ``_task_leak_guard``).

    Its teardown runs after every other fixture of the test is torn down (it is set up
    first), on the test's loop while it still runs. A task already cancelling gets a
    moment to finish; one still pending then is a leak: it is cancelled and reported."""
    yield
    me = asyncio.current_task()

    def pending() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    await asyncio.sleep(0)  # one round: callbacks that finish a task already scheduled
    cancelling = [t for t in pending() if t.cancelling()]
    if cancelling:
        await asyncio.wait(cancelling, timeout=LEAK_GRACE_S)
    left = pending()
    for task in left:
        task.cancel()
    assert not left, f"test left asyncio tasks running: {left}"


@pytest.fixture(autouse=True)
def _task_leak_guard(request: pytest.FixtureRequest) -> None:
    """Give every coroutine test the ``no_leftover_tasks`` guard. Autouse fixtures are set
    up before the test's own, so the guard is torn down after them (an engine fixture
    closing its tasks has run by then)."""
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("no_leftover_tasks")
