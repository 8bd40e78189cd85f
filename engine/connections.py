"""A bounded table of open connections that makes room by closing the stalest one.

Both network edges of the engine that accept TCP connections (the reflector's echo port
and the metrics/health HTTP server) admit every new connection through one
``ConnectionTable``. When the table is full, the connection that has gone longest
without completing a message (a frame, an HTTP request) is handed back to be closed, so
a flood of idle or stalled connections is pushed out by newcomers instead of locking
legitimate clients out. A connection that is busy (an HTTP handler running) is never
evicted; when every connection is busy the newcomer is refused.

Sans-I/O: the table orders connections by when they last made progress, as told by its
caller; it never reads a clock and never touches a socket.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class TableFull(Exception):
    """Every connection in the table is busy: the newcomer must be refused."""


class ConnectionTable(Generic[C]):
    """At most ``limit`` connections; the least recently progressing idle one goes first."""

    def __init__(self, *, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"connection limit must be at least 1, got {limit}")
        self.limit = limit
        # Evictable connections, least recently progressing first.
        self._idle: OrderedDict[C, None] = OrderedDict()
        self._busy: set[C] = set()

    def admit(self, conn: C) -> C | None:
        """Add ``conn`` (as idle); return the connection evicted to make room, if any.

        The evicted connection is already out of the table: the caller closes it.
        Raises TableFull, leaving the table unchanged, when every connection is busy.
        """
        victim: C | None = None
        if len(self) >= self.limit:
            if not self._idle:
                raise TableFull
            victim, _ = self._idle.popitem(last=False)
        self._idle[conn] = None
        return victim

    def progressed(self, conn: C) -> None:
        """``conn`` completed a message: it becomes the last to be evicted."""
        if conn in self._idle:
            self._idle.move_to_end(conn)

    def busy(self, conn: C) -> None:
        """``conn`` is being served: it cannot be evicted until ``done()``."""
        if conn in self._idle:
            del self._idle[conn]
            self._busy.add(conn)

    def done(self, conn: C) -> None:
        """``conn`` finished being served (counts as progress)."""
        if conn in self._busy:
            self._busy.discard(conn)
            self._idle[conn] = None

    def discard(self, conn: C) -> None:
        """``conn`` closed: forget it (no error when it is not in the table)."""
        self._idle.pop(conn, None)
        self._busy.discard(conn)

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def __contains__(self, conn: object) -> bool:
        return conn in self._idle or conn in self._busy

    def __iter__(self) -> Iterator[C]:
        yield from list(self._idle)
        yield from list(self._busy)
