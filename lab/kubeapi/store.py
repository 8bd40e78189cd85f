"""The emulation's etcd and watch cache: objects by resource, namespace and name, the one
resourceVersion counter, a bounded history of changes for watches, and the wake-ups of
the watches that are open.

Every change is kept with the object before it (``WatchEvent.prev``), because a watch
with a selector needs both: an object that stops matching is a DELETED for that watch,
one that starts matching an ADDED (``WatchEvent.seen_by``), as the real watch cache does.
Observers (the emulated controllers) are told of every change as it is made.

No HTTP here: the server turns requests into calls on a ``Store``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from detnet.lab.kubeapi.errors import ApiError
from detnet.lab.kubeapi.patch import clone
from detnet.lab.kubeapi.resources import RESOURCES, Resource
from detnet.lab.kubeapi.validation import validate_object

JsonObj = dict[str, Any]
Key = tuple[str, str, str]  # (Resource.key, namespace or "", name)
Predicate = Callable[[JsonObj], bool]

# The alphabet of the real server's random name suffixes (no vowels, no 0/1/3).
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def random_suffix(n: int = 5) -> str:
    """A random name suffix as the real server's generateName makes."""
    return "".join(random.choices(NAME_ALPHABET, k=n))


def now_timestamp() -> str:
    """The current time as the API writes timestamps (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    """One change: the object after it (for DELETED: as it was, at the deletion's
    resourceVersion) and before it (None for ADDED)."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    obj: JsonObj
    prev: JsonObj | None

    def seen_by(self, selected: Predicate) -> tuple[str, JsonObj] | None:
        """The event a watch selecting ``selected`` objects receives, if any."""
        now_in = self.type != "DELETED" and selected(self.obj)
        was_in = self.prev is not None and selected(self.prev)
        if now_in:
            return ("MODIFIED" if was_in else "ADDED"), self.obj
        if not was_in:
            return None
        if self.type == "DELETED":
            return "DELETED", self.obj
        # It left the selection: the watch sees it deleted, as it was, at this version.
        gone = clone(self.prev)
        assert gone is not None
        gone["metadata"]["resourceVersion"] = str(self.rv)
        return "DELETED", gone


