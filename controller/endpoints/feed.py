"""When a change in an app's endpoints reaches the engine, sans-I/O: time comes in as
``now_ns``, ``Resolution``s (what the slices say) come in, ``EndpointDiff``s (what to tell
the engine) and the next deadline go out.

An added or changed endpoint, and one whose slice now says it is not ready or
terminating, is delivered at once. One that vanished from every slice is held back for
``removal_grace_ns`` and delivered only if it has not come back by then: the EndpointSlice
controller moves an address between slices with two writes in no set order, and a
remove-then-add must not become a probe gap and a new set of series. A pod deleted
without a grace period leaves its slice that way too, so the grace is short (it is still
probed, and its probes lost, for that long; a probe timeout of at least the grace keeps
those losses from being counted before the target goes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from detnet.controller.endpoints.slices import ProbeEndpoint, Resolution

DEFAULT_REMOVAL_GRACE_NS = 500_000_000  # two slice writes of one controller sync: ~ms


@dataclass(frozen=True, kw_only=True)
class EndpointDiff:
    """A change in one app's probe endpoints: ``added`` and ``changed`` (same name, a
    new address, port or node: re-create the target) endpoints, ``removed`` ones, and
    ``current``, every endpoint after the change, by name. ``initial`` for the first
    delivery after start, which lists everything (and may be empty)."""

    app: str
    added: tuple[ProbeEndpoint, ...] = ()
    changed: tuple[ProbeEndpoint, ...] = ()
    removed: tuple[ProbeEndpoint, ...] = ()
    current: tuple[ProbeEndpoint, ...] = ()
    initial: bool = False

    def __bool__(self) -> bool:
        return self.initial or bool(self.added or self.changed or self.removed)


class EndpointFeed:
    """What the consumer of one app's endpoints has been told, and what is held back."""

    def __init__(self, app: str, *, removal_grace_ns: int = DEFAULT_REMOVAL_GRACE_NS) -> None:
        if removal_grace_ns < 0:
            raise ValueError(f"removal_grace_ns must be >= 0, got {removal_grace_ns}")
        self.app = app
        self._grace_ns = removal_grace_ns
        self._told: dict[str, ProbeEndpoint] = {}
        self._wanted: dict[str, ProbeEndpoint] = {}
        self._held: dict[str, int] = {}  # name -> when its removal is due
        self._started = False

    @property
    def delivered(self) -> Mapping[str, ProbeEndpoint]:
        """The endpoints the consumer holds now, by name."""
        return self._told

    @property
    def next_deadline_ns(self) -> int | None:
        """When ``due()`` has a held removal to deliver, None when nothing is held."""
        return min(self._held.values(), default=None)

    def offer(self, resolution: Resolution, *, now_ns: int) -> EndpointDiff:
        """Take what the slices say now; the diff to deliver at once (false when empty)."""
        self._wanted = dict(resolution.endpoints)
        removed = []
        for name in self._told.keys() - self._wanted.keys():
            if name in resolution.listed or self._grace_ns == 0:
                removed.append(name)  # a slice says it is out: no waiting
                self._held.pop(name, None)
            else:
                self._held.setdefault(name, now_ns + self._grace_ns)
        for name in self._held.keys() & self._wanted.keys():
            del self._held[name]  # it came back: never withdrawn
        return self._deliver(removed)

    def due(self, *, now_ns: int) -> EndpointDiff:
        """The held removals whose grace has passed (false when none)."""
        expired = [name for name, at in self._held.items() if at <= now_ns]
        for name in expired:
            del self._held[name]
        return self._deliver(expired) if expired else EndpointDiff(app=self.app)

    def _deliver(self, removed: list[str]) -> EndpointDiff:
        added, changed = [], []
        for name, ep in self._wanted.items():
            old = self._told.get(name)
            if old is None:
                added.append(ep)
            elif old != ep:
                changed.append(ep)
            self._told[name] = ep
        gone = [self._told.pop(name) for name in sorted(removed)]
        initial, self._started = not self._started, True
        return EndpointDiff(
            app=self.app,
            added=tuple(sorted(added, key=_name)),
            changed=tuple(sorted(changed, key=_name)),
            removed=tuple(gone),
            current=tuple(sorted(self._told.values(), key=_name)),
            initial=initial,
        )


def _name(ep: ProbeEndpoint) -> str:
    return ep.name
