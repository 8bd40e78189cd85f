"""The engine's probe targets kept in step with the critical apps' endpoints.

Each ``EndpointWatch`` delivers ``EndpointDiff``s to ``EndpointProbes.on_change``
(synchronously, from the watch's task); the probes fold them into the wanted set and one
task applies it to the engine with ``replace_targets``: serially, so two quick diffs
never race, and coalesced, so a burst of slice writes costs one engine change. The
targets of apps probed at their Service address are part of the set and never change.
``endpoints()`` is what the control loop gives the policy: what each probed target
stands for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

from detnet.controller.endpoints.feed import EndpointDiff
from detnet.controller.endpoints.slices import ProbeEndpoint
from detnet.engine.core import TargetChanges
from detnet.engine.targets import Endpoint, Target

log = logging.getLogger(__name__)


class TargetSink(Protocol):
    """What the probes need of the engine."""

    async def replace_targets(self, targets: Iterable[Target]) -> TargetChanges:
        """Make the probed set exactly ``targets``."""
        ...


class EndpointProbes:
    """The probe targets of ``static`` (Service-address apps) and of every endpoint of
    the apps in ``templates`` (app -> its checked Target: protocol, port, cadence,
    mode and size that each of its endpoints is probed with)."""

    def __init__(
        self,
        *,
        engine: TargetSink,
        templates: Mapping[str, Target],
        static: Iterable[Target] = (),
    ) -> None:
        self._engine = engine
        self._templates = dict(templates)
        self._static = tuple(static)
        self._wanted: dict[str, dict[str, ProbeEndpoint]] = {app: {} for app in templates}
        self._probed: dict[str, Endpoint] = {}
        self._dirty = asyncio.Event()
        self.changes = 0  # engine changes applied (for tests and the log)

    def on_change(self, diff: EndpointDiff) -> None:
        """An app's endpoints changed: probe ``diff.current`` from now on."""
        if diff.app not in self._wanted:
            log.warning("endpoints of an app that is not probed by endpoint: %s", diff.app)
            return
        self._wanted[diff.app] = {ep.name: ep for ep in diff.current}
        self._dirty.set()

    def endpoints(self) -> Mapping[str, Endpoint]:
        """What each probed endpoint target stands for (app, node, pod), by name."""
        return self._probed

    def targets(self) -> list[Target]:
        """The set the engine should probe now."""
        out = list(self._static)
        for app, endpoints in self._wanted.items():
            template = self._templates[app]
            for ep in endpoints.values():
                out.append(
                    ep.as_target(
                        protocol=template.protocol,
                        interval_ns=template.interval_ns,
                        timeout_ns=template.timeout_ns,
                        mode=template.mode,
                        size=template.size,
                    )
                )
        return out

    async def sync(self) -> TargetChanges:
        """Apply the wanted set to the engine once."""
        self._dirty.clear()
        wanted = self.targets()
        changes = await self._engine.replace_targets(wanted)
        for name, why in changes.failed.items():
            log.warning("endpoint %s is not probed: %s", name, why)
        skip = set(changes.failed) | {t.name for t in self._static}
        self._probed = {
            t.name: t.endpoint for t in wanted if t.endpoint is not None and t.name not in skip
        }
        self.changes += 1
        return changes

    async def run(self) -> None:
        """Apply every change as it comes, until cancelled."""
        while True:
            await self._dirty.wait()
            await self.sync()
