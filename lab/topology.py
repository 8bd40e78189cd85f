"""The lab's network: network namespaces that play one node's pods and its uplink.

::

    robot-control  safety-scanner  telemetry-upload  erp-dashboard     (pod namespaces)
         eth0           eth0             eth0 [tbf]      eth0 [tbf]    <- TcEnforcer
          |              |                |               |
    node:  ------------------- br0 ----------------------- up0 [tbf: the bottleneck]
                                                           |
    upstream:                                              up1 ---- br1 ---- probe, sink

Every pod's traffic towards the upstream namespace (critical replies to the probe, bulk
uploads to the sink) leaves the node through ``up0``, whose egress is a tbf with a deep
buffer: bulk TCP fills it and the critical replies queue behind. The best-effort pods'
own ``eth0`` is where the tc enforcer (playing Cilium's bandwidth manager) shapes them.

Names carry a per-run prefix (``detnet-lab-<pid>-``) so that runs never collide; addresses
are in 198.18.0.0/24 (RFC 2544 benchmarking space) and exist only inside these namespaces.
``Topology`` is a context manager: on exit, on an exception or a signal it kills every
process it started (by process group) and deletes every namespace, which takes the veth
pairs and bridges with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO

from detnet.engine.tbf import tbf_burst_bytes, tbf_plan
from detnet.lab.errors import LabError

NS_PREFIX = "detnet-lab-"
SUBNET_PREFIX = 24
_STALE = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-")


@dataclass(frozen=True)
class Pod:
    """One namespace of the lab, with its role and address."""

    role: str  # "probe", "sink", "robot-control", ...
    address: str
    attach: str  # "node" (a pod of the node) or "upstream"


PODS: tuple[Pod, ...] = (
    Pod("probe", "198.18.0.1", "upstream"),
    Pod("sink", "198.18.0.2", "upstream"),
    Pod("robot-control", "198.18.0.10", "node"),
    Pod("safety-scanner", "198.18.0.11", "node"),
    Pod("telemetry-upload", "198.18.0.20", "node"),
    Pod("erp-dashboard", "198.18.0.21", "node"),
)
BEST_EFFORT = ("telemetry-upload", "erp-dashboard")
POD_DEVICE = "eth0"  # every pod's interface: what the tc enforcer shapes


def tbf_args(*, rate_mbps: float, buffer_ms: float, burst: int | None = None) -> list[str]:
    """``tc`` arguments for a tbf of ``rate_mbps`` holding ``buffer_ms`` of queue."""
    burst = tbf_burst_bytes(rate_mbps) if burst is None else burst
    return ["tbf", "rate", f"{rate_mbps}mbit", "burst", str(burst), "latency", f"{buffer_ms}ms"]


def root_tbf(shown: str) -> tuple[str, int] | None:
    """The handle and bucket bytes of the root tbf in ``tc -j qdisc show`` output (None
    when the root is another qdisc, or unreadable: then a fresh tbf replaces it)."""
    try:
        qdiscs = json.loads(shown)
        for q in qdiscs:
            if q.get("root") and q.get("kind") == "tbf":
                return str(q["handle"]), int(q["options"]["burst"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        pass
    return None


def tbf_command(
    netns: str, device: str, *, rate_mbps: float, buffer_ms: float, present: tuple[str, int] | None
) -> list[str]:
    """The ``tc`` command that sets ``device``'s root tbf where ``present`` (``root_tbf``)
    is there now: in place, or a fresh tbf under the other handle when the bucket would
    shrink (``engine.tbf.tbf_plan``: a smaller bucket in place can block the queue)."""
    plan = tbf_plan(rate_mbps, tbf_burst_bytes(rate_mbps), None if present is None else present[1])
    if present is not None and plan.in_place:
        verb, handle = "change", present[0]
    else:
        verb, handle = "replace", "2:" if present is not None and present[0] == "1:" else "1:"
    return [
        *("tc", "-n", netns, "qdisc", verb, "dev", device, "root", "handle", handle),
        *tbf_args(rate_mbps=rate_mbps, buffer_ms=buffer_ms, burst=plan.burst),
    ]


def show_tbf_command(netns: str, device: str) -> list[str]:
    """The ``tc`` command whose output ``root_tbf`` reads."""
    return ["tc", "-n", netns, "-j", "qdisc", "show", "dev", device, "root"]


def set_tbf(netns: str, device: str, *, rate_mbps: float, buffer_ms: float) -> None:
    """Shape ``device``'s egress in ``netns`` to ``rate_mbps`` (``tbf_command``)."""
    shown = subprocess.run(
        show_tbf_command(netns, device), capture_output=True, text=True, check=False
    )
    present = root_tbf(shown.stdout) if shown.returncode == 0 else None
    _run(tbf_command(netns, device, rate_mbps=rate_mbps, buffer_ms=buffer_ms, present=present))


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


