"""Finds a process of each local pod in ``/proc`` and reads its network namespace's
interface counters: the agent's I/O against the kernel (the parsing is ``cgroups.py``'s
and ``netdev.py``'s).

Resolution scans ``/proc`` in ascending PID order (a pod's sandbox process, the longest
lived, is usually its lowest PID) and reads each ``/proc/PID/cgroup``; it examines at
most ``scan_budget`` PIDs per call, so a node with many processes costs a bounded slice
of each sampling tick, and it runs only while some wanted pod has no process yet. A
pass over every PID that leaves pods unresolved (a pod that is still being created) is
repeated after ``rescan_ns``, sooner when new pods are wanted. A candidate must be the
top process of its container: its parent outside the pod (so not a process that may
have made a network namespace of its own).

Once found, a pod keeps that process: a pidfd (``pidfd_open``) says when it exits, for
every pod at once with one ``poll``, and its ``/proc/PID/net/dev`` stays open and is
re-read with ``pread`` at each sample — no open, no path lookup. The pidfd is opened
first and the cgroup re-read after ``net/dev`` is open, so a PID reused in between is
caught. The open file holds the network namespace, so it is closed as soon as the
process exits or the pod is no longer wanted. Reading ``/proc/PID/cgroup`` and
``/proc/PID/net/dev`` of another user's process needs no capability (both are
world-readable; ``docs/agent.md``); seeing the node's processes needs the host's PID
namespace.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

from detnet.controller.agent.cgroups import MAX_CGROUP_BYTES, parse_proc_cgroup
from detnet.controller.agent.netdev import MAX_NET_DEV_BYTES

log = logging.getLogger(__name__)

DEFAULT_SCAN_BUDGET = 512  # PIDs examined per call: ~20 µs each here
DEFAULT_RESCAN_NS = 1_000_000_000
_WARN_EVERY_NS = 60_000_000_000
_STAT_MAX = 4096
_GONE = (ProcessLookupError, FileNotFoundError)


Reading = tuple[int, bytes | None, int]
"""One pod's reading: ``(t_ns, data, source)``: the bytes of its ``/proc/PID/net/dev``
(None when unreadable; ``rates.NodeMeter`` parses all of a tick's together) and the
source, which changes whenever the pod is re-resolved to another process. A plain
tuple, not a frozen dataclass: one is made for every pod at every sample, and a frozen
dataclass costs thirty times more to build."""


@dataclass
class _Attached:
    key: str
    pid: int
    pidfd: int
    netdev: int
    source: int
    size: int = 4096  # read buffer: grows when a read fills it


class ProcResolver:
    """The process, and so the interface counters, of each wanted pod (by the UID its
    cgroup carries). ``errors`` counts what went wrong, by kind."""

    def __init__(
        self,
        *,
        proc: str = "/proc",
        scan_budget: int = DEFAULT_SCAN_BUDGET,
        rescan_ns: int = DEFAULT_RESCAN_NS,
        clock: Callable[[], int] = time.monotonic_ns,
        errors: Counter[str] | None = None,
    ) -> None:
        if scan_budget < 1 or rescan_ns < 0:
            raise ValueError("scan_budget must be >= 1 and rescan_ns >= 0")
        self._proc = proc
        self._budget = scan_budget
        self._rescan_ns = rescan_ns
        self._clock = clock
        self.errors: Counter[str] = errors if errors is not None else Counter()
        self._poll = select.poll()
        self._by_key: dict[str, _Attached] = {}
        self._by_pidfd: dict[int, _Attached] = {}
        self._wanted: frozenset[str] = frozenset()
        self._pass: list[int] | None = None
        self._pos = 0
        self._next_pass_ns = 0
        self._demand = False  # new pods wanted during a pass: start the next one at once
        self._sources = 0
        self._warned: dict[str, int] = {}
        self.examined = 0  # PIDs examined, in all
        self.passes = 0  # passes over /proc started

    # ------------------------------------------------------------------ the pods

    def want(self, keys: Collection[str]) -> None:
        """Resolve exactly these pods (cgroup UIDs) from now on; forget the others."""
        wanted = frozenset(keys)
        for key in [k for k in self._by_key if k not in wanted]:
            self._detach(key)
        if wanted - self._wanted - self._by_key.keys():
            self._next_pass_ns = 0
            self._demand = self._pass is not None
        self._wanted = wanted

    @property
    def unresolved(self) -> frozenset[str]:
        """Wanted pods with no process found (yet)."""
        return self._wanted - self._by_key.keys()

    def pid_of(self, key: str) -> int | None:
        """The process a pod is read through, None when unresolved."""
        att = self._by_key.get(key)
        return att.pid if att else None

    # ------------------------------------------------------------------ scanning

    def scan(self, now_ns: int) -> int:
        """Examine up to ``scan_budget`` PIDs for unresolved pods; returns how many."""
        pending = set(self.unresolved)
        if not pending:
            self._pass = None
            return 0
        if self._pass is None:
            if now_ns < self._next_pass_ns:
                return 0
            self._pass, self._pos, self._demand = self._pids(), 0, False
            self.passes += 1
        examined = 0
        while examined < self._budget and self._pos < len(self._pass) and pending:
            pid = self._pass[self._pos]
            self._pos += 1
            examined += 1
            key = self._pod_of(pid)
            if key is not None and key in pending and self._attach(pid, key):
                pending.discard(key)
        if self._pos >= len(self._pass) or not pending:
            self._pass = None
            self._next_pass_ns = 0 if self._demand or not pending else now_ns + self._rescan_ns
        self.examined += examined
        return examined

    def _pids(self) -> list[int]:
        try:
            names = os.listdir(self._proc)
        except OSError as exc:
            self._note("proc_unreadable", f"cannot list {self._proc}: {exc.strerror or exc}")
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _pod_of(self, pid: int) -> str | None:
        try:
            text = self._read(f"{self._proc}/{pid}/cgroup", MAX_CGROUP_BYTES)
        except _GONE:
            return None  # exited since the listing: the churn of a busy node
        except OSError as exc:
            self._note("proc_unreadable", f"/proc/{pid}/cgroup: {exc.strerror or exc}")
            return None
        pod = parse_proc_cgroup(text.decode("utf-8", "replace"))
        return pod.uid if pod else None

    def _parent_outside(self, pid: int, key: str) -> bool:
        """True when the parent of ``pid`` is not in the same pod (a container's top
        process); False when it is, or when that cannot be read."""
        try:
            stat = self._read(f"{self._proc}/{pid}/stat", _STAT_MAX)
        except OSError:
            return False
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        if len(fields) < 2 or not fields[1].isdigit():
            return False
        ppid = int(fields[1])
        return ppid == 0 or self._pod_of(ppid) != key

    def _attach(self, pid: int, key: str) -> bool:
        try:
            pidfd = os.pidfd_open(pid)
        except _GONE:
            return False
        except OSError as exc:
            self._note("attach_failed", f"pidfd_open({pid}): {exc.strerror or exc}")
            return False
        netdev, attached = -1, False
        try:
            if not self._parent_outside(pid, key):
                return False
            # Non-blocking: nothing in /proc blocks, but a FIFO in a tree given as --proc would.
            netdev = os.open(
                f"{self._proc}/{pid}/net/dev", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
            # The PID may have been reused between the scan's read and pidfd_open: only
            # if the cgroup still names the pod, with the pidfd's process alive, is this it.
            if self._pod_of(pid) != key or _exited(pidfd):
                return False
            attached = True
        except _GONE:
            return False
        except OSError as exc:
            self._note("attach_failed", f"/proc/{pid}/net/dev: {exc.strerror or exc}")
            return False
        finally:
            if not attached:
                if netdev >= 0:
                    os.close(netdev)
                os.close(pidfd)
        self._sources += 1
        att = _Attached(key=key, pid=pid, pidfd=pidfd, netdev=netdev, source=self._sources)
        self._by_key[key] = att
        self._by_pidfd[pidfd] = att
        self._poll.register(pidfd, select.POLLIN)
        log.debug("pod %s: reading counters through pid %d", key, pid)
        return True

    # ------------------------------------------------------------------- reading

    def read(self) -> dict[str, Reading]:
        """The counters of every resolved pod, now. A pod whose process exited since
        the last call is dropped from the result and resolved again."""
        for fd, _ in self._poll.poll(0):
            att = self._by_pidfd.get(fd)
            if att is not None:
                self.errors["vanished"] += 1
                log.debug("pod %s: pid %d exited; resolving it again", att.key, att.pid)
                self._detach(att.key)
                self._next_pass_ns = 0
        out: dict[str, Reading] = {}
        pread, clock = os.pread, self._clock
        failed = []
        for key, att in self._by_key.items():
            try:
                raw = pread(att.netdev, att.size, 0)
                while len(raw) >= att.size and att.size < MAX_NET_DEV_BYTES:
                    att.size = min(att.size * 4, MAX_NET_DEV_BYTES)
                    raw = pread(att.netdev, att.size, 0)
            except OSError as exc:
                self._note("netdev_unreadable", f"/proc/{att.pid}/net/dev: {exc.strerror or exc}")
                out[key] = (clock(), None, att.source)
                failed.append(key)
            else:
                out[key] = (clock(), raw, att.source)
        for key in failed:
            self.forget(key)
        return out

    def forget(self, key: str) -> None:
        """Stop reading a pod through its process (its file no longer reads or parses):
        resolve it again, through another process if there is one."""
        if key in self._by_key:
            self._detach(key)
            self._next_pass_ns = 0

    def close(self) -> None:
        """Close every pidfd and file (idempotent)."""
        for key in list(self._by_key):
            self._detach(key)

    # ----------------------------------------------------------------- internals

    def _detach(self, key: str) -> None:
        att = self._by_key.pop(key, None)
        if att is None:
            return
        self._by_pidfd.pop(att.pidfd, None)
        self._poll.unregister(att.pidfd)
        os.close(att.netdev)
        os.close(att.pidfd)

    @staticmethod
    def _read(path: str, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def _note(self, kind: str, message: str) -> None:
        """Count an error; log it, at most once a minute per kind."""
        self.errors[kind] += 1
        now = self._clock()
        if now >= self._warned.get(kind, 0):
            self._warned[kind] = now + _WARN_EVERY_NS
            log.warning("%s (%s; further ones counted, logged once a minute)", message, kind)


def _exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))
