"""The EndpointSlices of one Service reduced to the endpoints detnet probes, sans-I/O.

``reduce_slices(slices, spec)`` is the whole rule; ``SliceCache`` keeps the slices of one
watch (list, then ADDED/MODIFIED/DELETED) parsed once each and gives the same answer
from what it holds, whatever the order of events that led there.

Which endpoints are probed (``discovery.k8s.io/v1`` ``EndpointConditions``):

- ``ready`` false, ``serving`` false or ``terminating`` true: not probed. An absent or
  null condition is the API's "unknown": ``ready`` and ``serving`` count as true (the
  API: "consumers should interpret this unknown state as ready"; a null ``serving``
  defers to ``ready``), ``terminating`` as false. ``serving`` matters for a Service with
  ``publishNotReadyAddresses``, whose endpoints are all ``ready`` while ``serving`` still
  says whether the pod is; ``terminating`` because a pod shutting down stops answering
  probes, and its losses are not the network's.
- The first address of each endpoint is its address (the API: the addresses of one
  endpoint are fungible; kube-proxy uses the first). It must be an address of the
  slice's ``addressType``; ``FQDN`` slices (and unknown types) are not probed. Unspecified,
  multicast and scoped (``fe80::1%eth0``) addresses are not probed.
- The port is the app's number, or, when the app names a port, that port of the endpoint's
  slice (slices group endpoints by their port numbers); a slice without it is not
  probed, and says so.

An endpoint is one target, named ``{app}/{pod}`` when its ``targetRef`` is a Pod, else
``{app}/{address}``: stable for the pod's life, and one name however many slices list it.
When several slices list one endpoint (an address moving between slices during an
update, or a dual-stack pod in an IPv4 and an IPv6 slice) one copy decides: the app's
address family first, then the most recently written slice (highest resourceVersion),
then the slice name. What is not probed and why comes back as ``Skipped`` notes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from detnet.controller.kube.objects import JsonObj, WatchEvent, metadata_of, name_of
from detnet.controller.kube.objects import resource_version as rv_of
from detnet.engine.parse import show
from detnet.engine.targets import Endpoint, Protocol, Target

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
AddressFamily = Literal["IPv4", "IPv6"]
ADDRESS_FAMILIES: tuple[AddressFamily, ...] = ("IPv4", "IPv6")
MAX_ENDPOINTS = 5000
"""Endpoints probed per app at most (Kubernetes' tested limit per Service); beyond it the
first by name are kept and the rest skipped, with a note."""
# apimachinery's IsDNS1123Subdomain: a pod's or a node's name.
_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


@dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """How one critical app's endpoints become probe targets: the app's ``name``, its
    ``port`` (a number, or the name of a Service port), the ``protocol`` it probes
    (a named port of another protocol is not used) and its address ``family`` (the
    Service's primary one: a dual-stack pod is probed once, over this family)."""

    app: str
    port: int | str
    protocol: Protocol
    family: AddressFamily = "IPv4"

    def __post_init__(self) -> None:
        named = isinstance(self.port, str) and bool(self.port)
        if isinstance(self.port, bool) or not (named or isinstance(self.port, int)):
            raise ValueError(f"port must be a number or a port name, got {self.port!r}")
        icmp = self.protocol == "icmp" and self.port == 0  # ICMP has no port
        if isinstance(self.port, int) and not icmp and not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is not in 1..65535")
        if self.family not in ADDRESS_FAMILIES:
            raise ValueError(f"family must be IPv4 or IPv6, got {self.family!r}")


@dataclass(frozen=True, kw_only=True)
class ProbeEndpoint:
    """One endpoint to probe: target ``name``, its ``app``, ``address`` (canonical form)
    and ``port``, and the ``pod`` and ``node`` it is on (None when the slice does not
    say)."""

    app: str
    name: str
    address: str
    port: int
    pod: str | None
    node: str | None

    def as_target(self, *, protocol: Protocol, **fields: Any) -> Target:
        """The engine's ``Target`` for this endpoint, carrying its app, pod and node;
        ``fields`` are the app's other Target fields (interval_ns, timeout_ns, mode,
        size, key...). TargetError when the engine refuses them."""
        return Target(
            name=self.name,
            protocol=protocol,
            host=self.address,
            port=self.port,
            endpoint=Endpoint(app=self.app, node=self.node, pod=self.pod),
            **fields,
        )


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """Endpoints of one slice that are not probed for one reason (or known only in part):
    ``why`` is a fixed phrase (a key to log once), ``count`` how many, ``example`` one
    of them as the slice spells it."""

    slice: str
    why: str
    count: int = 1
    example: str = ""

    def describe(self, namespace: str) -> str:
        """One line for the log."""
        eg = f" (e.g. {self.example})" if self.example else ""
        many = f"{self.count} endpoint(s): " if self.count != 1 or self.example else ""
        return f"EndpointSlice {namespace}/{self.slice}: {many}{self.why}{eg}"


@dataclass(frozen=True, kw_only=True)
class _Copy:
    """One slice's copy of one endpoint."""

    endpoint: ProbeEndpoint
    probed: bool  # its conditions and port allow probing
    rank: tuple[bool, int, str]  # higher wins: (app's family, slice resourceVersion, slice)


@dataclass(frozen=True, kw_only=True)
class SliceView:
    """One slice, parsed for one ``EndpointSpec``: its copies by target name."""

    name: str
    copies: Mapping[str, _Copy]
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """What the slices of one Service say: ``endpoints`` to probe by target name;
    ``listed``, every target name some slice lists (probed or not: an endpoint gone
    from every slice may be moving between two, one listed but not probed is out for
    sure); ``skipped``, what is not probed and why."""

    endpoints: Mapping[str, ProbeEndpoint]
    listed: frozenset[str]
    skipped: tuple[Skipped, ...]


def endpoint_target_name(app: str, *, pod: str | None, address: str) -> str:
    """``{app}/{pod}``, or ``{app}/{address}`` for an endpoint that is not a known pod."""
    return f"{app}/{pod or address}"


def _condition(conditions: Mapping[str, Any], key: str, unknown: bool) -> bool:
    value = conditions.get(key)
    return value if isinstance(value, bool) else unknown


def _probed_by_conditions(endpoint: Mapping[str, Any]) -> bool:
    raw = endpoint.get("conditions")
    conditions: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    ready = _condition(conditions, "ready", True)
    # Null serving "defers to ready"; as ready is already required, that is "true".
    serving = _condition(conditions, "serving", True)
    terminating = _condition(conditions, "terminating", False)
    return ready and serving and not terminating


def _named(value: Any) -> str | None:
    return value if isinstance(value, str) and _SUBDOMAIN.fullmatch(value) else None


class _Notes:
    """Skipped notes of one slice, one per reason, with a count and a first example."""

    def __init__(self, slice_name: str) -> None:
        self._slice = slice_name
        self._by_why: dict[str, list[Any]] = {}

    def add(self, why: str, example: object = "") -> None:
        note = self._by_why.setdefault(why, [0, show(example) if example != "" else ""])
        note[0] += 1

    def done(self) -> tuple[Skipped, ...]:
        return tuple(
            Skipped(slice=self._slice, why=why, count=n, example=eg)
            for why, (n, eg) in self._by_why.items()
        )


def _slice_port(obj: Mapping[str, Any], spec: EndpointSpec) -> tuple[int | None, str]:
    """The port this slice's endpoints are probed on, or None and why not."""
    if isinstance(spec.port, int):
        return spec.port, ""
    ports = obj.get("ports")
    for port in ports if isinstance(ports, list) else ():
        if not isinstance(port, Mapping) or port.get("name") != spec.port:
            continue
        number, protocol = port.get("port"), port.get("protocol") or "TCP"
        if protocol != spec.protocol.upper():
            why = f"port {show(spec.port)} is {show(protocol)}, the app probes {spec.protocol}"
            return None, why
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            return None, f"port {show(spec.port)} has no usable number ({show(number)})"
        return number, ""
    return None, f"no port named {show(spec.port)}: not probed"


def parse_slice(obj: Mapping[str, Any], spec: EndpointSpec) -> SliceView:
    """One EndpointSlice's copies of its endpoints, by target name."""
    slice_name = name_of(obj)
    notes = _Notes(slice_name)
    copies: dict[str, _Copy] = {}
    family = obj.get("addressType")
    raw = obj.get("endpoints")
    endpoints = raw if isinstance(raw, list) else []
    if raw is not None and not isinstance(raw, list):
        notes.add("endpoints is not a list: ignored")
    if family not in ADDRESS_FAMILIES:
        if endpoints:
            why = (
                "addressType FQDN lists names, not addresses: not probed"
                if family == "FQDN"
                else f"addressType {show(family)} is not IPv4 or IPv6: not probed"
            )
            notes.add(why)
        return SliceView(name=slice_name, copies={}, skipped=notes.done())
    port, no_port = _slice_port(obj, spec)
    rank = (family == spec.family, rv_of(obj), slice_name)
    version = 4 if family == "IPv4" else 6
    for ep in endpoints:
        if not isinstance(ep, Mapping):
            notes.add("an endpoint that is not an object: ignored")
            continue
        addresses = ep.get("addresses")
        first = addresses[0] if isinstance(addresses, list) and addresses else None
        try:
            ip = ipaddress.ip_address(first) if isinstance(first, str) else None
        except ValueError:
            ip = None
        if ip is None or ip.version != version:
            notes.add(f"address not an {family} address: not probed", first or "")
            continue
        if ip.is_unspecified or ip.is_multicast or getattr(ip, "scope_id", None):
            notes.add("unspecified, multicast or scoped address: not probed", first)
            continue
        ref = ep.get("targetRef")
        pod = None
        if isinstance(ref, Mapping) and ref.get("kind") == "Pod":
            pod = _named(ref.get("name"))
            if pod is None:
                notes.add("targetRef names no valid pod: named by address", ref.get("name"))
        node = _named(ep.get("nodeName"))
        if node is None and ep.get("nodeName") not in (None, ""):
            notes.add("nodeName is not a node name: node unknown", ep.get("nodeName"))
        address = str(ip)
        name = endpoint_target_name(spec.app, pod=pod, address=address)
        probed = _probed_by_conditions(ep)
        if probed and port is None:
            notes.add(no_port)
        copy = _Copy(
            endpoint=ProbeEndpoint(
                app=spec.app, name=name, address=address, port=port or 0, pod=pod, node=node
            ),
            probed=probed and port is not None,
            rank=rank,
        )
        old = copies.get(name)  # a pod listed twice in one slice: the lower address wins
        if old is None or address < old.endpoint.address:
            copies[name] = copy
    return SliceView(name=slice_name, copies=copies, skipped=notes.done())


def merge(views: Iterable[SliceView]) -> Resolution:
    """The endpoints that ``views`` (the parsed slices of one Service) say to probe."""
    best: dict[str, _Copy] = {}
    skipped: list[Skipped] = []
    for view in sorted(views, key=lambda v: v.name):
        skipped.extend(view.skipped)
        for name, copy in view.copies.items():
            old = best.get(name)
            if old is None or _wins(copy, old):
                best[name] = copy
    names = sorted(name for name, copy in best.items() if copy.probed)
    if len(names) > MAX_ENDPOINTS:
        over = names[MAX_ENDPOINTS:]
        skipped.append(
            Skipped(
                slice="*",
                why=f"more than {MAX_ENDPOINTS} endpoints: the last by name are not probed",
                count=len(over),
                example=over[0],
            )
        )
        names = names[:MAX_ENDPOINTS]
    return Resolution(
        endpoints={name: best[name].endpoint for name in names},
        listed=frozenset(best),
        skipped=tuple(skipped),
    )


def _wins(new: _Copy, old: _Copy) -> bool:
    if new.rank != old.rank:
        return new.rank > old.rank
    return new.endpoint.address < old.endpoint.address


def reduce_slices(
    slices: Iterable[Mapping[str, Any]], spec: EndpointSpec, *, service: str
) -> Resolution:
    """The endpoints to probe from the EndpointSlices of Service ``service`` (the whole
    rule; see the module docstring). Slices of another Service are ignored; of two
    copies of one slice, the newer (by resourceVersion) counts."""
    newest: dict[str, Mapping[str, Any]] = {}
    for obj in slices:
        name = name_of(obj)
        fresher = name not in newest or rv_of(obj) >= rv_of(newest[name])
        if name and belongs_to(obj, service) and fresher:
            newest[name] = obj
    return merge(parse_slice(obj, spec) for obj in newest.values())


def belongs_to(obj: Mapping[str, Any], service: str) -> bool:
    """Whether ``obj``'s ``kubernetes.io/service-name`` label names ``service``."""
    labels = metadata_of(obj).get("labels")
    return isinstance(labels, Mapping) and labels.get(SERVICE_NAME_LABEL) == service


@dataclass
class SliceCache:
    """The slices of one Service as a list+watch last showed them, parsed for ``spec``.

    ``service`` is the Service's name: a slice whose ``kubernetes.io/service-name`` label
    says otherwise is dropped. ``synced`` once a list filled it."""

    spec: EndpointSpec
    service: str
    views: dict[str, SliceView] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    synced: bool = False

    def replace(self, items: Iterable[JsonObj]) -> None:
        """A list result: the cache becomes exactly its slices of this Service (a slice
        whose resourceVersion it already holds is not parsed again: a re-list is cheap)."""
        old_views, old_versions = self.views, self.versions
        self.views, self.versions = {}, {}
        for item in items:
            name, version = name_of(item), rv_of(item)
            if version and old_versions.get(name) == version and belongs_to(item, self.service):
                self.views[name], self.versions[name] = old_views[name], version
            else:
                self.put(item)
        self.synced = True

    def put(self, obj: JsonObj) -> None:
        """Store one slice unless the cache holds a newer copy (by resourceVersion)."""
        name = name_of(obj)
        if not name:
            return
        if not belongs_to(obj, self.service):
            self.discard(name)  # relabelled away from this Service
            return
        version = rv_of(obj)
        if name in self.versions and version < self.versions[name]:
            return
        self.views[name] = parse_slice(obj, self.spec)
        self.versions[name] = version

    def discard(self, name: str) -> None:
        """Forget a slice (deleted)."""
        self.views.pop(name, None)
        self.versions.pop(name, None)

    def apply_event(self, event: WatchEvent) -> None:
        """Fold one watch event in (BOOKMARK and ERROR change nothing)."""
        if event.type == "DELETED":
            self.discard(name_of(event.object))
        elif event.type in ("ADDED", "MODIFIED"):
            self.put(event.object)

    def resolve(self) -> Resolution:
        """The endpoints to probe now."""
        return merge(self.views.values())