class Store:
    """Objects and their history; every write bumps the one resourceVersion."""

    def __init__(self, *, history: int) -> None:
        self._objects: dict[str, dict[tuple[str, str], JsonObj]] = {}
        self.rv = 1
        self._log: deque[WatchEvent] = deque(maxlen=history)
        self._floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._waiters: set[asyncio.Event] = set()  # one per open watch
        self.observers: list[Callable[[WatchEvent], None]] = []

    # --- watch support -------------------------------------------------------------

    def subscribe(self) -> asyncio.Event:
        """An event set on every change (and on ``wake_all()``), for one open watch."""
        wake = asyncio.Event()
        self._waiters.add(wake)
        return wake

    def unsubscribe(self, wake: asyncio.Event) -> None:
        """Forget a watch's wake-up event."""
        self._waiters.discard(wake)

    def wake_all(self) -> None:
        """Wake every open watch (on a change, or when the server closes)."""
        for waiter in self._waiters:
            waiter.set()

    def expired(self, rv: int) -> bool:
        """Whether a watch from ``rv`` can no longer be served (410 Gone)."""
        return rv < self._floor or rv > self.rv

    def events_since(self, rv: int) -> list[WatchEvent]:
        """The changes after ``rv``, oldest first."""
        # The log is in resourceVersion order: walk back to the first unseen event
        # instead of scanning the whole history on every wake (O(new), not O(history)).
        fresh: list[WatchEvent] = []
        for ev in reversed(self._log):
            if ev.rv <= rv:
                break
            fresh.append(ev)
        fresh.reverse()
        return fresh

    def compact(self) -> None:
        """Forget the watch history: a watch from any older resourceVersion gets 410."""
        self._floor = self.rv + 1
        self._log.clear()

    # --- objects -------------------------------------------------------------------

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, ev: WatchEvent) -> None:
        self._log.append(ev)
        self.wake_all()
        for observer in list(self.observers):
            observer(ev)

    def find(self, res: Resource, ns: str, name: str) -> JsonObj | None:
        """The stored object (not a copy), or None."""
        return self._objects.get(res.key, {}).get((ns, name))

    def get(self, res: Resource, ns: str, name: str) -> JsonObj:
        """The stored object (not a copy); ApiError(404) when absent."""
        obj = self.find(res, ns, name)
        if obj is None:
            raise ApiError(404, f'{res.plural} "{name}" not found', name=name, kind=res.plural)
        return obj

    def create(self, res: Resource, ns: str, obj: JsonObj, *, uid: str | None = None) -> JsonObj:
        """Store a new object (taking ownership of ``obj``): name (from generateName),
        uid, timestamp, resourceVersion."""
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = str(meta["generateName"])[:58] + random_suffix()
        if res.namespaced:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        validate_object(obj, kind=res.kind)
        key = (ns, meta["name"])
        bucket = self._objects.setdefault(res.key, {})
        if key in bucket:
            raise ApiError(
                409,
                f'{res.plural} "{meta["name"]}" already exists',
                name=meta["name"],
                kind=res.plural,
            )
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta.update(
            uid=uid or str(uuid.uuid4()),
            creationTimestamp=now_timestamp(),
            resourceVersion=str(self._bump()),
        )
        for stale in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(stale, None)
        if res.generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        bucket[key] = obj
        self._emit(WatchEvent(self.rv, "ADDED", (res.key, *key), obj, None))
        return obj

    def replace(self, res: Resource, ns: str, obj: JsonObj) -> JsonObj:
        """Replace an object (taking ownership of ``obj``); 409 when its resourceVersion
        is set and stale."""
        name = obj["metadata"]["name"]
        old = self.get(res, ns, name)
        want_rv = obj["metadata"].get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                name=name,
                kind=res.plural,
            )
        new = obj
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        meta = new["metadata"]
        for immutable in ("uid", "creationTimestamp", "namespace", "generation"):
            if immutable in old["metadata"]:
                meta[immutable] = old["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        validate_object(new, kind=res.kind)
        if new == old:
            return old  # no-op writes do not bump the resourceVersion, as on a real server
        if res.generation and any(new.get(f) != old.get(f) for f in res.generation):
            meta["generation"] = old["metadata"].get("generation", 1) + 1
        meta["resourceVersion"] = str(self._bump())
        self._objects[res.key][(ns, name)] = new
        self._emit(WatchEvent(self.rv, "MODIFIED", (res.key, ns, name), new, old))
        return new

    def delete(self, res: Resource, ns: str, name: str) -> JsonObj:
        """Remove an object; return it as it was, at the deletion's resourceVersion."""
        old = self.get(res, ns, name)
        del self._objects[res.key][(ns, name)]
        gone = clone(old)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._emit(WatchEvent(self.rv, "DELETED", (res.key, ns, name), gone, old))
        return gone

    def select(
        self, res: Resource, ns: str | None, selected: Predicate | None = None
    ) -> list[JsonObj]:
        """The stored objects of ``res`` (in ``ns``, or all), sorted by namespace and name
        (etcd's key order), that ``selected`` accepts."""
        bucket = self._objects.get(res.key, {})
        return [
            obj
            for (n, _), obj in sorted(bucket.items(), key=lambda item: item[0])
            if ns in (None, n) and (selected is None or selected(obj))
        ]

    def in_order(self, res: Resource) -> list[JsonObj]:
        """The stored objects of ``res`` in the order they were created."""
        return list(self._objects.get(res.key, {}).values())

    def all_objects(self) -> list[tuple[Resource, JsonObj]]:
        """Every stored object with its resource (for the garbage collector)."""
        by_key = {r.key: r for r in RESOURCES}
        return [(by_key[k], o) for k, bucket in self._objects.items() for o in bucket.values()]
