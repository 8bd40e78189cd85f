"""Pods as a kubelet lays them out, on this machine: a network namespace per pod whose
processes sit in a kubelet-shaped cgroup, for ``detnet agent``'s tests and benchmark
(and the cluster lab). Needs root.

Each pod is a namespace ``<prefix><i>`` with ``eth0``, a veth whose peer ``p<i>`` lives
in one "node" namespace, addresses ``198.18.<64 + i // 64>.<4 (i % 64) + 1|2>/30`` (node
side .1, pod side .2). Its processes are started inside the pod's container cgroup, in
either kubelet driver's naming and either hierarchy this machine mounts:

- ``systemd`` on the cgroup v1 named hierarchy (``/sys/fs/cgroup/systemd``):
  ``.../kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, '-' as '_'>.slice/
  cri-containerd-<id>.scope``;
- ``cgroupfs`` on cgroup v2 (``/sys/fs/cgroup/unified``): ``.../kubepods/<qos>/pod<uid>/<id>``;

the guaranteed class without a QoS level, as kubelet does. Everything hangs below a
per-run root (``detnet-<tag>-<pid>.slice`` / ``detnet-<tag>-<pid>``), the way kind's
``--cgroup-root`` nests kubepods, so concurrent runs never share a directory. A process
is started by a shell that writes its own PID into the cgroup and then execs into the
namespace: the program runs in both from its first instruction, and its parent is the
caller (outside the pod), like a container's first process under its shim.

``KubePods`` is a context manager: on exit, also on an exception, it kills every process
it started (by PID), deletes its namespaces (with their veths) and removes every cgroup
it created, deepest first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from detnet.lab.errors import LabError
from detnet.lab.topology import set_tbf

SYSTEMD_V1 = Path("/sys/fs/cgroup/systemd")
UNIFIED_V2 = Path("/sys/fs/cgroup/unified")
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
MAX_PODS = 64 * 192


def pod_cgroup(
    root: Path, *, uid: str, container: str, driver: str, qos: str = "burstable"
) -> Path:
    """The container cgroup kubelet's ``driver`` (systemd, cgroupfs) gives a pod of
    ``qos`` below ``root``."""
    if qos not in QOS_CLASSES:
        raise LabError(f"qos {qos!r}: one of {', '.join(QOS_CLASSES)}")
    if driver == "systemd":
        level = "" if qos == "guaranteed" else f"-{qos}"
        path = root / "kubepods.slice"
        if level:
            path /= f"kubepods{level}.slice"
        return (
            path
            / f"kubepods{level}-pod{uid.replace('-', '_')}.slice"
            / (f"cri-containerd-{container}.scope")
        )
    if driver == "cgroupfs":
        path = root / "kubepods"
        if qos != "guaranteed":
            path /= qos
        return path / f"pod{uid}" / container
    raise LabError(f"driver {driver!r}: systemd or cgroupfs")


def addresses(index: int) -> tuple[str, str]:
    """(node side, pod side) of pod ``index``'s /30."""
    if not 0 <= index < MAX_PODS:
        raise LabError(f"at most {MAX_PODS} pods")
    third, base = 64 + index // 64, (index % 64) * 4
    return f"198.18.{third}.{base + 1}", f"198.18.{third}.{base + 2}"


@dataclass
class KubePod:
    """One pod: its namespace, UID, addresses and container cgroup."""

    index: int
    uid: str
    netns: str
    node_address: str
    address: str
    cgroup: Path
    driver: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


class KubePods:
    """Pods in kubelet-shaped cgroups and their node namespace (module docstring)."""

    def __init__(
        self,
        *,
        tag: str = "pods",
        systemd_root: Path = SYSTEMD_V1,
        unified_root: Path = UNIFIED_V2,
    ) -> None:
        if os.geteuid() != 0:
            raise LabError("pods in cgroups and network namespaces need root")
        for root in (systemd_root, unified_root):
            if not (root / "cgroup.procs").exists():
                raise LabError(f"no cgroup hierarchy mounted at {root}")
        run = f"detnet-{tag}-{os.getpid()}"
        self.prefix = f"{run}-"
        self.node = f"{run}-node"
        self._roots = {"systemd": systemd_root / f"{run}.slice", "cgroupfs": unified_root / run}
        self.pods: list[KubePod] = []
        self._namespaces: list[str] = []
        self._cgroups: list[Path] = []  # every directory we made, parents first
        self._others: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> KubePods:
        try:
            _run(["ip", "netns", "add", self.node])
            self._namespaces.append(self.node)
            _run(["ip", "-n", self.node, "link", "set", "lo", "up"])
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

    # ----------------------------------------------------------------- building

    def add_pod(
        self,
        *,
        uid: str | None = None,
        driver: str = "systemd",
        qos: str = "burstable",
        rate_mbps: float | None = None,
    ) -> KubePod:
        """A new pod namespace with ``eth0`` to the node (shaped to ``rate_mbps`` by a
        tbf when given) and its container cgroup."""
        index = len(self.pods)
        uid = uid or str(uuid.uuid4())
        node_addr, pod_addr = addresses(index)
        netns, peer = f"{self.prefix}{index}", f"p{index}"
        cgroup = pod_cgroup(
            self._roots[driver], uid=uid, container=uuid.uuid4().hex * 2, driver=driver, qos=qos
        )
        pod = KubePod(index, uid, netns, node_addr, pod_addr, cgroup, driver)
        self.pods.append(pod)
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        _run(["ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
              "netns", self.node])  # fmt: skip
        _run(["ip", "-n", netns, "addr", "add", f"{pod_addr}/30", "dev", "eth0"])
        _run(["ip", "-n", self.node, "addr", "add", f"{node_addr}/30", "dev", peer])
        for ns, dev in ((netns, "lo"), (netns, "eth0"), (self.node, peer)):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        if rate_mbps is not None:
            self.set_rate(pod, rate_mbps)
        self._make_cgroup(cgroup)
        return pod

    def set_rate(self, pod: KubePod, rate_mbps: float) -> None:
        """Shape the pod's egress (its ``eth0``) to ``rate_mbps`` with a tbf."""
        set_tbf(pod.netns, "eth0", rate_mbps=rate_mbps, buffer_ms=20)

    def _make_cgroup(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._cgroups.append(d)

    # ---------------------------------------------------------------- processes

    def spawn(self, pod: KubePod, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Run ``argv`` in the pod: in its container cgroup and network namespace from
        the start, its parent being the caller."""
        procs = pod.cgroup / "cgroup.procs"
        proc = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs),
             "ip", "netns", "exec", pod.netns, *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        pod.processes.append(proc)
        deadline = time.monotonic() + 5
        while str(proc.pid) not in procs.read_text().split():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"could not start {argv[0]} in pod {pod.index}'s cgroup")
            time.sleep(0.005)
        return proc

    def spawn_on_node(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Run ``argv`` in the node namespace (a sink for the pods' traffic)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.node, *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._others.append(proc)
        return proc

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Kill every process started here, delete the namespaces, remove the cgroups."""
        procs = [p for pod in self.pods for p in pod.processes] + self._others
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
        for d in reversed(self._cgroups):
            for _ in range(50):  # a killed process leaves its cgroup a moment later
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self._cgroups.clear()
