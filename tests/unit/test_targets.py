"""Target parsing and validation: one HOST:PORT rule, one size bound, one TCP default."""

from __future__ import annotations

import pytest

from detnet.controller.config import parse_config
from detnet.controller.errors import ConfigError
from detnet.engine.errors import TargetError
from detnet.engine.parse import ParseError, parse_address
from detnet.engine.targets import NAME_RULE, Target, parse_target


def test_parse_udp_and_tcp_targets():
    u = parse_target("robot=udp://127.0.0.1:7001", interval_ns=1_000_000)
    assert (u.protocol, u.host, u.port, u.interval_ns) == ("udp", "127.0.0.1", 7001, 1_000_000)
    t = parse_target("scan=tcp://[::1]:7002?mode=echo")
    assert (t.protocol, t.host, t.mode) == ("tcp", "::1", "echo")
    assert t.url == "tcp://[::1]:7002?mode=echo"
    assert parse_target("c=tcp://localhost:1/").url == "tcp://localhost:1?mode=connect"


def test_udp_modes_and_icmp_targets():
    assert parse_target("r=udp://h:1").mode == "auto"
    echo = parse_target("r=udp://h:1?mode=echo")
    assert (echo.mode, echo.url) == ("echo", "udp://h:1?mode=echo")
    assert parse_target("r=udp://h:1?mode=auto").url == "udp://h:1"
    for spec, host in (("p=icmp://198.18.0.2", "198.18.0.2"), ("p=icmp://[fd00::1]", "fd00::1")):
        t = parse_target(spec)
        assert (t.protocol, t.host, t.port, t.mode) == ("icmp", host, 0, "echo")
    assert parse_target("p=icmp://fd00::1").url == "icmp://[fd00::1]"
    with pytest.raises(TargetError, match="icmp has no port"):
        Target(name="p", protocol="icmp", host="h", port=7)
    with pytest.raises(TargetError, match="no HMAC"):
        Target(name="p", protocol="icmp", host="h", key=b"k")
    with pytest.raises(TargetError, match=r"probe size 55 is not in 56\.\.9000"):
        Target(name="p", protocol="icmp", host="h", size=55)


def test_the_tcp_default_is_connect_everywhere():
    # The URL form, the dataclass and the config all mean the handshake when unsaid.
    assert parse_target("c=tcp://localhost:1").mode == "connect"
    assert Target(name="c", protocol="tcp", host="h", port=1).mode == "connect"
    cfg = parse_config(
        "critical_apps:\n"
        "  - {name: c, host: 127.0.0.1, port: 1, protocol: TCP, max_latency_ms: 5}\n"
        "best_effort_targets:\n  - {deployment: t}\n"
    )
    assert cfg.critical_apps[0].mode == "connect"
    assert cfg.targets()[0].mode == "connect"


@pytest.mark.parametrize(
    "spec",
    [
        "nourl",
        "x=http://h:1",
        "x=udp://h",
        "x=udp://h:1?mode=connect",
        "x=icmp://h:1",
        "x=icmp://",
        "x=icmp://bad host",
        "x=icmp://h?mode=connect",
        "x=icmp://h/path",
        "x=tcp://h:1?mode=bogus",
        "x=tcp://h:1?foo=1",
        "x=tcp://h:1/path",
        "x=tcp://h:1#frag",
        "x=udp://user@h:1",
        "bad name=udp://h:1",
        "x=udp://h:99999",
    ],
)
def test_bad_specs_raise_target_error(spec):
    with pytest.raises(TargetError):
        parse_target(spec)


@pytest.mark.parametrize(
    "address",
    [":5201", "::1:5201", "[nope]:1", "h:0", "h:65536", "bad host:1", "h:x"],
)
def test_addresses_follow_the_one_host_port_rule(address):
    # The same text as every other HOST:PORT edge, for a destination (no port 0, a host).
    with pytest.raises(ParseError) as rule:
        parse_address(address, port_zero=False, host_required=True)
    with pytest.raises(TargetError) as info:
        parse_target(f"x=udp://{address}")
    assert str(info.value).endswith(f": {rule.value}")
    assert "expected HOST:PORT" in str(info.value) or "[ADDR]:PORT" in str(info.value)


def test_a_destination_needs_a_host():
    with pytest.raises(TargetError, match="the host is missing"):
        parse_target("x=udp://:5201")


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


@pytest.mark.parametrize("protocol", ["udp", "tcp"])
def test_the_size_bound_is_the_codecs(protocol):
    # The codec's header is 48 bytes and an HMAC trailer 16 more; 9000 is its maximum.
    def target(size: int, key: bytes | None = None) -> Target:
        return Target(name="x", protocol=protocol, host="h", port=1, size=size, key=key)

    assert target(48).size == 48
    assert target(9000).size == 9000
    assert target(64, b"k").size == 64
    for size in (47, 20, 1, 9001):
        with pytest.raises(
            TargetError, match=rf"^target x: probe size {size} is not in 48\.\.9000"
        ):
            target(size)
    with pytest.raises(TargetError, match=r"probe size 63 is not in 64\.\.9000 bytes \(an HMAC"):
        target(63, b"k")


@pytest.mark.parametrize("name", ["", "x\n", "a\x00"])
def test_names_are_matched_whole(name):
    with pytest.raises(TargetError, match="use letters, digits"):
        Target(name=name, protocol="udp", host="h", port=1)


@pytest.mark.parametrize("name", ["a b", "-x", "é", "x" * 64, "a/", "/b", "a/b/c"])
def test_one_name_rule_for_targets_and_config_apps(name):
    with pytest.raises(TargetError, match="use letters, digits") as engine:
        Target(name=name, protocol="udp", host="h", port=1)
    text = (
        f"critical_apps:\n  - name: {name!r}\n    host: 127.0.0.1\n    port: 1\n"
        "    protocol: UDP\n    max_latency_ms: 5\n"
        "best_effort_targets:\n  - {deployment: t}\n"
    ).replace("'", '"')
    with pytest.raises(ConfigError) as config:
        parse_config(text)
    assert NAME_RULE in str(engine.value)
    assert NAME_RULE in str(config.value)


@pytest.mark.parametrize("name", ["robot/robot-7d9f-x2k9p", "robot/10.0.0.1", "robot/fd00::1"])
def test_an_endpoint_target_is_app_slash_pod_or_address_but_no_app_is(name):
    assert Target(name=name, protocol="udp", host="h", port=1).name == name
    text = (
        f"critical_apps:\n  - name: {name!r}\n    host: 127.0.0.1\n    port: 1\n"
        "    protocol: UDP\n    max_latency_ms: 5\n"
        "best_effort_targets:\n  - {deployment: t}\n"
    ).replace("'", '"')
    with pytest.raises(ConfigError, match="use letters, digits"):
        parse_config(text)
