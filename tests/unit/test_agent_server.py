"""The /v1/usage query and document (controller/agent/server.py, wire.py): parameters
accepted and refused, namespace and selector filters, the JSON shape of the issue and
its strict reader."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from detnet.controller.agent.pods import LocalPod
from detnet.controller.agent.rates import UNKNOWN, Rates
from detnet.controller.agent.sampler import PodSample, Snapshot
from detnet.controller.agent.server import QueryError, UsageQuery, parse_query, select
from detnet.controller.agent.wire import (
    MAX_DOCUMENT_BYTES,
    NodeUsage,
    PodEncoder,
    PodUsage,
    WireError,
    decode,
    encode,
    encode_pod,
    format_at,
)


def _pod(ns: str, name: str, uid: str, **labels: str) -> LocalPod:
    return LocalPod(
        namespace=ns, name=name, uid=uid, labels=MappingProxyType(labels), cgroup_uid=uid
    )


SNAP = Snapshot(
    node="node-a",
    at="2026-11-29T10:00:00.000000Z",
    mono_ns=0,
    interval_s=0.1,
    pods=(
        PodSample(
            _pod("factory", "telemetry-upload-7d9f-abc", "u1", app="telemetry"),
            Rates(1.2e7, 3.1e4, 1.1e7, 2.9e4),
        ),
        PodSample(_pod("factory", "erp-0", "u2", app="erp", tier="web"), Rates(5.0, 6.0)),
        PodSample(_pod("other", "x", "u3", app="erp"), UNKNOWN),
    ),
    measured=2,
    unknown=1,
    not_measurable=0,
    egress_bps=1.2e7 + 5,
    ingress_bps=3.1e4 + 6,
)


def query(**params: str) -> UsageQuery:
    return parse_query(params, list(params))


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({}, ["telemetry-upload-7d9f-abc", "erp-0", "x"]),
        ({"namespace": "factory"}, ["telemetry-upload-7d9f-abc", "erp-0"]),
        ({"namespace": "nowhere"}, []),
        ({"selector": "app=erp"}, ["erp-0", "x"]),
        ({"selector": "app=erp", "namespace": "factory"}, ["erp-0"]),
        ({"selector": "app in (erp,telemetry),!tier"}, ["telemetry-upload-7d9f-abc", "x"]),
        ({"selector": ""}, ["telemetry-upload-7d9f-abc", "erp-0", "x"]),
    ],
)
def test_filters(params: dict[str, str], names: list[str]) -> None:
    assert [p.name for p in select(SNAP, query(**params))] == names


@pytest.mark.parametrize(
    ("params", "keys", "message"),
    [
        ({"nmespace": "x"}, ["nmespace"], "unknown parameter"),
        ({"namespace": "a"}, ["namespace", "namespace"], "more than once"),
        ({"namespace": "Not_A_Namespace"}, ["namespace"], "not a namespace name"),
        ({"namespace": "x" * 64}, ["namespace"], "not a namespace name"),
        ({"selector": "app in"}, ["selector"], "selector: ends"),
        ({"selector": "a=b," * 2000}, ["selector"], "selector: longer than"),
    ],
)
def test_bad_queries(params: dict[str, str], keys: list[str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_query(params, keys)


def test_the_document_has_exactly_the_issues_shape() -> None:
    body = encode(
        node=SNAP.node, at=SNAP.at, interval_s=SNAP.interval_s, pods=select(SNAP, query())
    )
    doc = json.loads(body)
    assert doc == {
        "node": "node-a",
        "at": "2026-11-29T10:00:00.000000Z",
        "interval_s": 0.1,
        "pods": [
            {
                "namespace": "factory",
                "name": "telemetry-upload-7d9f-abc",
                "uid": "u1",
                "egress_bps": 1.2e7,
                "ingress_bps": 3.1e4,
                "egress_bps_1s": 1.1e7,
                "ingress_bps_1s": 2.9e4,
            },
            {
                "namespace": "factory",
                "name": "erp-0",
                "uid": "u2",
                "egress_bps": 5.0,
                "ingress_bps": 6.0,
                "egress_bps_1s": None,
                "ingress_bps_1s": None,
            },
            {
                "namespace": "other",
                "name": "x",
                "uid": "u3",
                "egress_bps": None,
                "ingress_bps": None,
                "egress_bps_1s": None,
                "ingress_bps_1s": None,
            },
        ],
    }
    assert decode(body) == NodeUsage(
        node="node-a",
        at="2026-11-29T10:00:00.000000Z",
        interval_s=0.1,
        pods=(
            PodUsage("factory", "telemetry-upload-7d9f-abc", "u1", 1.2e7, 3.1e4, 1.1e7, 2.9e4),
            PodUsage("factory", "erp-0", "u2", 5.0, 6.0, None, None),
            PodUsage("other", "x", "u3"),
        ),
    )


def test_format_at() -> None:
    assert format_at(1_795_946_400.0) == "2026-11-29T10:00:00.000000Z"
    assert format_at(1_795_946_400.25) == "2026-11-29T10:00:00.250000Z"


def _doc(**override: object) -> bytes:
    doc: dict[str, object] = {
        "node": "n",
        "at": "2026-11-29T10:00:00.000000Z",
        "interval_s": 0.1,
        "pods": [
            {
                "namespace": "a",
                "name": "b",
                "uid": "c",
                "egress_bps": 1.0,
                "ingress_bps": None,
                "egress_bps_1s": 1.0,
                "ingress_bps_1s": None,
            }
        ],
    }
    doc.update(override)
    return json.dumps(doc).encode()


def _pod_doc(**override: object) -> bytes:
    pod: dict[str, object] = {
        "namespace": "a",
        "name": "b",
        "uid": "c",
        "egress_bps": 1.0,
        "ingress_bps": 2.0,
        "egress_bps_1s": 3.0,
        "ingress_bps_1s": 4.0,
    }
    pod.update(override)
    return _doc(pods=[{k: v for k, v in pod.items() if v != "<absent>"}])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not JSON"),
        (b"[]", "not a JSON object"),
        (_doc(node=""), "node"),
        (_doc(node=7), "node"),
        (_doc(at="yesterday"), "at"),
        (_doc(interval_s="0.1"), "interval_s"),
        (_doc(interval_s=True), "interval_s"),
        (_doc(interval_s=0), "interval_s"),
        (_doc(pods={}), "pods: not a list"),
        (_doc(pods=[1]), r"pods\[0\]: not an object"),
        (_pod_doc(egress_bps="1"), "egress_bps: not a number"),
        (_pod_doc(egress_bps=-1.0), "not a finite rate"),
        (_pod_doc(ingress_bps_1s="<absent>"), "missing"),
        (_pod_doc(uid=""), "uid"),
        (b" " * (MAX_DOCUMENT_BYTES + 1), "larger than"),
    ],
)
def test_the_reader_refuses_anything_off_shape(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode(data)


@pytest.mark.parametrize(
    "rates",
    [
        (None, None, None, None),
        (1.2e7, 3.1e4, 1.1e7, 2.9e4),
        (0.0, 1.0, None, 123456789.123456789),
        (float("inf"), float("nan"), 5e-324, 1.7976931348623157e308),
    ],
)
def test_the_fast_encoder_writes_exactly_what_encode_pod_writes(
    rates: tuple[float | None, float | None, float | None, float | None],
) -> None:
    encoder = PodEncoder()
    for _ in range(2):  # the second time from its cache of names
        got = encoder.encode("factory", "erp-0", "u-2", rates)
        assert got == encode_pod(PodUsage("factory", "erp-0", "u-2", *rates))
    assert json.loads(got)["namespace"] == "factory"


def test_non_finite_rates_are_never_written() -> None:
    body = encode(
        node="n", at=SNAP.at, interval_s=0.1, pods=[PodUsage("a", "b", "c", float("inf"))]
    )
    assert json.loads(body)["pods"][0]["egress_bps"] is None
