"""The contract every enforcer keeps, so the control loop does not care which one runs.

Limits cross this boundary as whole Mbit/s per best-effort workload name (the config's
``best_effort_targets[].name``): the unit of the ``kubernetes.io/egress-bandwidth``
annotation (``"80M"``), so what the policy decides is exactly what gets written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Enforcer(Protocol):
    """Applies egress limits to best-effort workloads."""

    name: str  # "kubernetes", "tc" or "dry-run": the `enforcer` metric label

    async def start(self) -> Mapping[str, int]:
        """Connect and check access; return the limits a previous controller recorded
        (to resume from), empty when there are none. Raise EnforcementError if unusable."""
        ...

    async def apply(self, limits: Mapping[str, int]) -> None:
        """Apply ``limits`` (Mbit/s) to every workload named; return once applied.

        Raise EnforcementError when a limit could not be applied after retries."""
        ...

    async def usage(self) -> Mapping[str, float]:
        """Measured egress rate in Mbit/s per workload, where the backend can see it."""
        ...

    async def close(self, *, restore: Mapping[str, int] | None = None) -> None:
        """Finish in-flight work; with ``restore``, apply those limits first."""
        ...


class DryRunEnforcer:
    """Applies nothing and remembers what it was told: ``detnet control --dry-run``."""

    name = "dry-run"

    def __init__(self) -> None:
        self.applied: dict[str, int] = {}

    async def start(self) -> Mapping[str, int]:
        """Nothing to resume from."""
        return {}

    async def apply(self, limits: Mapping[str, int]) -> None:
        """Record the limits."""
        self.applied.update(limits)

    async def usage(self) -> Mapping[str, float]:
        """No usage is known."""
        return {}

    async def close(self, *, restore: Mapping[str, int] | None = None) -> None:
        """Nothing to release."""
