"""The edge parsers shared by the config and the CLI: one rule each, one error class."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.parse import (
    KEY_FILE_MAX,
    MAX_DURATION_NS,
    ParseError,
    escape,
    format_duration_ns,
    parse_address,
    parse_duration_ns,
    parse_host,
    read_key_file,
    show,
)

MS, S = 1_000_000, 1_000_000_000


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("10ms", 10 * MS),
        ("1.5s", 1500 * MS),
        ("2m", 120 * S),
        ("1h", 3600 * S),
        ("100us", 100_000),
        ("100µs", 100_000),  # MICRO SIGN
        ("100μs", 100_000),  # GREEK MU
        ("250ns", 250),
        (" 250 ms ", 250 * MS),
        ("0.1ms", 100_000),
        (".5s", 500 * MS),
        ("1e-3s", 1 * MS),
        ("5", 5 * S),  # a bare number is seconds, on the CLI as in the config
        ("0.25", 250 * MS),
        (2, 2 * S),
        (0.01, 10 * MS),  # exactly 10 ms: read as written, not through binary floats
        (1.1, 1100 * MS),
    ],
)
def test_durations(value: str | float, ns: int) -> None:
    assert parse_duration_ns(value) == ns


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "must be a duration like 250ms or 1.5s"),
        ("10 millis", "must be a duration like 250ms or 1.5s"),
        ("", "must be a duration like 250ms or 1.5s"),
        ("1e5000s", "must be a duration like 250ms or 1.5s"),  # exponents stay small
        ("nan", "must be a duration like 250ms or 1.5s"),
        ("inf", "must be a duration like 250ms or 1.5s"),
        (float("nan"), "must be a duration like 250ms or 1.5s"),
        (float("inf"), "must be a duration like 250ms or 1.5s"),
        (True, "must be a duration like 250ms or 1.5s"),
        ("9" * 10_000 + "s", "must be a duration like 250ms or 1.5s"),
        ("0s", "must be a positive duration"),
        ("-1s", "must be a positive duration"),
        ("1e300s", "must be at most 8784h"),
        ("0.1ns", "must be at least 1ns"),
    ],
)
def test_bad_durations(value: str | float, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_duration_ns(value)
    assert str(info.value) == message


def test_duration_ranges_are_the_callers() -> None:
    assert parse_duration_ns("10ms", min_ns=10 * MS, max_ns=60 * S) == 10 * MS
    with pytest.raises(ParseError, match=r"^must be at least 10ms$"):
        parse_duration_ns("1ns", min_ns=10 * MS, max_ns=60 * S)
    with pytest.raises(ParseError, match=r"^must be at most 1m$"):
        parse_duration_ns("61s", min_ns=10 * MS, max_ns=60 * S)
    assert parse_duration_ns("8784h") == MAX_DURATION_NS


@given(st.integers(min_value=1, max_value=MAX_DURATION_NS))
def test_format_reads_back_exactly(ns: int) -> None:
    assert parse_duration_ns(format_duration_ns(ns)) == ns


@pytest.mark.parametrize(
    ("ns", "text"),
    [(250 * MS, "250ms"), (1500 * MS, "1.5s"), (120 * S, "2m"), (100_000, "100us"), (7, "7ns")],
)
def test_format_duration(ns: int, text: str) -> None:
    assert format_duration_ns(ns) == text


@pytest.mark.parametrize(
    ("text", "port_zero", "expected"),
    [
        ("127.0.0.1:9108", False, ("127.0.0.1", 9108)),
        (":9108", False, ("0.0.0.0", 9108)),  # every interface
        ("[::1]:0", True, ("::1", 0)),
        ("[fe80::1%eth0]:80", False, ("fe80::1%eth0", 80)),
        ("localhost:5201", False, ("localhost", 5201)),
        ("robot.factory.svc.cluster.local:5201", False, ("robot.factory.svc.cluster.local", 5201)),
        ("0.0.0.0:0", True, ("0.0.0.0", 0)),
    ],
)
def test_addresses(text: str, port_zero: bool, expected: tuple[str, int]) -> None:
    assert parse_address(text, port_zero=port_zero) == expected


@pytest.mark.parametrize(
    ("text", "port_zero", "message"),
    [
        ("localhost", True, "expected HOST:PORT (IPv6 as [ADDR]:PORT)"),
        ("", True, "expected HOST:PORT (IPv6 as [ADDR]:PORT)"),
        ("::1:9108", True, "write IPv6 addresses in brackets: [ADDR]:PORT"),
        ("[nope]:1", True, "brackets hold an IPv6 address: [ADDR]:PORT"),
        ("h:0", False, "expected HOST:PORT (IPv6 as [ADDR]:PORT) with a port from 1 to 65535"),
        ("h:65536", True, "expected HOST:PORT (IPv6 as [ADDR]:PORT) with a port from 0 to 65535"),
        ("h:http", True, "expected HOST:PORT (IPv6 as [ADDR]:PORT) with a port from 0 to 65535"),
        ("h:-1", True, "expected HOST:PORT (IPv6 as [ADDR]:PORT) with a port from 0 to 65535"),
        ("h:" + "9" * 5000, True, "with a port from 0 to 65535"),
        ("bad host:80", True, "[ADDR]:PORT); the host must be an IP address or a DNS name"),
        ("h\x1b[2J:80", True, "the host must be an IP address or a DNS name"),
    ],
)
def test_bad_addresses(text: str, port_zero: bool, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_address(text, port_zero=port_zero)
    assert str(info.value).endswith(message)


def test_a_destination_needs_a_host() -> None:
    assert parse_address(":9108", port_zero=False) == ("0.0.0.0", 9108)  # a listener's
    with pytest.raises(ParseError) as info:
        parse_address(":9108", port_zero=False, host_required=True)
    assert str(info.value) == "expected HOST:PORT (IPv6 as [ADDR]:PORT); the host is missing"
    assert parse_address("[::1]:1", port_zero=False, host_required=True) == ("::1", 1)


def test_hosts() -> None:
    for good in ("127.0.0.1", "::1", "robot-control", "a.b.c.", "x" * 63):
        assert parse_host(good) == good
    for bad in ("", "a..b", "-a", "a-", "x" * 64, "a_b", "a b", "é.com", "a" * 254, "\u202e"):
        with pytest.raises(ParseError, match="must be an IP address or a DNS name"):
            parse_host(bad)


def test_key_file_strips_trailing_line_ends_only(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b" secret\t\r\n\n")
    assert read_key_file(key) == b" secret\t"  # the same bytes `probe` and `reflect` use
    key.write_bytes(b"\x00\xff\n\x01")  # binary keys keep every byte but trailing CR/LF
    assert read_key_file(str(key)) == b"\x00\xff\n\x01"
    key.write_bytes(b"k" * KEY_FILE_MAX + b"\r\n")
    assert len(read_key_file(key)) == KEY_FILE_MAX


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"\r\n\n", "the file is empty"),
        (b"k" * (KEY_FILE_MAX + 1), f"larger than {KEY_FILE_MAX} bytes"),
        (b"k" * KEY_FILE_MAX + b"\n\n\n", f"larger than {KEY_FILE_MAX} bytes"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: bytes, message: str) -> None:
    key = tmp_path / "key"
    key.write_bytes(content)
    with pytest.raises(ParseError, match=message):
        read_key_file(key)


def test_key_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ParseError, match=r"^cannot read: No such file or directory$"):
        read_key_file(tmp_path / "nope")
    with pytest.raises(ParseError, match=r"^cannot read: Is a directory$"):
        read_key_file(tmp_path)


def test_key_file_reads_are_bounded(tmp_path: Path) -> None:
    # /dev/zero never ends, and a FIFO with no writer never answers: neither hangs.
    with pytest.raises(ParseError, match="larger than"):
        read_key_file("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ParseError, match="the file is empty"):
        read_key_file(fifo)


def test_show_quotes_a_short_escaped_prefix() -> None:
    assert show("abc") == '"abc"'
    assert show('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert show("a\nb\x1b[31m\u202ec\x00") == '"a\\nb\\x1b[31m\\u202ec\\x00"'
    long = show("x" * 10_000_000)
    assert long == '"' + "x" * 80 + '"... (10000000 characters)'
    assert (show(None), show(True), show(5), show(0.5), show(float("nan"))) == (
        "null",
        "true",
        "5",
        "0.5",
        "nan",
    )
    assert show(10**5000) == "a number of about 5001 digits"  # 1 and 5000 zeros
    assert (show({}), show([])) == ("a mapping", "a list")


@given(st.text())
def test_escape_is_one_printable_line(text: str) -> None:
    out = escape(text)
    assert out.isprintable()
    if text.isprintable():
        assert out == text


def test_escape_names_each_character() -> None:
    assert escape("ok\r\n\t\x7f\u2028\U000e0001") == "ok\\r\\n\\t\\x7f\\u2028\\U000e0001"
