"""Helpers the tests share: waiting for a condition, a free loopback port, the detnet
command line, a child process's readiness line, and ``ip``/``tc`` in a namespace.

Every bound here only stops a broken test from hanging; none is a timed assertion.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

# The detnet command line of this interpreter (a child runs the code under test).
DETNET = [sys.executable, "-m", "detnet.controller"]


def _describe(pred: Callable[[], object]) -> str:
    """What ``pred`` waits for, for a failure message: its name, or a lambda's source."""
    name = getattr(pred, "__name__", "")
    if name and name != "<lambda>":
        return name
    try:
        return " ".join(inspect.getsource(pred).split())
    except (OSError, TypeError):
        return repr(pred)


async def until(
    pred: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float = 10.0,
    what: str | Callable[[], str] | None = None,
    interval_s: float = 0.01,
) -> None:
    """Poll ``pred`` (plain or async) every ``interval_s`` until it is true; raise
    AssertionError naming ``what`` (or the predicate) when ``timeout_s`` passes first.
    A callable ``what`` is called then, so it can show a child's output at that time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        ok = pred()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > end:
            said = what() if callable(what) else what
            raise AssertionError(f"not reached within {timeout_s} s: {said or _describe(pred)}")
        await asyncio.sleep(interval_s)


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now, for a child that must be told its address
    (port 0 would hide it from us)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def ready_line(
    stream: asyncio.StreamReader | None, marker: str, *, timeout_s: float = 30.0
) -> str:
    """Read ``stream`` (a child's stdout or stderr) until a line contains ``marker`` and
    return that line; fail, showing what the child said, if it ends or times out first."""
    assert stream is not None, "the child's stream is not a pipe"
    said: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while line := (await stream.readline()).decode(errors="replace"):
                if marker in line:
                    return line
                said.append(line)
    except TimeoutError:
        raise AssertionError(
            f"no line with {marker!r} within {timeout_s} s; it said: {''.join(said)[-2000:]!r}"
        ) from None
    raise AssertionError(f"the child's output ended before {marker!r}: {''.join(said)[-2000:]!r}")


def ip(*args: str) -> None:
    """Run ``ip ARGS`` (root); a failure raises with its stderr captured."""
    subprocess.run(["ip", *args], check=True, capture_output=True)


def root_qdisc(ns: str, dev: str) -> str:
    """``tc qdisc show`` of ``dev``'s root qdisc in namespace ``ns``."""
    return subprocess.run(
        ["tc", "-n", ns, "qdisc", "show", "dev", dev, "root"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
