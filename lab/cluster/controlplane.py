"""The cluster lab's control plane: the API server emulation, run by the lab process but
listening inside the lab's control-plane namespace on the fabric, and holding what a
kubelet, the scheduler and the endpoint-slice controller would have written.

The listening socket is made by a short-lived thread that moves itself into the
namespace (setns(2) moves only the calling thread), creates and binds the socket and
ends; a socket belongs to the namespace it was created in for its whole life, so
aiohttp (on the control plane's own event loop thread) serves the namespace from this
process. Every process of the lab then reaches the API at ``http://198.19.0.3:6443``
through the fabric, as a node reaches its API server, and nothing listens outside the
lab's namespaces.

``ControlPlane.call(fn, ...)`` runs ``fn`` on the emulator's loop thread (the emulator's
state and its watchers live there) and returns its result. ``populate()`` writes the
cluster the lab plays: Nodes, ServiceAccounts, the workloads (Deployments with their
ReplicaSets, the agents' DaemonSet) and their Running, Ready pods with ``nodeName``,
``podIP`` and owner references, the Services of the critical apps and of the agents
(their EndpointSlices follow the pods), and the controller's ConfigMap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from detnet.lab.cluster.plan import (
    AGENT_ACCOUNT,
    AGENT_NAMESPACE,
    AGENT_PORT,
    CONTROLLER_ACCOUNT,
    CONTROLLER_NAMESPACE,
    SERVICE_CIDR,
    TCP_PROBE_PORT,
    UDP_PROBE_PORT,
    NodePlan,
    PodPlan,
    WorkloadPlan,
)
from detnet.lab.errors import LabError
from detnet.lab.kubeapi import ApiServerEmulator

_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")
CONFIG_MAP = "detnet-config"
CONFIG_KEY = "critical-apps.yaml"  # deploy/base/configmap.yaml


def socket_in_netns(netns: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, inside network namespace
    ``netns`` (a name under /run/netns)."""
    result: list[socket.socket | BaseException] = []

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            # This thread is in the namespace for the rest of its (short) life only.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(512)
            sock.setblocking(False)
            result.append(sock)
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    t = threading.Thread(target=worker, name=f"socket-in-{netns}")
    t.start()
    t.join()
    got = result[0]
    if isinstance(got, BaseException):
        raise LabError(f"cannot listen on {host}:{port} in {netns}: {got}") from got
    return got


