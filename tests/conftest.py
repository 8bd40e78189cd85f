"""Shared fixtures: root detection, and guards that fail a test which leaves asyncio
tasks or network namespaces behind."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves asyncio tasks running (opt in with usefixtures)."""
    yield
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not left, f"tasks left behind: {left}"
