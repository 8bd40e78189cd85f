"""Shared fixtures: root detection, and guards that fail a test which leaves asyncio
tasks or network namespaces behind."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest

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
