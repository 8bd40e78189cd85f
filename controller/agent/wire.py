"""The ``GET /v1/usage`` document, written by the agent and read by the controller's
client (``controller/usage.py``): one place for its shape.

```json
{"node": "node-a", "at": "2026-11-29T10:00:00.000000Z", "interval_s": 0.1,
 "pods": [{"namespace": "factory", "name": "telemetry-upload-7d9f-abc", "uid": "...",
           "egress_bps": 1.2e7, "ingress_bps": 3.1e4,
           "egress_bps_1s": 1.1e7, "ingress_bps_1s": 2.9e4}]}
```

Rates are bytes per second, ``null`` where unknown (not measurable, not resolved yet,
just after a counter reset); ``at`` is when the sample was taken (UTC). The reader
checks every field and bounds the document, so a broken or hostile agent can make the
controller's usage unknown, never wrong.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Where the controller finds the agents and how it asks them (deploy/agent, deploy/base).
AGENT_NAMESPACE = "detnet-agent"
AGENT_SERVICE = "detnet-agent"
DEFAULT_DEADLINE_S = 0.2
DEFAULT_TOKEN_PATH = "/var/run/secrets/detnet/agent/token"
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024  # ~250 bytes a pod: tens of thousands of pods
MAX_PODS = 20_000
RATE_FIELDS = ("egress_bps", "ingress_bps", "egress_bps_1s", "ingress_bps_1s")
_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_MAX_NAME = 253


class WireError(ValueError):
    """A usage document that does not have the expected shape."""


@dataclass(frozen=True)
class PodUsage:
    """One pod's usage in bytes per second; None where unknown."""

    namespace: str
    name: str
    uid: str
    egress_bps: float | None = None
    ingress_bps: float | None = None
    egress_bps_1s: float | None = None
    ingress_bps_1s: float | None = None


@dataclass(frozen=True)
class NodeUsage:
    """What one agent reported: its node, when, at which sampling interval."""

    node: str
    at: str
    interval_s: float
    pods: tuple[PodUsage, ...]


def format_at(wall_s: float) -> str:
    """A Unix time as the document writes it: ``2026-11-29T10:00:00.000000Z``."""
    moment = dt.datetime.fromtimestamp(wall_s, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(*, node: str, at: str, interval_s: float, pods: Iterable[PodUsage]) -> bytes:
    """The document, as compact JSON bytes."""
    return encode_document(
        node=node, at=at, interval_s=interval_s, pods=[encode_pod(p) for p in pods]
    )


def encode_pod(p: PodUsage) -> bytes:
    """One entry of ``pods``, as JSON bytes (``encode_document`` joins them)."""
    entry = {
        "namespace": p.namespace,
        "name": p.name,
        "uid": p.uid,
        **{f: _finite(getattr(p, f)) for f in RATE_FIELDS},
    }
    return json.dumps(entry, separators=(",", ":"), allow_nan=False).encode()


class PodEncoder:
    """Writes ``encode_pod``'s bytes, fast: each pod's names are encoded once and kept,
    its rates formatted each time (``repr`` of a finite float is its JSON). For the
    agent, which writes every pod's entry at every snapshot asked for."""

    def __init__(self, *, keep: int = 2 * MAX_PODS) -> None:
        self._keep = keep
        self._heads: dict[tuple[str, str, str], str] = {}

    def encode(
        self,
        namespace: str,
        name: str,
        uid: str,
        rates: tuple[float | None, float | None, float | None, float | None],
    ) -> bytes:
        """The entry of one pod; ``rates`` in ``RATE_FIELDS`` order."""
        key = (namespace, name, uid)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= self._keep:
                self._heads.clear()  # pods come and go: start again rather than grow
            entry = {"namespace": namespace, "name": name, "uid": uid}
            head = json.dumps(entry, separators=(",", ":"))[:-1]
            self._heads[key] = head
        e, i, e1, i1 = (_json_rate(v) for v in rates)
        return (
            f'{head},"egress_bps":{e},"ingress_bps":{i},"egress_bps_1s":{e1},"ingress_bps_1s":{i1}}}'
        ).encode()


def _json_rate(value: float | None) -> str:
    return repr(float(value)) if value is not None and math.isfinite(value) else "null"


def encode_document(*, node: str, at: str, interval_s: float, pods: list[bytes]) -> bytes:
    """The document around already encoded ``pods`` entries."""
    head = json.dumps(
        {"node": node, "at": at, "interval_s": interval_s}, separators=(",", ":"), allow_nan=False
    ).encode()
    return head[:-1] + b',"pods":[' + b",".join(pods) + b"]}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def decode(data: bytes) -> NodeUsage:
    """Read a document; WireError saying what is wrong with it."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise WireError(f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise WireError("not JSON") from exc
    if not isinstance(doc, dict):
        raise WireError("not a JSON object")
    node = _text(doc, "node")
    at = _text(doc, "at")
    if not _AT.fullmatch(at):
        raise WireError(f"at: {at[:40]!r} is not a UTC time like 2026-11-29T10:00:00.000000Z")
    interval = doc.get("interval_s")
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise WireError("interval_s: not a number")
    if not 0 < interval <= 3600:
        raise WireError("interval_s: not within (0, 3600] seconds")
    pods = doc.get("pods")
    if not isinstance(pods, list):
        raise WireError("pods: not a list")
    if len(pods) > MAX_PODS:
        raise WireError(f"pods: more than {MAX_PODS}")
    return NodeUsage(
        node=node,
        at=at,
        interval_s=float(interval),
        pods=tuple(_pod(p, i) for i, p in enumerate(pods)),
    )


def _text(obj: dict[str, Any], key: str, where: str = "") -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise WireError(f"{where}{key}: not a non-empty string of at most {_MAX_NAME} characters")
    return value


def _pod(obj: Any, i: int) -> PodUsage:
    where = f"pods[{i}]."
    if not isinstance(obj, dict):
        raise WireError(f"pods[{i}]: not an object")
    rates: dict[str, float | None] = {}
    for f in RATE_FIELDS:
        if f not in obj:
            raise WireError(f"{where}{f}: missing (null when unknown)")
        value = obj[f]
        if value is None:
            rates[f] = None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{where}{f}: not a number or null")
        elif not math.isfinite(value) or value < 0:
            raise WireError(f"{where}{f}: not a finite rate >= 0")
        else:
            rates[f] = float(value)
    return PodUsage(
        namespace=_text(obj, "namespace", where),
        name=_text(obj, "name", where),
        uid=_text(obj, "uid", where),
        **rates,
    )
