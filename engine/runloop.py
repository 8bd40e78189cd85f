"""Run a coroutine on uvloop when it is installed, on the default asyncio loop otherwise."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """``"uvloop"`` when uvloop is importable, else ``"asyncio"``."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh uvloop (or default) event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def stop_on_signals(
    stop: asyncio.Event, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
) -> None:
    """Set ``stop`` when one of ``signals`` arrives (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)


def clear_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Remove the handlers ``stop_on_signals`` installed."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.remove_signal_handler(sig)
