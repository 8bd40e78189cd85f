"""Target parsing and validation."""

from __future__ import annotations

import pytest

from detnet.engine.errors import TargetError
from detnet.engine.targets import Target, parse_target


def test_parse_udp_and_tcp_targets():
    u = parse_target("robot=udp://127.0.0.1:7001", interval_ns=1_000_000)
    assert (u.protocol, u.host, u.port, u.interval_ns) == ("udp", "127.0.0.1", 7001, 1_000_000)
    t = parse_target("scan=tcp://[::1]:7002?mode=echo")
    assert (t.protocol, t.host, t.mode) == ("tcp", "::1", "echo")
    assert t.url == "tcp://[::1]:7002?mode=echo"
    assert parse_target("c=tcp://localhost:1").mode == "connect"


@pytest.mark.parametrize(
    "spec",
    [
        "nourl",
        "x=http://h:1",
        "x=udp://h",
        "x=udp://h:1?mode=echo",
        "x=tcp://h:1?mode=bogus",
        "x=tcp://h:1?foo=1",
        "bad name=udp://h:1",
        "x=udp://h:99999",
    ],
)
def test_bad_specs_raise_target_error(spec):
    with pytest.raises(TargetError):
        parse_target(spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval_ns": 10},
        {"timeout_ns": 0},
        {"batch": 0},
        {"batch": 5000},
        {"size": 0},
    ],
)
def test_bad_fields_raise_target_error(kwargs):
    with pytest.raises(TargetError):
        Target(name="x", protocol="udp", host="h", port=1, **kwargs)


def test_batch_is_refused_for_tcp_connect():
    with pytest.raises(TargetError, match="batch"):
        Target(name="x", protocol="tcp", host="h", port=1, mode="connect", batch=4)
