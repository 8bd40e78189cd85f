"""Sans-I/O helpers for Kubernetes API objects as raw JSON (dicts): watch events, the
resourceVersion order, annotations. No kubernetes-asyncio here: pure reducers (the pod
watch of the enforcer, later the agent's and the EndpointSlice watch) import this."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detnet.controller.errors import EnforcementError

JsonObj = dict[str, Any]

WATCH_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


@dataclass(frozen=True)
class WatchEvent:
    """One line of a watch stream: ``type`` is one of ``WATCH_EVENT_TYPES``; ``object``
    the object (a ``Status`` for ERROR, only metadata.resourceVersion for BOOKMARK)."""

    type: str
    object: JsonObj

    @property
    def resource_version(self) -> str:
        """The object's metadata.resourceVersion, "" when it has none."""
        return str(metadata_of(self.object).get("resourceVersion") or "")


def parse_watch_event(line: bytes | str, *, what: str) -> WatchEvent:
    """The event in one line of a watch stream; EnforcementError when it is not one."""
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise EnforcementError(f"{what}: unparsable watch event") from exc
    if not isinstance(event, dict):
        raise EnforcementError(f"{what}: watch event is {type(event).__name__}, not an object")
    type_, obj = event.get("type"), event.get("object")
    if type_ not in WATCH_EVENT_TYPES or not isinstance(obj, dict):
        raise EnforcementError(f"{what}: watch event of unknown type {type_!r} or no object")
    return WatchEvent(type_, obj)


def metadata_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """``obj.metadata``, empty when missing or not an object."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def name_of(obj: Mapping[str, Any]) -> str:
    """``obj.metadata.name``, "" when missing."""
    name = metadata_of(obj).get("name")
    return name if isinstance(name, str) else ""


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """``obj.metadata.annotations``, empty when missing."""
    found = metadata_of(obj).get("annotations")
    return found if isinstance(found, Mapping) else {}


def resource_version(obj: Mapping[str, Any]) -> int:
    """The resourceVersion as an int for ordering two versions of one object; 0 when
    missing or not an integer (resourceVersions are opaque: the API server's are ints
    in practice, and anything else compares as equal, so the later copy wins)."""
    try:
        return int(metadata_of(obj).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0
