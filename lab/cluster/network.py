"""The cluster lab's machines and wires: node namespaces with a pod bridge and a shaped
uplink to a shared fabric, pod namespaces behind their node's bridge, the sink and the
control plane on the fabric, pod processes in kubelet-shaped cgroups, and the cleanup of
all of it, also after a run that was killed with SIGKILL.

::

        pod   pod   pod            pod   pod   pod            pod   pod
        eth0  eth0  eth0           eth0  eth0  eth0           eth0  eth0
         |     |     |              |     |     |              |     |
    node-a: lxc* --- br0 (198.18.1.1)   node-b: ... br0 (.2.1)   node-c: ... br0 (.3.1)
                     up0 [tbf]                  up0 [tbf]                up0 [tbf]
                      |                          |                        |
    fabric:      up-node-a ------------- fab0 (bridge) ------------ up-node-c
                                       /            \\
                          sink (198.19.0.2)    control-plane (198.19.0.3)

Every node routes: its own pods on ``br0``, the other nodes' pod networks via their
uplink addresses, the fabric on ``up0``; the sink and the control plane route each
pod network via its node. So everything a pod sends off its node (uploads to the sink,
replies to the controller's probes on node-c, answers to the API server) leaves through
its node's ``up0``, a tbf with a deep buffer: one node's egress congests on its own.

Names carry a per-run prefix, ``detnet-cl-<pid>-`` (namespaces, the temporary
directory) or ``detnet-cl-<pid>.slice`` (the cgroup root in both hierarchies, nested as
kubelet's ``--cgroup-root`` would nest ``kubepods.slice``). ``remove_stale()`` finds
what a dead run left by that pid: it kills the processes in its namespaces and cgroups
(only the lab puts processes there), then deletes the namespaces, cgroups and directory.

Cgroups need root on the host: in a user namespace (``detnet lab --unshare``)
``/sys/fs/cgroup`` is not writable, the pods' processes run without pod cgroups, and
``cgroups_missing`` says why (the node agents then find no pod).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from detnet.lab.cluster.plan import (
    API_ADDRESS,
    FABRIC_PREFIX,
    POD_BRIDGE,
    POD_DEVICE,
    SINK_ADDRESS,
    UPLINK_DEVICE,
    NodePlan,
    PodPlan,
)
from detnet.lab.errors import LabError
from detnet.lab.kubepods import SYSTEMD_V1, UNIFIED_V2, pod_cgroup
from detnet.lab.topology import list_namespaces, set_tbf

PREFIX = "detnet-cl-"
_STALE_NS = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_STALE_CGROUP = re.compile(rf"^{re.escape(PREFIX)}(\d+)\.slice$")
_FABRIC_BRIDGE = "fab0"
_SPAWN_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'


def run_cmd(argv: Sequence[str]) -> None:
    """Run a command; LabError with its message when it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int], *, wait_s: float = 5.0) -> None:
    """SIGKILL ``pids`` and wait (bounded) until they are gone: reaped by their parent,
    or by init for the orphans of a dead lab."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)


def _cgroup_pids(root: Path) -> list[int]:
    pids = []
    for procs in root.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _remove_cgroup_tree(root: Path) -> None:
    """rmdir every directory below and at ``root``, deepest first (a cgroup holds no
    files of its own: its control files go with it)."""
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, root]:
        for _ in range(100):  # a killed process leaves its cgroup a moment later
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def remove_stale(*, own_pid: int | None = None) -> list[str]:
    """Remove what cluster labs that are no longer running left behind: their processes,
    namespaces, cgroups and temporary directories. Returns what was removed."""
    own = own_pid or os.getpid()
    removed: list[str] = []
    for ns in sorted(list_namespaces()):
        m = _STALE_NS.match(ns)
        if not m or int(m.group(1)) == own or _alive(int(m.group(1))):
            continue
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        _kill_pids([int(p) for p in out.stdout.split() if p.isdigit()])
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        removed.append(ns)
    for hierarchy in (SYSTEMD_V1, UNIFIED_V2):
        with contextlib.suppress(OSError):
            for entry in hierarchy.iterdir():
                m = _STALE_CGROUP.match(entry.name)
                if not m or int(m.group(1)) == own or _alive(int(m.group(1))):
                    continue
                _kill_pids(_cgroup_pids(entry))
                _remove_cgroup_tree(entry)
                removed.append(str(entry))
    tmp = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in tmp.iterdir():
            m = _STALE_NS.match(entry.name)
            if m and int(m.group(1)) != own and not _alive(int(m.group(1))) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    return removed


@dataclass(frozen=True)
class Container:
    """One container of a pod: its cgroup in each hierarchy the lab uses."""

    pod: str  # the plan's pod key
    cgroups: tuple[Path, ...]


class ClusterNetwork:
    """Builds the namespaces, links, shapers and cgroups of the cluster lab; on exit (an
    exception, Ctrl-C or SIGTERM included) kills every process it started and removes
    everything again (module docstring)."""

    def __init__(
        self,
        *,
        nodes: Sequence[NodePlan],
        pods: Sequence[PodPlan],
        uplink_mbps: float = 100.0,
        buffer_ms: float = 30.0,
    ) -> None:
        if uplink_mbps <= 0 or buffer_ms <= 0:
            raise LabError("uplink rate and buffer must be positive")
        self.nodes = tuple(nodes)
        self.pods = tuple(pods)
        self.uplink_mbps = uplink_mbps
        self.buffer_ms = buffer_ms
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.tmp = Path()
        self.cgroups_missing: str | None = None  # why pods have no cgroups, or None
        self._roots = (
            SYSTEMD_V1 / f"{PREFIX}{os.getpid()}.slice",
            UNIFIED_V2 / f"{PREFIX}{os.getpid()}.slice",
        )
        self._namespaces: list[str] = []
        self._cgroups: list[Path] = []  # every directory made, parents first
        self._procs: list[subprocess.Popen[bytes]] = []
        self._old_handlers: dict[int, object] = {}

    # ----------------------------------------------------------------- names

    @property
    def fabric(self) -> str:
        """The fabric's namespace."""
        return self.prefix + "fabric"

    @property
    def sink(self) -> str:
        """The sink's namespace."""
        return self.prefix + "sink"

    @property
    def control_plane(self) -> str:
        """The control plane's namespace (the API server emulation listens there)."""
        return self.prefix + "control-plane"

    def node_ns(self, node: str) -> str:
        """A node's namespace (its host network)."""
        return self.prefix + node

    def pod_ns(self, pod: PodPlan) -> str:
        """A pod's namespace."""
        return self.prefix + pod.key.replace("@", "-")

    @property
    def namespaces(self) -> list[str]:
        """Every namespace created so far."""
        return list(self._namespaces)

    # ------------------------------------------------------------- lifecycle

    def __enter__(self) -> ClusterNetwork:
        self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)
        try:
            remove_stale()
            self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
            self._build()
            self._probe_cgroups()
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
        """Kill every process started here, delete the namespaces, remove the cgroups
        and the temporary directory; safe to call twice."""
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop_all()
            for ns in reversed(self._namespaces):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            self._namespaces.clear()
            for root in self._roots:
                if root.exists():
                    _kill_pids(_cgroup_pids(root))  # a process that escaped its group
                    _remove_cgroup_tree(root)
            self._cgroups.clear()
            if self.tmp.parts and self.tmp.name.startswith(self.prefix):
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._old_handlers.clear()

    # --------------------------------------------------------------- building

    def _add_ns(self, name: str) -> None:
        run_cmd(["ip", "netns", "add", name])
        self._namespaces.append(name)
        run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])

    def _veth(self, *, host_ns: str, host_dev: str, peer_ns: str, peer_dev: str) -> None:
        run_cmd(["ip", "-n", host_ns, "link", "add", host_dev, "type", "veth",
                 "peer", "name", peer_dev, "netns", peer_ns])  # fmt: skip

    def _build(self) -> None:
        fab = self.fabric
        self._add_ns(fab)
        run_cmd(
            ["ip", "-n", fab, "link", "add", _FABRIC_BRIDGE, "type", "bridge", "stp_state", "0"]
        )
        run_cmd(["ip", "-n", fab, "link", "set", _FABRIC_BRIDGE, "up"])
        for ns, dev, address in (
            (self.sink, "sink0", SINK_ADDRESS),
            (self.control_plane, "cp0", API_ADDRESS),
        ):
            self._add_ns(ns)
            self._veth(host_ns=fab, host_dev=dev, peer_ns=ns, peer_dev="eth0")
            run_cmd(["ip", "-n", fab, "link", "set", dev, "master", _FABRIC_BRIDGE, "up"])
            run_cmd(["ip", "-n", ns, "addr", "add", f"{address}/{FABRIC_PREFIX}", "dev", "eth0"])
            run_cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
            for node in self.nodes:
                run_cmd(["ip", "-n", ns, "route", "add", node.pod_cidr,
                         "via", node.uplink_address])  # fmt: skip
        for node in self.nodes:
            self._build_node(node)
        for i, pod in enumerate(self.pods):
            self._build_pod(pod, index=i)

    def _build_node(self, node: NodePlan) -> None:
        ns, fab = self.node_ns(node.name), self.fabric
        self._add_ns(ns)
        run_cmd(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run_cmd(["ip", "-n", ns, "link", "add", POD_BRIDGE, "type", "bridge", "stp_state", "0"])
        run_cmd(["ip", "-n", ns, "addr", "add", f"{node.gateway}/24", "dev", POD_BRIDGE])
        run_cmd(["ip", "-n", ns, "link", "set", POD_BRIDGE, "up"])
        fabric_port = f"up-{node.name}"[:15]
        self._veth(host_ns=ns, host_dev=UPLINK_DEVICE, peer_ns=fab, peer_dev=fabric_port)
        run_cmd(["ip", "-n", fab, "link", "set", fabric_port, "master", _FABRIC_BRIDGE, "up"])
        run_cmd(["ip", "-n", ns, "addr", "add", f"{node.uplink_address}/{FABRIC_PREFIX}",
                 "dev", UPLINK_DEVICE])  # fmt: skip
        run_cmd(["ip", "-n", ns, "link", "set", UPLINK_DEVICE, "up"])
        self._shape_uplink(node.name, self.uplink_mbps)
        for other in self.nodes:
            if other is not node:
                run_cmd(["ip", "-n", ns, "route", "add", other.pod_cidr,
                         "via", other.uplink_address])  # fmt: skip

    def set_uplink(self, node: str, rate_mbps: float) -> None:
        """Change ``node``'s uplink rate (the knee step), same queue depth."""
        if rate_mbps <= 0:
            raise LabError("uplink rate must be positive")
        if node not in {n.name for n in self.nodes}:
            raise LabError(f"no node {node!r} in this cluster")
        self._shape_uplink(node, rate_mbps)

    def _shape_uplink(self, node: str, rate_mbps: float) -> None:
        set_tbf(self.node_ns(node), UPLINK_DEVICE, rate_mbps=rate_mbps, buffer_ms=self.buffer_ms)

    def _build_pod(self, pod: PodPlan, *, index: int) -> None:
        node = next(n for n in self.nodes if n.name == pod.node)
        node_ns, ns = self.node_ns(pod.node), self.pod_ns(pod)
        self._add_ns(ns)
        host_dev = f"lxc{index:02d}"  # Cilium's name for a pod's host-side veth
        self._veth(host_ns=node_ns, host_dev=host_dev, peer_ns=ns, peer_dev=POD_DEVICE)
        run_cmd(["ip", "-n", node_ns, "link", "set", host_dev, "master", POD_BRIDGE, "up"])
        run_cmd(["ip", "-n", ns, "addr", "add", f"{pod.address}/24", "dev", POD_DEVICE])
        run_cmd(["ip", "-n", ns, "link", "set", POD_DEVICE, "up"])
        run_cmd(["ip", "-n", ns, "route", "add", "default", "via", node.gateway])

    # ---------------------------------------------------------------- cgroups

    def _probe_cgroups(self) -> None:
        for hierarchy in (SYSTEMD_V1, UNIFIED_V2):
            if not (hierarchy / "cgroup.procs").exists():
                self.cgroups_missing = f"no cgroup hierarchy mounted at {hierarchy}"
                return
        try:
            for root in self._roots:
                self._mkdirs(root)
        except OSError as exc:
            self.cgroups_missing = (
                f"cannot create cgroups under {exc.filename or '/sys/fs/cgroup'}: "
                f"{exc.strerror or exc}: pod cgroups need root on the host, which a user "
                "namespace is not"
            )

    def _mkdirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._cgroups.append(d)

    def container(self, pod: PodPlan, *, uid: str, qos: str = "burstable") -> Container:
        """A new container of ``pod`` (API UID ``uid``): its cgroup, as kubelet's systemd
        driver names it, in the cgroup v1 named hierarchy and in the unified one; no
        cgroups when the lab cannot make them (``cgroups_missing``)."""
        if self.cgroups_missing is not None:
            return Container(pod.key, ())
        container_id = uuid.uuid4().hex * 2  # 64 hex digits, as containerd's
        paths = tuple(
            pod_cgroup(root, uid=uid, container=container_id, driver="systemd", qos=qos)
            for root in self._roots
        )
        for path in paths:
            self._mkdirs(path)
        return Container(pod.key, paths)

    # -------------------------------------------------------------- processes

    def spawn(
        self,
        netns: str,
        argv: Sequence[str],
        *,
        container: Container | None = None,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``netns`` (and in ``container``'s cgroups from its first
        instruction: a shell writes its own PID there and execs), in its own process
        group, its parent this process (as a container's first process under its shim)."""
        if netns not in self._namespaces:
            raise LabError(f"no namespace {netns} in this lab")
        procs = [str(c / "cgroup.procs") for c in (container.cgroups if container else ())]
        full = ["sh", "-c", _SPAWN_SCRIPT, "sh", *procs, "--", "ip", "netns", "exec", netns, *argv]
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self._procs.append(proc)
        deadline = time.monotonic() + 5.0
        for path in procs:
            while str(proc.pid) not in Path(path).read_text().split():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"could not start {argv[0]} in {container and container.pod}")
                time.sleep(0.005)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, timeout_s: float = 5.0) -> int | None:
        """Stop one process started by ``spawn`` (SIGTERM, then SIGKILL); its exit code."""
        _stop_group(proc, timeout_s=timeout_s)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def failed(self) -> list[subprocess.Popen[bytes]]:
        """Processes started here that have exited with a non-zero status."""
        return [p for p in self._procs if p.poll() not in (None, 0)]

    def _stop_all(self) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs.clear()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_group(proc: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
