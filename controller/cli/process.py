"""How a ``detnet`` command meets its process: the signals that stop it, a closed stdout.

- **SIGTERM and SIGINT** stop a running command the same way (it finishes what it is
  doing, prints its summary, closes what it opened: ``StopSignals``); SIGTERM then exits
  0 and SIGINT exits 130 (``INTERRUPTED``), as an interrupted program does. Before a
  command installs them, a SIGINT is a KeyboardInterrupt that ``detnet``'s main turns
  into exit 130 without a traceback, whatever was running (imports included).
- **A closed stdout** (``detnet probe --stream | head``) is a normal end for a
  pipeline: writing raises BrokenPipeError (Python ignores SIGPIPE). Python's documented
  recipe is to point the stdout descriptor at /dev/null, so that nothing written later,
  and not the interpreter's final flush, fails again (``stdout_closed``). ``PipeOutput``
  does that for the writers of a running command and tells it to stop; ``detnet``'s main
  does it for everything else. Either way the exit status is 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

INTERRUPTED = 128 + signal.SIGINT  # 130: what a shell reports for a program Ctrl-C ended
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stdout_closed() -> None:
    """Point file descriptor 1 at /dev/null: the reader of our stdout has gone."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class PipeOutput:
    """A text stream whose reader may go away: then it stops writing, points stdout at
    /dev/null when it is stdout, and calls ``on_closed`` once.

    It has the ``write``/``flush``/``isatty`` that ``print()`` and the command's writers
    use; pass it where a ``TextIO`` is expected with ``typing.cast``."""

    def __init__(self, stream: TextIO, *, on_closed: Callable[[], None] | None = None) -> None:
        self.stream = stream
        self.on_closed = on_closed
        self.closed = False

    def write(self, text: str) -> int:
        """Write ``text`` (nothing once the reader has gone)."""
        if not self.closed:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self) -> None:
        """Flush the stream (nothing once the reader has gone)."""
        if not self.closed:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._gone()

    def line(self, text: str) -> None:
        """Write ``text`` and a newline, and flush: one record for a pipeline's reader."""
        self.write(text + "\n")
        self.flush()

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        return not self.closed and self.stream.isatty()

    def fileno(self) -> int:
        """The stream's file descriptor (for a writer that bypasses the text layer)."""
        return self.stream.fileno()

    def reader_gone(self) -> None:
        """What a writer of our descriptor calls when the reader went away (EPIPE)."""
        if not self.closed:
            self._gone()

    def _gone(self) -> None:
        self.closed = True
        if self.stream is sys.stdout:
            stdout_closed()
        if self.on_closed is not None:
            self.on_closed()


class StopSignals:
    """Inside a running loop: SIGTERM and SIGINT call ``stop``; ``interrupted`` says
    whether a SIGINT was among them. Leaving the block puts the previous handlers back."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def _on(self, signum: int) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
        self._stop()

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            # asyncio.run's own SIGINT handler (cancel the main task) comes back on exit.
            self._previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self._on, sig)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)

    @property
    def status(self) -> int:
        """The exit status of a command these signals stopped: 130 after SIGINT, else 0."""
        return INTERRUPTED if self.interrupted else 0
