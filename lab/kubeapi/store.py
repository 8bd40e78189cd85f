"""The emulation's etcd and watch cache: objects by (resource, namespace, name), the one
resourceVersion counter, a bounded history of changes for watches, and the wake-ups of
the watches that are open.

No HTTP here: the server turns requests into calls on a ``Store`` and streams
``events_since()`` to its watches."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from detnet.lab.kubeapi.errors import ApiError
from detnet.lab.kubeapi.resources import Resource
from detnet.lab.kubeapi.selectors import selector_matches

JsonObj = dict[str, Any]
Key = tuple[str, str, str]  # (Resource.key, namespace, name)


@dataclass(frozen=True)
class WatchEvent:
    """One change as a watch from an older resourceVersion sees it."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    obj: JsonObj


def validate(obj: JsonObj, kind: str) -> None:
    """The validation the real server does that our clients could trip over."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ApiError(422, f"{kind}: metadata.name is required", kind=kind)
    for what in ("labels", "annotations"):
        values = meta.get(what) or {}
        if not isinstance(values, dict):
            raise ApiError(422, f"metadata.{what} must be a map", name=meta["name"], kind=kind)
        for k, v in values.items():
            if not isinstance(v, str):
                raise ApiError(
                    422,
                    f"metadata.{what}[{k}]: Invalid value: must be a string",
                    name=meta["name"],
                    kind=kind,
                )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Objects and their history; every write bumps the one resourceVersion."""

    def __init__(self, *, history: int) -> None:
        self.objects: dict[Key, JsonObj] = {}
        self.rv = 1
        self._log: deque[WatchEvent] = deque(maxlen=history)
        self._floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._waiters: set[asyncio.Event] = set()  # one per open watch

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

    def _emit(self, type_: str, key: Key, obj: JsonObj) -> None:
        self._log.append(WatchEvent(int(obj["metadata"]["resourceVersion"]), type_, key, obj))
        self.wake_all()

    def find(self, res: Resource, ns: str, name: str) -> JsonObj | None:
        """The stored object (not a copy), or None."""
        return self.objects.get((res.key, ns, name))

    def get(self, res: Resource, ns: str, name: str) -> JsonObj:
        """The stored object (not a copy); ApiError(404) when absent."""
        obj = self.objects.get((res.key, ns, name))
        if obj is None:
            raise ApiError(404, f'{res.plural} "{name}" not found', name=name, kind=res.plural)
        return obj

    def create(self, res: Resource, ns: str, obj: JsonObj) -> JsonObj:
        """Store a new object: name (from generateName), uid, timestamps, resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        validate(obj, res.kind)
        key = (res.key, ns, meta["name"])
        if key in self.objects:
            raise ApiError(
                409,
                f'{res.plural} "{meta["name"]}" already exists',
                name=meta["name"],
                kind=res.plural,
            )
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta.update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=str(self._bump()),
        )
        if res.group == "apps":
            meta.setdefault("generation", 1)
        self.objects[key] = obj
        self._emit("ADDED", key, obj)
        return obj

    def replace(self, res: Resource, ns: str, obj: JsonObj) -> JsonObj:
        """Replace an object; 409 when its resourceVersion is set and stale."""
        validate(obj, res.kind)
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
        new = copy.deepcopy(obj)
        new["kind"], new["apiVersion"] = res.kind, res.api_version
        for immutable in ("uid", "creationTimestamp", "namespace"):
            new["metadata"][immutable] = old["metadata"].get(immutable, ns)
        if new == old:
            return old  # no-op writes do not bump the resourceVersion, as on a real server
        if "generation" in old["metadata"]:
            spec_changed = new.get("spec") != old.get("spec")
            new["metadata"]["generation"] = old["metadata"]["generation"] + int(spec_changed)
        new["metadata"]["resourceVersion"] = str(self._bump())
        key = (res.key, ns, name)
        self.objects[key] = new
        self._emit("MODIFIED", key, new)
        return new

    def delete(self, res: Resource, ns: str, name: str) -> JsonObj:
        """Remove an object; return it as it was, at the deletion's resourceVersion."""
        obj = self.get(res, ns, name)
        key = (res.key, ns, name)
        del self.objects[key]
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._emit("DELETED", key, gone)
        return gone

    def list(self, res: Resource, ns: str | None, selector: str) -> list[JsonObj]:
        """The stored objects of ``res`` (in ``ns``, or all) matching a label selector."""
        return [
            o
            for (r, n, _), o in sorted(self.objects.items())
            if r == res.key
            and ns in (None, n)
            and selector_matches(selector, o["metadata"].get("labels") or {})
        ]
