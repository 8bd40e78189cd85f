"""What a best-effort workload is: the value the config builds and the enforcers take.

The config (``controller/config``) reads each ``best_effort_targets`` entry into a
``BestEffortTarget``; the Kubernetes enforcer patches the pods it names, the tc enforcer
shapes its ``TcDevice``. Here, once: every field and its default, the workload kinds and
the Kubernetes enforcement modes, in the config's words (the ones users write and
``docs/config.md`` documents). Pure values, cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

WorkloadKind = Literal["Deployment", "StatefulSet", "DaemonSet"]
KINDS: tuple[WorkloadKind, ...] = get_args(WorkloadKind)
DEFAULT_KIND: WorkloadKind = "Deployment"
DEFAULT_NAMESPACE = "default"

# annotation: patch the running pods' egress-bandwidth annotation (Cilium applies it in
# place); template: patch the workload's pod template (restarts the pods).
KubernetesMode = Literal["annotation", "template"]
MODES: tuple[KubernetesMode, ...] = get_args(KubernetesMode)
DEFAULT_MODE: KubernetesMode = "annotation"
CLUSTER = ""  # the node of a scope that spans every node


@dataclass(frozen=True, order=True)
class Scope:
    """Where a limit applies: a workload, on one ``node`` or (``CLUSTER``) on every node.
    The key of limits and usage between the policy, the loop and the enforcers."""

    workload: str
    node: str = CLUSTER

    def __str__(self) -> str:
        return self.workload if self.node == CLUSTER else f"{self.workload}@{self.node}"


@dataclass(frozen=True, order=True)
class PodRef:
    """One running pod of a best-effort workload, as the enforcer's watch knows it: the
    pods whose usage the node agents are asked for."""

    namespace: str
    name: str
    node: str | None = None
    uid: str | None = None


@dataclass(frozen=True, kw_only=True)
class TcDevice:
    """Where the tc enforcer shapes a workload: ``device`` inside ``netns`` (None: ours)."""

    device: str
    netns: str | None = None

    def __str__(self) -> str:
        return f"{self.device} in netns {self.netns}" if self.netns else self.device


@dataclass(frozen=True, kw_only=True)
class BestEffortTarget:
    """A best-effort workload whose egress is capped.

    ``name`` is the key of its limit (the policy's, the metrics', the enforcers'). The
    workload is either ``kind``/``workload`` (a named Deployment, StatefulSet or
    DaemonSet; ``workload`` None: named like ``name``) or ``selector`` (a label selector
    over pods), in ``namespace``. ``tc`` is where the tc enforcer shapes it."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    kind: WorkloadKind = DEFAULT_KIND
    workload: str | None = None
    selector: str | None = None
    initial_bandwidth: int | None = None  # Mbit/s; None: start at max_bandwidth
    tc: TcDevice | None = None

    @property
    def object_name(self) -> str:
        """The workload object's name."""
        return self.workload or self.name
