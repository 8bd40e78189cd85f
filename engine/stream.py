"""SampleStream: one JSON line per finished probe, written off the event loop.

``--stream`` must never change what is measured. Writing to a pipe from the event loop
blocks the loop as soon as the reader falls behind and the pipe buffer (64 KiB) fills:
the probe schedule then bends (send slots are skipped) and replies wait in the socket. So
the loop only appends the record to a bounded queue; a writer thread formats and writes.
When the queue is full the record is dropped and counted (``dropped``): a slow consumer
loses records, never probes.

The thread writes to the file descriptor with ``os.write``, not through a Python text
stream: a write blocked on a full pipe then holds no lock of the interpreter's (a daemon
thread blocked inside ``sys.stdout.write`` would make the interpreter abort at exit). A
reader that goes away (``| head``) closes the stream: ``on_closed`` is called once, on the
loop that started it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import select
import threading
from collections.abc import Callable

from detnet.engine.recorder import Sample

DEFAULT_CAPACITY = 65_536  # records (about 10 MB of JSON): 65 s at 1,000 probes/s
DRAIN_TIMEOUT_S = 2.0  # at close, how long queued records may take to reach the reader


def sample_json(sample: Sample) -> str:
    """A record as one compact JSON object."""
    return json.dumps(dataclasses.asdict(sample), separators=(",", ":"))


class SampleStream:
    """Call it with each ``Sample`` (an engine's ``on_sample``); a thread writes the
    lines to the file descriptor ``fd`` (flush any text stream on it first)."""

    def __init__(
        self,
        fd: int,
        *,
        capacity: int = DEFAULT_CAPACITY,
        format: Callable[[Sample], str] = sample_json,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.fd = fd
        self.capacity = capacity
        self.format = format
        self.on_closed = on_closed
        self.dropped = 0  # records the queue had no room for (or left at close)
        self.written = 0
        self.closed = False  # the reader went away, or close() was called
        self._queue: collections.deque[Sample] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="detnet-stream", daemon=True)

    def start(self) -> None:
        """Start the writer thread (on the event loop that will call ``on_closed``)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread.start()

    def __call__(self, sample: Sample) -> None:
        """Queue a record, or drop and count it when the queue is full."""
        if self.closed:
            return
        q = self._queue
        if len(q) >= self.capacity:
            self.dropped += 1
            return
        q.append(sample)
        if len(q) == 1:  # the writer may be waiting: wake it (once per burst)
            with self._ready:
                self._ready.notify()

    def close(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop the writer; what
        is still queued then counts as dropped."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.closed = True
        left = len(self._queue)
        self._queue.clear()
        self.dropped += left

    def _run(self) -> None:
        q = self._queue
        while True:
            with self._ready:
                while not q and not self._stopping:
                    self._ready.wait()
                if not q:
                    return
            lines = []
            while q:
                lines.append(self.format(q.popleft()))
            data = memoryview(("\n".join(lines) + "\n").encode())
            try:
                while data:
                    try:
                        data = data[os.write(self.fd, data) :]
                    except BlockingIOError:  # a non-blocking descriptor: wait for room
                        select.select([], [self.fd], [], 1.0)
            except OSError:
                # The reader went away (EPIPE), or the file failed (ENOSPC, EIO...).
                self._gone(len(lines))
                return
            self.written += len(lines)

    def _gone(self, lost: int) -> None:
        self.closed = True
        self.dropped += lost
        if self.on_closed is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_closed)
        elif self._loop is None:
            self.on_closed()
