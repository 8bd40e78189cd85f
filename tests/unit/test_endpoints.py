"""EndpointSlices to probe endpoints, without HTTP: the reducer as a table, the slice
cache against the reducer under any event order (hypothesis), the delivery timing with a
fake clock, and the ``service:`` parser with hostile input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.controller.endpoints.feed import EndpointFeed
from detnet.controller.endpoints.service import (
    MAX_SERVICE_CHARS,
    ServiceNameError,
    ServiceRef,
    parse_service,
)
from detnet.controller.endpoints.slices import (
    MAX_ENDPOINTS,
    SERVICE_NAME_LABEL,
    EndpointSpec,
    ProbeEndpoint,
    Resolution,
    SliceCache,
    reduce_slices,
)
from detnet.controller.endpoints.watch import service_info
from detnet.controller.kube.objects import WatchEvent
from detnet.engine.targets import NAME_PATTERN, Endpoint

SVC = "robot"
UDP = EndpointSpec(app="robot-control", port=7000, protocol="udp")

_UNSET = object()


def ep(
    address: str | None = "10.0.0.1",
    *,
    pod: str | None = "robot-0",
    node: str | None = "node-a",
    ready: Any = True,
    serving: Any = _UNSET,
    terminating: Any = _UNSET,
    conditions: Any = _UNSET,
    kind: str = "Pod",
    addresses: Any = _UNSET,
) -> dict[str, Any]:
    """One endpoint; a condition left _UNSET is absent, None is JSON null."""
    out: dict[str, Any] = {"addresses": [address] if addresses is _UNSET else addresses}
    if conditions is _UNSET:
        conds: dict[str, Any] = {"ready": ready}
        if serving is not _UNSET:
            conds["serving"] = serving
        if terminating is not _UNSET:
            conds["terminating"] = terminating
        out["conditions"] = conds
    elif conditions is not None:
        out["conditions"] = conditions
    if pod is not None:
        out["targetRef"] = {"kind": kind, "namespace": "crit", "name": pod, "uid": f"uid-{pod}"}
    if node is not None:
        out["nodeName"] = node
    return out


def slice_(
    name: str,
    *endpoints: dict[str, Any],
    rv: int = 1,
    address_type: str = "IPv4",
    ports: Any = None,
    service: str = SVC,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "crit",
            "resourceVersion": str(rv),
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": address_type,
        "endpoints": list(endpoints) or None,
        "ports": [{"name": "", "port": 7000, "protocol": "UDP"}] if ports is None else ports,
    }


def probe(
    address: str,
    pod: str | None = "robot-0",
    node: str | None = "node-a",
    *,
    port: int = 7000,
    app: str = "robot-control",
    name: str | None = None,
) -> ProbeEndpoint:
    return ProbeEndpoint(
        app=app,
        name=name or f"{app}/{pod or address}",
        address=address,
        port=port,
        pod=pod,
        node=node,
    )


def probed(*slices: dict[str, Any], spec: EndpointSpec = UDP) -> list[ProbeEndpoint]:
    return list(reduce_slices(slices, spec, service=SVC).endpoints.values())


# --------------------------------------------------------------------------- conditions

CONDITIONS = [
    # (conditions of the endpoint, probed?)
    ({"ready": True, "serving": True, "terminating": False}, True),
    ({"ready": True}, True),  # serving, terminating absent: serving, not terminating
    ({}, True),  # every condition unknown: ready (the API's guidance)
    ({"ready": None, "serving": None, "terminating": None}, True),  # null = absent
    ({"ready": False, "serving": False, "terminating": False}, False),  # not ready
    ({"ready": False}, False),
    ({"ready": False, "serving": True, "terminating": True}, False),  # draining
    ({"ready": True, "serving": True, "terminating": True}, False),  # publishNotReady, going
    ({"ready": None, "terminating": True}, False),  # unknown ready, but terminating
    ({"ready": True, "serving": False}, False),  # publishNotReady: ready, pod not serving
    ({"ready": "yes"}, True),  # not a boolean: unknown, so ready
    ({"ready": "false"}, True),  # a string is not false either
]


@pytest.mark.parametrize(("conditions", "expected"), CONDITIONS)
def test_ready_serving_terminating(conditions: dict[str, Any], expected: bool) -> None:
    got = probed(slice_("robot-a", ep(conditions=conditions)))
    assert got == ([probe("10.0.0.1")] if expected else [])


def test_no_conditions_object_at_all_is_ready() -> None:
    assert probed(slice_("robot-a", ep(conditions=None))) == [probe("10.0.0.1")]
    assert probed(slice_("robot-a", ep(conditions="ready"))) == [probe("10.0.0.1")]


# ------------------------------------------------------------------------------- slices


def test_several_slices_of_one_service_are_one_set() -> None:
    got = probed(
        slice_("robot-a", ep("10.0.0.1", pod="robot-0"), ep("10.0.0.2", pod="robot-1")),
        slice_("robot-b", ep("10.0.0.3", pod="robot-2", node="node-b")),
        slice_("other-a", ep("10.0.9.9", pod="other-0"), service="other"),
    )
    assert got == [
        probe("10.0.0.1", "robot-0"),
        probe("10.0.0.2", "robot-1"),
        probe("10.0.0.3", "robot-2", "node-b"),
    ]


def test_an_address_in_two_slices_is_one_endpoint_whichever_is_newer() -> None:
    old = slice_("robot-a", ep("10.0.0.1"), rv=10)
    new = slice_("robot-b", ep("10.0.0.1"), rv=12)
    assert probed(old, new) == [probe("10.0.0.1")]
    assert probed(new, old) == [probe("10.0.0.1")]


def test_of_two_disagreeing_copies_the_newest_slice_decides() -> None:
    ready = slice_("robot-a", ep("10.0.0.1", ready=True), rv=10)
    unready = slice_("robot-b", ep("10.0.0.1", ready=False), rv=12)
    assert probed(ready, unready) == []
    assert probed(unready, slice_("robot-a", ep("10.0.0.1"), rv=13)) == [probe("10.0.0.1")]


def test_an_endpoint_without_a_pod_is_named_by_its_address() -> None:
    got = probed(slice_("manual", ep("10.0.0.7", pod=None, node=None)))
    assert got == [probe("10.0.0.7", None, None, name="robot-control/10.0.0.7")]


def test_a_target_ref_that_is_not_a_pod_is_not_a_pod() -> None:
    got = probed(slice_("manual", ep("10.0.0.7", pod="vm-1", kind="VirtualMachine")))
    assert got == [probe("10.0.0.7", None, "node-a")]


def test_missing_node_name_is_unknown_node() -> None:
    assert probed(slice_("robot-a", ep(node=None))) == [probe("10.0.0.1", "robot-0", None)]


def test_hostile_names_are_not_trusted_as_pods_or_nodes() -> None:
    res = reduce_slices(
        [slice_("robot-a", ep("10.0.0.1", pod="Robot/../x\n", node="node\x1b[31m"))],
        UDP,
        service=SVC,
    )
    assert list(res.endpoints.values()) == [probe("10.0.0.1", None, None)]
    whys = sorted(s.why for s in res.skipped)
    assert whys == [
        "nodeName is not a node name: node unknown",
        "targetRef names no valid pod: named by address",
    ]
    assert all(
        "\n" not in s.describe("crit") and "\x1b" not in s.describe("crit") for s in res.skipped
    )


def test_ipv6_slices_and_canonical_addresses() -> None:
    spec = EndpointSpec(app="robot-control", port=7000, protocol="udp", family="IPv6")
    got = probed(
        slice_("robot-v6", ep("FD00:0:0::0A", pod="robot-0"), address_type="IPv6"), spec=spec
    )
    assert got == [probe("fd00::a", "robot-0")]
    # An IPv6 endpoint without a pod: the name carries the address, ':' and all.
    got = probed(slice_("m", ep("fd00::b", pod=None), address_type="IPv6"), spec=spec)
    assert [e.name for e in got] == ["robot-control/fd00::b"]
    scoped = slice_("s", ep("fe80::1%eth0", pod="robot-9"), address_type="IPv6")
    res = reduce_slices([scoped], spec, service=SVC)
    assert res.endpoints == {}
    assert [s.why for s in res.skipped] == ["unspecified, multicast or scoped address: not probed"]


def test_a_dual_stack_pod_is_probed_once_over_the_apps_family() -> None:
    v4 = slice_("robot-v4", ep("10.0.0.1"), rv=20)
    v6 = slice_("robot-v6", ep("fd00::1"), rv=30, address_type="IPv6")
    assert probed(v4, v6) == [probe("10.0.0.1")]
    spec6 = EndpointSpec(app="robot-control", port=7000, protocol="udp", family="IPv6")
    assert probed(v4, v6, spec=spec6) == [probe("fd00::1")]
    # With only the other family listed, that one is probed.
    assert probed(v6) == [probe("fd00::1")]


def test_fqdn_and_unknown_address_types_are_skipped_with_a_reason() -> None:
    res = reduce_slices(
        [
            slice_("names", ep("robot-0.example.org", pod=None), address_type="FQDN"),
            slice_("odd", ep("10.0.0.1"), address_type="IPX"),
        ],
        UDP,
        service=SVC,
    )
    assert res.endpoints == {}
    assert sorted((s.slice, s.why) for s in res.skipped) == [
        ("names", "addressType FQDN lists names, not addresses: not probed"),
        ("odd", 'addressType "IPX" is not IPv4 or IPv6: not probed'),
    ]


def test_addresses_that_are_not_of_the_slices_family_or_not_unicast() -> None:
    res = reduce_slices(
        [
            slice_(
                "robot-a",
                ep("10.0.0.1", pod="ok"),
                ep("fd00::1", pod="v6-in-v4"),
                ep("10.0.0.300", pod="bad"),
                ep("0.0.0.0", pod="any"),
                ep("224.0.0.1", pod="mcast"),
                ep("10.0.0.11", pod="no-node", node=""),
                ep(None, pod="none", addresses=[]),
                ep(None, pod="null", addresses=None),
                ep("10.0.0.9", pod="second", addresses=["10.0.0.9", "10.0.0.10"]),
                "not an object",  # type: ignore[arg-type]
            )
        ],
        UDP,
        service=SVC,
    )
    assert list(res.endpoints.values()) == [
        probe("10.0.0.11", "no-node", None),
        probe("10.0.0.1", "ok"),
        probe("10.0.0.9", "second"),
    ]
    notes = {s.why: s.count for s in res.skipped}
    assert notes == {
        "address not an IPv4 address: not probed": 4,
        "unspecified, multicast or scoped address: not probed": 2,
        "an endpoint that is not an object: ignored": 1,
    }


def test_the_config_port_wins_over_the_slices() -> None:
    s = slice_("robot-a", ep(), ports=[{"name": "probe", "port": 9000, "protocol": "UDP"}])
    assert probed(s) == [probe("10.0.0.1", port=7000)]


def test_a_named_port_is_taken_from_each_endpoints_slice() -> None:
    spec = EndpointSpec(app="robot-control", port="probe", protocol="udp")
    ports_a = [{"name": "probe", "port": 9000, "protocol": "UDP"}, {"name": "web", "port": 80}]
    ports_b = [{"name": "probe", "port": 9001, "protocol": "UDP"}]
    got = probed(
        slice_("robot-a", ep("10.0.0.1", pod="robot-0"), ports=ports_a),
        slice_("robot-b", ep("10.0.0.2", pod="robot-1"), ports=ports_b),
        spec=spec,
    )
    assert got == [probe("10.0.0.1", "robot-0", port=9000), probe("10.0.0.2", "robot-1", port=9001)]


@pytest.mark.parametrize(
    ("ports", "why"),
    [
        ([{"name": "web", "port": 80}], 'no port named "probe": not probed'),
        ([], 'no port named "probe": not probed'),
        (None, 'no port named "probe": not probed'),
        ([{"name": "probe", "port": 9000}], 'port "probe" is "TCP", the app probes udp'),
        (
            [{"name": "probe", "port": None, "protocol": "UDP"}],
            'port "probe" has no usable number (null)',
        ),
        (
            [{"name": "probe", "port": 70000, "protocol": "UDP"}],
            'port "probe" has no usable number (70000)',
        ),
    ],
)
def test_an_endpoint_whose_slice_lacks_the_named_port_is_not_probed(ports: Any, why: str) -> None:
    spec = EndpointSpec(app="robot-control", port="probe", protocol="udp")
    s = slice_("robot-a", ep("10.0.0.1", pod="robot-0"), ep("10.0.0.2", pod="robot-1"))
    s["ports"] = ports
    res = reduce_slices([s], spec, service=SVC)
    assert res.endpoints == {}
    assert [(n.slice, n.why, n.count) for n in res.skipped] == [("robot-a", why, 2)]
    assert res.listed == {"robot-control/robot-0", "robot-control/robot-1"}


def test_slices_of_other_services_and_unnamed_ones_are_ignored() -> None:
    unnamed = slice_("x", ep("10.0.0.5", pod="u"))
    unnamed["metadata"].pop("name")
    unlabelled = slice_("y", ep("10.0.0.6", pod="v"))
    unlabelled["metadata"]["labels"] = {}
    assert probed(unnamed, unlabelled, slice_("z", ep(), service="robot2")) == []


def test_empty_and_malformed_slices_probe_nothing() -> None:
    res = reduce_slices(
        [slice_("robot-a"), {**slice_("robot-b"), "endpoints": {"a": 1}}], UDP, service=SVC
    )
    assert res.endpoints == {}
    assert [(s.slice, s.why) for s in res.skipped] == [
        ("robot-b", "endpoints is not a list: ignored")
    ]


def test_more_endpoints_than_the_bound_keeps_the_first_by_name() -> None:
    n = MAX_ENDPOINTS + 3
    endpoints = [
        ep(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", pod=f"p{i:05d}") for i in range(n)
    ]
    res = reduce_slices([slice_("big", *endpoints)], UDP, service=SVC)
    assert len(res.endpoints) == MAX_ENDPOINTS
    assert "robot-control/p05002" not in res.endpoints
    assert "robot-control/p04999" in res.endpoints
    (note,) = res.skipped
    assert (note.count, note.example) == (3, "robot-control/p05000")


# --------------------------------------------------------------------------- names


def test_target_names_are_app_slash_pod_or_address() -> None:
    got = probed(
        slice_("robot-a", ep("10.0.0.1", pod="robot-7d9f8b6c4-x2k9p"), ep("10.0.0.2", pod=None))
    )
    assert [e.name for e in got] == [
        "robot-control/10.0.0.2",
        "robot-control/robot-7d9f8b6c4-x2k9p",
    ]
    for e in got:
        app, _, rest = e.name.partition("/")
        assert NAME_PATTERN.fullmatch(app)  # the app part follows the app name rule
        assert rest
        assert "/" not in rest


def test_an_endpoint_becomes_an_engine_target() -> None:
    (e,) = probed(slice_("robot-a", ep("10.0.0.1", pod="robot-7d9f8b6c4-x2k9p")))
    t = e.as_target(protocol="udp", interval_ns=20_000_000)
    assert (t.name, t.protocol, t.host, t.port, t.interval_ns) == (
        "robot-control/robot-7d9f8b6c4-x2k9p",
        "udp",
        "10.0.0.1",
        7000,
        20_000_000,
    )
    assert t.endpoint == Endpoint(app="robot-control", node="node-a", pod="robot-7d9f8b6c4-x2k9p")
    v6 = ProbeEndpoint(
        app="robot-control", name="robot-control/fd00::b", address="fd00::b", port=7000,
        pod=None, node=None,
    )  # fmt: skip
    assert v6.as_target(protocol="udp").endpoint == Endpoint(app="robot-control")


# ------------------------------------------------------------ order of events (hypothesis)

_ADDRS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"]
_PODS = ["robot-0", "robot-1", None]


@st.composite
def _endpoint(draw: st.DrawFn) -> dict[str, Any]:
    return ep(
        draw(st.sampled_from(_ADDRS)),
        pod=draw(st.sampled_from(_PODS)),
        node=draw(st.sampled_from(["node-a", "node-b", None])),
        ready=draw(st.sampled_from([True, False, None])),
        terminating=draw(st.sampled_from([_UNSET, True, False])),
    )


_EVENT = st.tuples(
    st.sampled_from(["ADDED", "MODIFIED", "DELETED", "LIST"]),
    st.sampled_from(["robot-a", "robot-b", "robot-c"]),
    st.sampled_from([SVC, SVC, "robot2"]),  # a slice may be relabelled to another Service
    st.sampled_from(["IPv4", "IPv6", "FQDN"]),
    st.lists(_endpoint(), max_size=4),
    st.sampled_from([None, [{"name": "probe", "port": 9000, "protocol": "UDP"}]]),
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(_EVENT, max_size=25),
    spec=st.sampled_from(
        [UDP, EndpointSpec(app="robot-control", port="probe", protocol="udp", family="IPv6")]
    ),
)
def test_replaying_any_events_equals_reducing_the_final_slices(
    events: list[tuple[str, str, str, str, list[dict[str, Any]], Any]], spec: EndpointSpec
) -> None:
    cache = SliceCache(spec=spec, service=SVC)
    cache.replace([])
    final: dict[str, dict[str, Any]] = {}  # what the API server holds, by slice name
    for rv, (type_, name, service, family, endpoints, ports) in enumerate(events, start=1):
        obj = slice_(name, *endpoints, rv=rv, address_type=family, ports=ports, service=service)
        if type_ == "LIST":  # a re-list (after a 410): the server's state, as it is now
            final[name] = obj
            cache.replace(list(final.values()))
        elif type_ == "DELETED":
            final.pop(name, None)
            cache.apply_event(WatchEvent("DELETED", obj))
        else:
            final[name] = obj
            cache.apply_event(WatchEvent(type_, obj))
    assert cache.resolve() == reduce_slices(final.values(), spec, service=SVC)


def test_a_stale_event_does_not_undo_a_newer_copy() -> None:
    cache = SliceCache(spec=UDP, service=SVC)
    cache.replace([slice_("robot-a", ep("10.0.0.1"), rv=5)])
    cache.apply_event(WatchEvent("MODIFIED", slice_("robot-a", rv=4)))
    assert list(cache.resolve().endpoints.values()) == [probe("10.0.0.1")]
    # Relabelled to another Service: it is no longer one of ours.
    cache.apply_event(WatchEvent("MODIFIED", slice_("robot-a", ep(), rv=6, service="x")))
    assert cache.resolve().endpoints == {}


# --------------------------------------------------------------------------- delivery

A = probe("10.0.0.1", "robot-0")
B = probe("10.0.0.2", "robot-1", "node-b")


def resolution(*endpoints: ProbeEndpoint, listed: tuple[str, ...] = ()) -> Resolution:
    names = {e.name for e in endpoints} | set(listed)
    return Resolution(endpoints={e.name: e for e in endpoints}, listed=frozenset(names), skipped=())


def test_first_offer_is_the_initial_set_even_when_empty() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    diff = feed.offer(resolution(), now_ns=0)
    assert diff.initial
    assert diff  # an initial diff is delivered even with nothing in it
    assert diff.current == ()
    assert not feed.offer(resolution(), now_ns=1)  # nothing changed: nothing to say


def test_additions_and_changes_go_at_once() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A), now_ns=0)
    diff = feed.offer(resolution(A, B), now_ns=1)
    assert (diff.added, diff.changed, diff.removed, diff.current) == ((B,), (), (), (A, B))
    moved_port = probe("10.0.0.2", "robot-1", "node-b", port=9000)
    diff = feed.offer(resolution(A, moved_port), now_ns=2)
    assert (diff.added, diff.changed, diff.removed) == ((), (moved_port,), ())


def test_an_endpoint_a_slice_says_is_out_goes_at_once() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A, B), now_ns=0)
    diff = feed.offer(resolution(A, listed=(B.name,)), now_ns=1)  # B listed, not ready
    assert (diff.removed, diff.current) == ((B,), (A,))
    assert feed.next_deadline_ns is None


def test_an_endpoint_gone_from_every_slice_is_held_for_the_grace() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A, B), now_ns=0)
    assert not feed.offer(resolution(A), now_ns=10)  # B left its slice: moving?
    assert feed.next_deadline_ns == 110
    assert set(feed.delivered) == {A.name, B.name}  # still probed
    assert not feed.offer(resolution(A), now_ns=50)  # a second look does not extend it
    assert not feed.due(now_ns=109)
    diff = feed.due(now_ns=110)
    assert (diff.removed, diff.current) == ((B,), (A,))
    assert feed.next_deadline_ns is None


def test_a_move_between_slices_is_no_change_in_either_order() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A), now_ns=0)
    # Removed from the old slice first, added to the new one 5 ns later.
    assert not feed.offer(resolution(), now_ns=10)
    assert not feed.offer(resolution(A), now_ns=15)
    assert feed.next_deadline_ns is None
    assert not feed.due(now_ns=1000)


def test_an_endpoint_that_comes_back_changed_is_a_change() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A), now_ns=0)
    feed.offer(resolution(), now_ns=10)
    a2 = probe("10.0.0.1", "robot-0", port=9000)
    diff = feed.offer(resolution(a2), now_ns=20)
    assert (diff.added, diff.changed, diff.removed) == ((), (a2,), ())


def test_a_held_endpoint_that_a_slice_then_marks_out_goes_at_once() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=100)
    feed.offer(resolution(A), now_ns=0)
    feed.offer(resolution(), now_ns=10)
    diff = feed.offer(resolution(listed=(A.name,)), now_ns=20)
    assert diff.removed == (A,)
    assert feed.next_deadline_ns is None


def test_no_grace_removes_at_once() -> None:
    feed = EndpointFeed("robot-control", removal_grace_ns=0)
    feed.offer(resolution(A), now_ns=0)
    assert feed.offer(resolution(), now_ns=1).removed == (A,)
    with pytest.raises(ValueError, match="removal_grace_ns"):
        EndpointFeed("x", removal_grace_ns=-1)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.frozensets(st.sampled_from(["a", "b", "c"])),  # probed
            st.frozensets(st.sampled_from(["a", "b", "c"])),  # listed but not probed
            st.integers(0, 300),  # ns since the last step
        ),
        min_size=1,
        max_size=20,
    )
)
def test_once_quiet_for_the_grace_the_consumer_holds_exactly_the_last_resolution(
    steps: list[tuple[frozenset[str], frozenset[str], int]],
) -> None:
    feed = EndpointFeed("app", removal_grace_ns=100)
    held: dict[str, ProbeEndpoint] = {}  # the consumer, applying every diff
    now = 0
    for names, out, gap in steps:
        now += gap
        for diff in (feed.due(now_ns=now), feed.offer(_res(names, out), now_ns=now)):
            for e in diff.removed:
                del held[e.name]
            for e in (*diff.added, *diff.changed):
                held[e.name] = e
            if diff:
                assert sorted(held) == [e.name for e in diff.current]
    last = _res(*steps[-1][:2])
    diff = feed.due(now_ns=now + 100)
    for e in diff.removed:
        del held[e.name]
    assert held == dict(last.endpoints)


def _res(names: frozenset[str], out: frozenset[str]) -> Resolution:
    eps = {f"app/{n}": probe(f"10.0.0.{ord(n)}", n, app="app") for n in names}
    return Resolution(endpoints=eps, listed=frozenset(eps) | {f"app/{n}" for n in out}, skipped=())


# ------------------------------------------------------------------------ the Service


def test_service_info_reads_the_primary_family_and_the_selector() -> None:
    ref = ServiceRef("robot", "crit")
    dual = {"spec": {"selector": {"app": "robot"}, "ipFamilies": ["IPv6", "IPv4"]}}
    assert (service_info(dual, ref).family, service_info(dual, ref).selector) == ("IPv6", True)
    assert (service_info({"spec": {}}, ref).family, service_info({}, ref).selector) == (
        "IPv4",
        False,
    )
    assert service_info({"spec": {"ipFamilies": ["IPX"]}}, ref).family == "IPv4"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port 0 is not in 1..65535"),
        ({"port": True}, "port must be a number or a port name"),
        ({"port": ""}, "port must be a number or a port name"),
        ({"family": "IPv5"}, "family must be IPv4 or IPv6"),
    ],
)
def test_endpoint_spec_refuses_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EndpointSpec(**{"app": "a", "port": 7000, "protocol": "udp", **kwargs})


# ------------------------------------------------------------------------- service:

GOOD = [
    ("robot-control.critical.svc", None, ServiceRef("robot-control", "critical")),
    ("robot-control.critical.svc.cluster.local", None, ServiceRef("robot-control", "critical")),
    ("robot-control.critical.svc.cluster.local.", None, ServiceRef("robot-control", "critical")),
    ("r.c.svc.corp-k8s.internal", None, ServiceRef("r", "c")),  # another cluster domain
    ("robot-control", "critical", ServiceRef("robot-control", "critical")),
    ("robot-control.critical.svc", "critical", ServiceRef("robot-control", "critical")),
    ("a" * 63, "0ns", ServiceRef("a" * 63, "0ns")),  # a namespace may start with a digit
]


@pytest.mark.parametrize(("text", "namespace", "ref"), GOOD)
def test_parse_service(text: str, namespace: str | None, ref: ServiceRef) -> None:
    assert parse_service(text, namespace=namespace) == ref


def test_service_ref_spellings() -> None:
    ref = parse_service("robot.crit.svc.cluster.local")
    assert (str(ref), ref.dns_name) == ("crit/robot", "robot.crit.svc")


BAD = [
    ("", None, "service is empty: expected NAME.NAMESPACE.svc[.cluster.local], or NAME with"),
    ("robot", None, 'service "robot" has no namespace: write robot.NAMESPACE.svc or give'),
    ("robot.crit", None, 'service "robot.crit": expected NAME.NAMESPACE.svc[.cluster.local]'),
    ("robot.crit.local", None, "expected NAME.NAMESPACE.svc"),
    ("robot.crit.svc", "other", 'is in namespace "crit", but the namespace given is "other"'),
    ("Robot.crit.svc", None, 'service name "Robot" is not valid: Kubernetes names are lower'),
    (
        "0robot.crit.svc",
        None,
        "service name \"0robot\" is not valid: letters a-z, digits and '-', starting with a letter",
    ),
    ("robot-.crit.svc", None, 'service name "robot-" is not valid'),
    ("robot..svc", None, 'namespace "" is not valid'),
    ("robot.cr_it.svc", None, 'namespace "cr_it" is not valid'),
    ("a" * 64 + ".crit.svc", None, "is not valid: at most 63 characters"),
    ("robot.crit.svc..local", None, 'cluster domain label "" in "robot.crit.svc..local"'),
    ("robot.crit.svc.Cluster.local", None, 'cluster domain label "Cluster"'),
    ("robot", "Crit", 'namespace "Crit" is not valid: Kubernetes names are lower case'),
    ("robot", "", 'namespace "" is not valid'),
    ("robot\n.crit.svc", None, 'service name "robot\\n" is not valid'),
    ("robot\x1b[2J", "crit", 'service name "robot\\x1b[2J" is not valid'),
    ("robot\u202e.crit.svc", None, 'service name "robot\\u202e" is not valid'),
    ("robot.crit.svc\x00", None, 'service "robot.crit.svc\\x00": expected NAME.NAMESPACE'),
    ("robot.crit.svc.local\x00", None, 'cluster domain label "local\\x00"'),
    ("r." * 127 + "r", None, f"longer than a DNS name ({MAX_SERVICE_CHARS} characters)"),
    ("x" * 10_000_000, None, "(10000000 characters) is longer than a DNS name"),
]


@pytest.mark.parametrize(("text", "namespace", "message"), BAD)
def test_parse_service_refuses(text: str, namespace: str | None, message: str) -> None:
    with pytest.raises(ServiceNameError) as err:
        parse_service(text, namespace=namespace)
    line = str(err.value)
    assert message in line
    assert not any(c in line for c in "\n\x1b\x00")
    assert len(line) < 300  # a 10 MB value never makes a 10 MB message


def test_parse_service_refuses_non_strings() -> None:
    with pytest.raises(ServiceNameError, match="service must be a string, not a list"):
        parse_service(["robot"])  # type: ignore[arg-type]
    with pytest.raises(ServiceNameError, match="service must be a string, not 7"):
        parse_service(7)  # type: ignore[arg-type]


def test_service_name_error_is_a_parse_error() -> None:
    from detnet.engine.parse import ParseError

    assert issubclass(ServiceNameError, ParseError)  # the config reports it as one


def test_a_relist_reuses_the_slices_it_already_holds() -> None:
    cache = SliceCache(spec=UDP, service=SVC)
    cache.replace([slice_("robot-a", ep("10.0.0.1"), rv=5), slice_("robot-b", rv=6)])
    held = cache.views["robot-a"]
    cache.replace(
        [
            slice_("robot-a", ep("10.0.0.1"), rv=5),
            slice_("robot-b", ep("10.0.0.2", pod="robot-1"), rv=7),
        ]
    )
    assert cache.views["robot-a"] is held  # same resourceVersion: not parsed again
    assert sorted(cache.resolve().endpoints) == ["robot-control/robot-0", "robot-control/robot-1"]