def list_namespaces() -> set[str]:
    """Names of the network namespaces ``ip netns`` knows."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def remove_stale(*, alive: int | None = None) -> list[str]:
    """Delete lab namespaces whose creating process is gone (a crashed or killed run)."""
    removed = []
    for ns in sorted(list_namespaces()):
        m = _STALE.match(ns)
        if not m or int(m.group(1)) == (alive or os.getpid()):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its lab is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        removed.append(ns)
    return removed


class Topology:
    """Builds the lab's namespaces, links and bottleneck; tears everything down on exit."""

    def __init__(self, *, bottleneck_mbps: float = 100.0, buffer_ms: float = 30.0) -> None:
        if bottleneck_mbps <= 0 or buffer_ms <= 0:
            raise LabError("bottleneck rate and buffer must be positive")
        self.bottleneck_mbps = bottleneck_mbps
        self.buffer_ms = buffer_ms
        self.prefix = f"{NS_PREFIX}{os.getpid()}-"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._old_handlers: dict[int, object] = {}

    # -- names ----------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """The namespace name of ``role`` (a pod role, "node" or "upstream")."""
        return self.prefix + role

    def address(self, role: str) -> str:
        """The 198.18.0.0/24 address of a pod."""
        for pod in PODS:
            if pod.role == role:
                return pod.address
        raise LabError(f"no pod called {role!r}")

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this topology created (and will delete)."""
        return list(self._created)

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Topology:
        # SIGTERM becomes KeyboardInterrupt so `with` unwinds and cleans up; Ctrl-C already does.
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)
        try:
            remove_stale()
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process started here, delete every namespace; safe to call twice."""
        # Ctrl-C during teardown must not leave half of it: ignore SIGINT until done.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in self._procs:
                _kill_group(proc)
            self._procs.clear()
            for ns in reversed(self._created):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            self._created.clear()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._old_handlers.clear()

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _build(self) -> None:
        node, up = self.ns("node"), self.ns("upstream")
        for name in (node, up):
            self._add_ns(name)
        for name, bridge in ((node, "br0"), (up, "br1")):
            _run(["ip", "-n", name, "link", "add", bridge, "type", "bridge", "stp_state", "0"])
            _run(["ip", "-n", name, "link", "set", bridge, "up"])
        # the uplink: up0 (node, shaped) <-> up1 (upstream)
        _run(["ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "up1"])
        _run(["ip", "-n", node, "link", "set", "up1", "netns", up])
        _run(["ip", "-n", node, "link", "set", "up0", "master", "br0", "up"])
        _run(["ip", "-n", up, "link", "set", "up1", "master", "br1", "up"])
        self._shape_uplink(self.bottleneck_mbps)
        for pod in PODS:
            ns = self.ns(pod.role)
            self._add_ns(ns)
            host_ns, bridge = (node, "br0") if pod.attach == "node" else (up, "br1")
            port = f"p{PODS.index(pod)}"
            _run(
                [
                    *("ip", "-n", host_ns, "link", "add", port, "type", "veth"),
                    *("peer", "name", POD_DEVICE, "netns", ns),
                ]
            )
            _run(["ip", "-n", host_ns, "link", "set", port, "master", bridge, "up"])
            _run(
                ["ip", "-n", ns, "addr", "add", f"{pod.address}/{SUBNET_PREFIX}", "dev", POD_DEVICE]
            )
            _run(["ip", "-n", ns, "link", "set", POD_DEVICE, "up"])

    def set_bottleneck(self, rate_mbps: float) -> None:
        """Change the bottleneck's rate (the knee step), same queue depth."""
        if rate_mbps <= 0:
            raise LabError("bottleneck rate must be positive")
        self._shape_uplink(rate_mbps)

    def _shape_uplink(self, rate_mbps: float) -> None:
        """Set the uplink's root tbf: the bottleneck."""
        set_tbf(self.ns("node"), "up0", rate_mbps=rate_mbps, buffer_ms=self.buffer_ms)

    # -- processes ------------------------------------------------------------------

    def spawn(
        self,
        role: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``role``'s namespace in its own process group."""
        if self.ns(role) not in self._created:
            raise LabError(f"no namespace for {role!r} in this lab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: we kill it and its children by PID
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, timeout_s: float = 5.0) -> int | None:
        """Stop one process started by ``spawn`` (SIGTERM, then SIGKILL); its exit code."""
        _kill_group(proc, timeout_s=timeout_s)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def wait_for_port(
        self, role: str, port: int, *, proto: str = "tcp", timeout_s: float = 10.0
    ) -> None:
        """Wait until something listens on ``port`` inside ``role``'s namespace."""
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["ip", "netns", "exec", self.ns(role), "ss", flag, f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.stdout.strip():
                return
            for proc in self._procs:
                if proc.poll() is not None and proc.returncode != 0:
                    raise LabError(
                        f"a lab process exited with status {proc.returncode}: {proc.args!r}"
                    )
            time.sleep(0.05)
        raise LabError(f"nothing listens on {proto} port {port} in {role} after {timeout_s:g} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen[bytes], *, timeout_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
