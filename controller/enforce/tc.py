"""Linux tc enforcer: a token-bucket (tbf) egress rate on a network interface, via netlink.

This is the bare-metal and lab counterpart of Cilium's bandwidth manager: each best-effort
workload maps to one interface (optionally inside a named network namespace) and its limit
becomes the rate of a ``tbf`` root qdisc there. Everything goes through rtnetlink with
pyroute2 (never by shelling out to ``tc``), so an apply costs one round trip per device and
its failure carries the kernel's own error.

Usage is read from the interface's 64-bit tx byte counter, as the rate since the previous
``usage()`` call; the policy uses it to cut from what a workload really sends.

The netlink calls run on one dedicated worker thread with pyroute2's synchronous IPRoute:
uvloop (the control loop's event loop) cannot host AF_NETLINK datagram endpoints, and one
thread keeps pyroute2's per-thread socket state consistent. A socket for another network
namespace is opened by moving that worker thread into the namespace (setns(2)), creating
the socket (it stays bound to the namespace it was created in) and moving back. pyroute2's
own ``netns=`` forks a helper process instead, and that helper inherits the event loop's
signal wake-up fd: when pyroute2 SIGTERMs it, the parent loop reads "SIGTERM" and stops.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from detnet.controller.errors import EnforcementError
from detnet.controller.workloads import CLUSTER, PodRef, Scope, TcDevice
from detnet.engine.tbf import tbf_bucket_bytes, tbf_burst_bytes, tbf_plan

_TBF_HANDLE = 0x10000  # "1:", the handle iproute2 users expect for a root qdisc
_TBF_SPARE_HANDLE = 0x20000  # "2:", for a fresh tbf grafted over the one at 1:
_MAX_MBPS = 34_000  # tbf's 32-bit byte/s rate field (no TCA_TBF_RATE64 in pyroute2)
_NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


class TcEnforcer:
    """Sets a tbf egress rate (Mbit/s) per workload on its interface, through netlink."""

    name = "tc"

    def __init__(
        self,
        devices: Mapping[str, TcDevice],
        *,
        burst_bytes: int | None = None,
        latency_ms: float = 20.0,
    ) -> None:
        if not devices:
            raise EnforcementError("tc enforcer: no best-effort target names a tc device")
        if burst_bytes is not None and burst_bytes < 1_600:
            raise EnforcementError("tc enforcer: burst must be at least 1600 bytes (one frame)")
        if not latency_ms > 0:
            raise EnforcementError("tc enforcer: latency must be positive")
        self._devices = dict(devices)
        self._burst = burst_bytes
        self._latency_ms = latency_ms
        self._sockets: dict[str | None, Any] = {}  # netns -> IPRoute, used on _worker only
        self._index: dict[str, int] = {}  # workload -> ifindex in its netns
        self._counters: dict[str, tuple[int, float]] = {}  # workload -> (tx bytes, t)
        self._worker: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> Mapping[Scope, int]:
        """Open netlink sockets, resolve every device; return the tbf rates already set."""
        try:
            current = await self._run(self._start)
        except EnforcementError:
            await self._run(self._close_sockets)  # an unusable enforcer holds nothing open
            raise
        return {Scope(w): mbps for w, mbps in current.items()}

    async def apply(self, limits: Mapping[Scope, int]) -> None:
        """Set each workload's tbf rate; a present root tbf is changed in place unless its
        bucket would shrink (then a fresh one replaces it: ``_set_rate``). One
        device per workload: only cluster-wide scopes (EnforcementError for a node's)."""
        by_workload: dict[str, int] = {}
        for scope, mbps in limits.items():  # check everything before touching anything
            workload = scope.workload
            if scope.node != CLUSTER:
                raise EnforcementError(
                    f"tc enforcer: {workload!r} has one device, no per-node limit ({scope})"
                )
            by_workload[workload] = mbps
            if workload not in self._devices:
                raise EnforcementError(
                    f"tc enforcer: no tc device configured for best-effort target {workload!r}"
                )
            if isinstance(mbps, bool) or not isinstance(mbps, int) or not 0 < mbps <= _MAX_MBPS:
                raise EnforcementError(
                    f"tc enforcer: limit for {workload!r} must be 1..{_MAX_MBPS} Mbit/s, "
                    f"not {mbps!r}"
                )
        await self._run(self._apply, by_workload)

    def placements(self) -> Mapping[str, frozenset[str]]:
        """No nodes: one machine."""
        return {}

    def pods(self) -> Mapping[str, tuple[PodRef, ...]]:
        """No pods: interfaces."""
        return {}

    async def usage(self) -> Mapping[Scope, float]:
        """Egress Mbit/s per workload since the previous call (or since start())."""
        return {Scope(w): mbit for w, mbit in (await self._run(self._usage)).items()}

    async def close(self, *, restore: Mapping[Scope, int] | None = None) -> None:
        """Apply ``restore`` (if given), then close every netlink socket."""
        try:
            if restore:
                await self.apply(restore)
        finally:
            if self._worker is not None:
                await self._run(self._close_sockets)
                self._worker.shutdown(wait=True)
                self._worker = None

    # -- netlink plumbing, all on the worker thread -------------------------------------

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detnet-tc")
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(self._worker, func, *args)

    def _start(self) -> dict[str, int]:
        self._open()
        current: dict[str, int] = {}
        for workload in self._devices:
            tbf = self._root_tbf(workload)
            if tbf is not None:
                current[workload] = round(tbf["rate"] * 8 / 1_000_000)
            self._counters[workload] = (self._tx_bytes(workload), time.monotonic())
        return current

    def _apply(self, limits: dict[str, int]) -> None:
        self._open()
        for workload, mbps in limits.items():
            self._set_rate(workload, mbps)

    def _usage(self) -> dict[str, float]:
        self._open()
        rates: dict[str, float] = {}
        for workload in self._devices:
            now_bytes, now = self._tx_bytes(workload), time.monotonic()
            previous = self._counters.get(workload)
            self._counters[workload] = (now_bytes, now)
            if previous is None or now <= previous[1] or now_bytes < previous[0]:
                continue  # first reading, or the counter was reset with the device
            rates[workload] = (now_bytes - previous[0]) * 8 / (now - previous[1]) / 1e6
        return rates

    def _close_sockets(self) -> None:
        sockets, self._sockets = self._sockets, {}
        self._index.clear()
        for ipr in sockets.values():
            ipr.close()

    def _open(self) -> None:
        from pyroute2 import IPRoute  # Linux-only dependency: import where needed

        for workload, dev in self._devices.items():
            if workload in self._index:
                continue
            if dev.netns not in self._sockets:
                if dev.netns is not None and not os.path.exists(
                    os.path.join(_NETNS_DIR, dev.netns)
                ):
                    raise EnforcementError(
                        f"tc enforcer: network namespace {dev.netns!r} (for {workload!r}) "
                        f"does not exist; see `ip netns list`"
                    )
                try:
                    ipr = _iproute_in(dev.netns) if dev.netns else IPRoute()
                except OSError as exc:
                    raise EnforcementError(
                        f"tc enforcer: cannot open netlink in {dev}: {exc}"
                    ) from exc
                self._sockets[dev.netns] = ipr
            try:
                found = self._sockets[dev.netns].link_lookup(ifname=dev.device)
            except OSError as exc:
                raise EnforcementError(f"tc enforcer: cannot look up {dev}: {exc}") from exc
            if not found:
                raise EnforcementError(
                    f"tc enforcer: interface {dev} (for {workload!r}) does not exist"
                )
            self._index[workload] = found[0]

    def _root_tbf(self, workload: str) -> dict[str, Any] | None:
        """The root tbf's parameters (with its handle), or None when the root is not tbf."""
        ipr = self._sockets[self._devices[workload].netns]
        try:
            qdiscs = list(ipr.get_qdiscs(self._index[workload]))
        except OSError as exc:
            raise EnforcementError(
                f"tc enforcer: cannot read qdiscs of {self._devices[workload]}: {exc}"
            ) from exc
        for q in qdiscs:
            if q["index"] == self._index[workload] and q["parent"] == 0xFFFFFFFF:
                if q.get("TCA_KIND") != "tbf":
                    return None
                parms = q.get(("TCA_OPTIONS", "TCA_TBF_PARMS"))
                return None if parms is None else {**parms, "handle": q["handle"]}
        return None

    def _set_rate(self, workload: str, mbps: int) -> None:
        """Change the root tbf in place, or graft a fresh one under the other handle when
        its bucket would shrink (``tbf_plan``: a smaller bucket in place can block the
        queue for good). The graft is one netlink request: the old tbf shapes until the
        new one does."""
        dev = self._devices[workload]
        ipr = self._sockets[dev.netns]
        present = self._root_tbf(workload)
        wanted = self._burst if self._burst is not None else tbf_burst_bytes(mbps)
        held = None if present is None else tbf_bucket_bytes(present["rate"], present["buffer"])
        plan = tbf_plan(mbps, wanted, held)
        if present is None:
            command, handle = "replace", _TBF_HANDLE
        elif plan.in_place:
            command, handle = "change", present["handle"]
        else:
            command = "replace"
            handle = _TBF_SPARE_HANDLE if present["handle"] == _TBF_HANDLE else _TBF_HANDLE
        try:
            ipr.tc(
                command,
                "tbf",
                self._index[workload],
                handle=handle,
                rate=mbps * 125_000,  # bytes/s
                burst=plan.burst,
                latency=round(self._latency_ms * 1000),  # µs (pyroute2's time unit)
            )
        except OSError as exc:  # NetlinkError is an OSError carrying the kernel's errno
            raise EnforcementError(
                f"tc enforcer: setting {mbps} Mbit/s on {dev} for {workload!r} failed: {exc}"
            ) from exc

    def _tx_bytes(self, workload: str) -> int:
        dev = self._devices[workload]
        ipr = self._sockets[dev.netns]
        try:
            links = list(ipr.get_links(self._index[workload]))
        except OSError as exc:
            raise EnforcementError(f"tc enforcer: cannot read counters of {dev}: {exc}") from exc
        stats = links[0].get("IFLA_STATS64") if links else None
        if stats is None:
            raise EnforcementError(f"tc enforcer: {dev} reports no byte counters")
        return int(stats["tx_bytes"])


def _iproute_in(netns: str) -> Any:
    """An IPRoute whose socket lives in ``netns``; call on the enforcer's worker thread only.

    setns(2) with CLONE_NEWNET moves just the calling thread; we move back before returning,
    and a failure to move back is fatal for this thread's future work, so it raises."""
    from pyroute2 import IPRoute

    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            try:
                return IPRoute()  # the netlink socket is bound to this namespace now
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back from {netns}: {os.strerror(err)}")
        finally:
            os.close(target)
    finally:
        os.close(own)