class ControlPlane:
    """The emulator on its own event loop thread, listening in ``netns``."""

    def __init__(self, *, netns: str, host: str, port: int) -> None:
        self.netns, self.host, self.port = netns, host, port
        self.api = ApiServerEmulator(service_cidr=SERVICE_CIDR, bookmark_interval_s=0.5)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="control-plane")
        self._started = False

    def start(self) -> None:
        """Listen and serve."""
        sock = socket_in_netns(self.netns, self.host, self.port)
        self._thread.start()
        self._started = True
        try:
            asyncio.run_coroutine_threadsafe(self.api.start(sock=sock), self._loop).result(10)
        except (OSError, concurrent.futures.TimeoutError) as exc:
            raise LabError(f"the API server emulation did not start: {exc}") from exc

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the emulator's thread; its result (or exception)."""

        async def run() -> _T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def close(self) -> None:
        """Stop serving and end the thread (idempotent)."""
        if self._started:
            self._started = False
            try:
                asyncio.run_coroutine_threadsafe(self.api.close(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class PodObject:
    """A pod as the API holds it: the plan's pod with its name and UID."""

    plan: PodPlan
    namespace: str
    name: str
    uid: str


def _service_account(wl: WorkloadPlan) -> str:
    if wl.namespace == CONTROLLER_NAMESPACE:
        return CONTROLLER_ACCOUNT
    if wl.namespace == AGENT_NAMESPACE:
        return AGENT_ACCOUNT
    return "default"


def populate(
    api: ApiServerEmulator,
    *,
    nodes: Sequence[NodePlan],
    pods: Sequence[PodPlan],
    controller_config: str,
) -> dict[str, PodObject]:
    """Write the lab's cluster into ``api`` (module docstring); the pods by plan key.
    Call on the emulator's thread."""
    for node in nodes:
        api.add_node(
            node.name,
            internal_ip=node.uplink_address,
            pod_cidr=node.pod_cidr,
            labels={"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"},
        )
    for ns, name in ((CONTROLLER_NAMESPACE, CONTROLLER_ACCOUNT), (AGENT_NAMESPACE, AGENT_ACCOUNT)):
        api.put({"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": name, "namespace": ns}})  # fmt: skip
    out: dict[str, PodObject] = {}
    workloads: dict[str, WorkloadPlan] = {}
    for pod in pods:
        workloads.setdefault(pod.workload.name, pod.workload)
    for wl in workloads.values():
        mine = [p for p in pods if p.workload.name == wl.name]
        names = api.add_deployment(
            wl.namespace,
            wl.name,
            replicas=len(mine),
            labels=wl.selector,
            kind=wl.kind,
            nodes=[p.node for p in mine],
            pod_ips=[p.address for p in mine],
        )
        account = _service_account(wl)
        for plan, name in zip(mine, names, strict=True):
            obj = api.get("Pod", name, namespace=wl.namespace)
            if account != "default":
                obj = api.patch(
                    "Pod", name, {"spec": {"serviceAccountName": account}}, namespace=wl.namespace
                )
            out[plan.key] = PodObject(plan, wl.namespace, name, obj["metadata"]["uid"])
    udp = {"name": "probe-udp", "port": UDP_PROBE_PORT, "targetPort": UDP_PROBE_PORT,
           "protocol": "UDP"}  # fmt: skip
    tcp = {"name": "probe-tcp", "port": TCP_PROBE_PORT, "targetPort": TCP_PROBE_PORT}
    api.add_service(
        "critical-apps", "robot-control", selector={"app": "robot-control"}, ports=[udp]
    )
    api.add_service(
        "critical-apps", "safety-scanner", selector={"app": "safety-scanner"}, ports=[tcp]
    )
    agent_wl = workloads.get("detnet-agent")
    if agent_wl is not None:
        api.add_service(
            AGENT_NAMESPACE,
            "detnet-agent",
            selector=agent_wl.selector,
            ports=[{"name": "usage", "port": AGENT_PORT, "targetPort": AGENT_PORT}],
            cluster_ip="None",  # deploy/agent/service.yaml: headless, for discovery
            labels=agent_wl.selector,
        )
    set_controller_config(api, controller_config)
    return out


def set_controller_config(api: ApiServerEmulator, text: str) -> None:
    """The controller's ConfigMap, as deploy/base/configmap.yaml names it."""
    api.put(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "namespace": CONTROLLER_NAMESPACE},
            "data": {CONFIG_KEY: text},
        }
    )


def reset_limits(api: ApiServerEmulator, pods: Mapping[str, PodObject], *, lease: str) -> None:
    """Back to a cluster no controller has touched: no egress annotation on any pod,
    no limit recorded on any workload, no Lease. Call on the emulator's thread."""
    for pod in pods.values():
        meta = api.get("Pod", pod.name, namespace=pod.namespace)["metadata"]
        if "kubernetes.io/egress-bandwidth" in (meta.get("annotations") or {}):
            api.patch(
                "Pod",
                pod.name,
                {"metadata": {"annotations": {"kubernetes.io/egress-bandwidth": None}}},
                namespace=pod.namespace,
            )
    for kind in ("Deployment", "DaemonSet"):
        for obj in api.objects(kind):
            meta = obj["metadata"]
            ours = {k: None for k in meta.get("annotations") or {} if k.startswith("detnet.io/")}
            if ours:
                api.patch(
                    kind, meta["name"], {"metadata": {"annotations": ours}},
                    namespace=meta["namespace"],
                )  # fmt: skip
    if api.find("Lease", lease, namespace=CONTROLLER_NAMESPACE) is not None:
        api.delete("Lease", lease, namespace=CONTROLLER_NAMESPACE)
