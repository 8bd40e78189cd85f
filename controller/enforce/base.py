"""The contract every enforcer keeps, so the control loop does not care which one runs.

Limits cross this boundary as whole Mbit/s per ``Scope``: a best-effort workload (the
config's ``best_effort_targets[].name``) on every node, or on one node. Mbit/s is the
unit of the ``kubernetes.io/egress-bandwidth`` annotation (``"80M"``), so what the
policy decides is exactly what gets written. An enforcer also says where the workloads'
pods run (``placements``, for per-node limits) and which pods they are (``pods``, for
the node agents' usage); one without nodes answers both with nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from detnet.controller.workloads import PodRef, Scope

__all__ = ["DryRunEnforcer", "Enforcer", "PodRef", "Scope"]


class Enforcer(Protocol):
    """Applies egress limits to best-effort workloads."""

    name: str  # "kubernetes", "tc" or "dry-run": the `enforcer` metric label

    async def start(self) -> Mapping[Scope, int]:
        """Connect and check access; return the limits a previous controller recorded
        (to resume from), empty when there are none. Raise EnforcementError if unusable."""
        ...

    async def apply(self, limits: Mapping[Scope, int]) -> None:
        """Apply ``limits`` (Mbit/s) to every scope named; return once applied. A node's
        scope overrides its workload's cluster-wide one for the pods on that node.

        Raise EnforcementError when a limit could not be applied after retries."""
        ...

    def placements(self) -> Mapping[str, frozenset[str]]:
        """Per workload, the nodes its scheduled pods run on ({} without nodes)."""
        ...

    def pods(self) -> Mapping[str, tuple[PodRef, ...]]:
        """Per workload, its running pods ({} without pods)."""
        ...

    async def usage(self) -> Mapping[Scope, float]:
        """Measured egress rate in Mbit/s per scope, where the backend can see it."""
        ...

    async def close(self, *, restore: Mapping[Scope, int] | None = None) -> None:
        """Finish in-flight work; with ``restore``, apply those limits first."""
        ...


class DryRunEnforcer:
    """Applies nothing and remembers what it was told: ``detnet control --dry-run``."""

    name = "dry-run"

    def __init__(self) -> None:
        self.applied: dict[Scope, int] = {}

    async def start(self) -> Mapping[Scope, int]:
        """Nothing to resume from."""
        return {}

    async def apply(self, limits: Mapping[Scope, int]) -> None:
        """Record the limits."""
        self.applied.update(limits)

    def placements(self) -> Mapping[str, frozenset[str]]:
        """No nodes."""
        return {}

    def pods(self) -> Mapping[str, tuple[PodRef, ...]]:
        """No pods."""
        return {}

    async def usage(self) -> Mapping[Scope, float]:
        """No usage is known."""
        return {}

    async def close(self, *, restore: Mapping[Scope, int] | None = None) -> None:
        """Nothing to release."""
