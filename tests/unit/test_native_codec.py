"""The probe packet codec, on both native backends (the ``native_backend`` fixture)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet import native

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run

KEY = b"shared secret"


def test_header_layout_is_network_byte_order() -> None:
    data = native.encode_probe(session=0x01020304, seq=5, tx_ns=6, size=64)
    assert data[:4] == b"DTNT"
    assert struct.unpack_from("!IBBHIIQQQQ", data) == (
        0x44544E54,
        1,
        0,
        64,
        0x01020304,
        0,
        5,
        6,
        0,
        0,
    )
    assert data[48:] == bytes(16)


@pytest.mark.parametrize("size", [native.MIN_SIZE, 64, 1500, native.MAX_SIZE])
def test_round_trip(size: int) -> None:
    data = native.encode_probe(session=7, seq=2**64 - 1, tx_ns=123456789, size=size)
    assert len(data) == size
    probe = native.decode_probe(data)
    assert (probe.session, probe.seq, probe.tx_ns, probe.size) == (7, 2**64 - 1, 123456789, size)
    assert not probe.is_reply
    assert (probe.refl_rx_ns, probe.refl_tx_ns) == (0, 0)


def test_round_trip_with_hmac() -> None:
    data = native.encode_probe(session=1, seq=2, tx_ns=3, size=80, key=KEY)
    probe = native.decode_probe(data, key=KEY)
    assert probe.flags == native.FLAG_HMAC
    assert probe.size == 80


def test_reply_has_same_size_flag_and_stamps() -> None:
    req = native.encode_probe(session=9, seq=4, tx_ns=100, size=200)
    reply = native.make_reply(req, rx_ns=150, tx_ns=160)
    assert len(reply) == len(req)
    probe = native.decode_probe(reply)
    assert probe.is_reply
    assert (probe.seq, probe.session, probe.tx_ns) == (4, 9, 100)
    assert (probe.refl_rx_ns, probe.refl_tx_ns) == (150, 160)


def test_reply_does_not_echo_payload() -> None:
    req = bytearray(native.encode_probe(session=9, seq=4, tx_ns=100, size=100))
    req[60:70] = b"x" * 10
    reply = native.make_reply(bytes(req), rx_ns=1, tx_ns=2)
    assert reply[48:] == bytes(52)


def test_keyed_reply_verifies() -> None:
    req = native.encode_probe(session=1, seq=1, tx_ns=1, size=64, key=KEY)
    reply = native.make_reply(req, rx_ns=2, tx_ns=3, key=KEY)
    assert native.decode_probe(reply, key=KEY).is_reply
    with pytest.raises(native.HmacError):
        native.decode_probe(reply, key=b"other key")


def _mutate(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


GOOD = native.encode_probe(session=1, seq=1, tx_ns=1, size=64)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (GOOD[:47], "shorter"),
        (b"", "shorter"),
        (_mutate(GOOD, 0, b"XTNT"), "magic"),
        (_mutate(GOOD, 4, b"\x02"), "version"),
        (_mutate(GOOD, 5, b"\x04"), "flag"),
        (_mutate(GOOD, 5, b"\x80"), "flag"),
        (_mutate(GOOD, 6, struct.pack("!H", 65)), "length"),
        (GOOD + b"\0", "length"),
        (_mutate(GOOD, 12, b"\0\0\0\1"), "reserved"),
        (
            _mutate(native.encode_probe(session=1, seq=1, tx_ns=1, size=9000), 6, b"\x23\x29")
            + b"\0",
            "longer",
        ),
        (_mutate(_mutate(GOOD[:50], 5, b"\x02"), 6, struct.pack("!H", 50)), "HMAC packet"),
    ],
)
def test_invalid_packets_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(native.PacketError, match=reason):
        native.decode_probe(data)
    with pytest.raises(native.PacketError):
        native.make_reply(data, rx_ns=1, tx_ns=2)


def test_hmac_failures() -> None:
    keyed = native.encode_probe(session=1, seq=1, tx_ns=1, size=64, key=KEY)
    with pytest.raises(native.HmacError, match="no key"):
        native.decode_probe(keyed)
    with pytest.raises(native.HmacError, match="no HMAC"):
        native.decode_probe(GOOD, key=KEY)
    tampered = _mutate(keyed, 16, b"\x09")
    with pytest.raises(native.HmacError, match="does not match"):
        native.decode_probe(tampered, key=KEY)
    bad_mac = keyed[:-1] + bytes([keyed[-1] ^ 1])
    with pytest.raises(native.HmacError):
        native.make_reply(bad_mac, rx_ns=1, tx_ns=2, key=KEY)


def test_make_reply_refuses_replies_and_stamped_requests() -> None:
    reply = native.make_reply(GOOD, rx_ns=1, tx_ns=2)
    with pytest.raises(native.PacketError, match="reply"):
        native.make_reply(reply, rx_ns=1, tx_ns=2)
    stamped = native.encode_probe(session=1, seq=1, tx_ns=1, refl_rx_ns=5)
    with pytest.raises(native.PacketError, match="reflector timestamps"):
        native.make_reply(stamped, rx_ns=1, tx_ns=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 47},
        {"size": 9001},
        {"size": 63, "key": KEY},
        {"session": 2**32},
        {"seq": -1},
        {"tx_ns": 2**64},
        {"flags": native.FLAG_HMAC},
        {"key": b""},
    ],
)
def test_encode_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"session": 1, "seq": 1, "tx_ns": 1, **kwargs}
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies per argument
        native.encode_probe(**args)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_raise_only_packet_error(data: bytes) -> None:
    with pytest.raises(native.PacketError):
        native.decode_probe(data)
    with pytest.raises(native.PacketError):
        native.make_reply(data, rx_ns=1, tx_ns=2, key=KEY)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 47), st.integers(0, 255), st.booleans())
def test_fuzz_header_mutations(offset: int, value: int, keyed: bool) -> None:
    key = KEY if keyed else None
    data = native.encode_probe(session=3, seq=4, tx_ns=5, size=64, key=key)
    mutated = _mutate(data, offset, bytes([value]))
    try:
        reply = native.make_reply(mutated, rx_ns=1, tx_ns=2, key=key)
    except native.PacketError:
        return
    # Only harmless changes (same bytes, or session/seq/tx_ns of an unkeyed probe) pass.
    assert len(reply) == len(mutated)
    assert mutated == data or (not keyed and (8 <= offset < 12 or 16 <= offset < 32))


@settings(max_examples=200, deadline=None)
@given(
    session=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1),
    tx_ns=st.integers(0, 2**64 - 1),
    size=st.integers(native.MIN_SIZE + native.HMAC_SIZE, 2000),
    keyed=st.booleans(),
)
def test_fuzz_round_trip(session: int, seq: int, tx_ns: int, size: int, keyed: bool) -> None:
    key = KEY if keyed else None
    probe = native.decode_probe(
        native.encode_probe(session=session, seq=seq, tx_ns=tx_ns, size=size, key=key), key=key
    )
    assert (probe.session, probe.seq, probe.tx_ns, probe.size) == (session, seq, tx_ns, size)


def test_clocks() -> None:
    assert abs(native.realtime_ns() - native.realtime_ns()) < 10**9
    a = native.monotonic_ns()
    assert native.monotonic_ns() >= a
    assert native.clock_read_cost_ns(100) > 0
    with pytest.raises(ValueError, match="positive"):
        native.clock_read_cost_ns(0)


# --- two-step (protocol version 2) ---------------------------------------------------


def test_two_step_request_is_version_1_with_the_capability_block() -> None:
    data = native.encode_probe(
        session=7, seq=1, tx_ns=2, size=100, two_step=True, followup_wait_ns=2_500_000
    )
    assert data[4] == native.VERSION == 1
    assert struct.unpack_from("!IHH", data, 48) == (native.CAP_MAGIC, 1, 25)
    assert data[56:] == bytes(44)
    probe = native.decode_probe(data)
    assert probe.two_step
    assert probe.followup_wait_ns == 2_500_000
    assert not native.decode_probe(native.encode_probe(session=7, seq=1, tx_ns=2)).two_step


def test_followup_wait_rounds_up_to_100_us_and_is_bounded() -> None:
    data = native.encode_probe(session=1, seq=1, tx_ns=1, two_step=True, followup_wait_ns=1)
    assert native.decode_probe(data).followup_wait_ns == 100_000
    with pytest.raises(ValueError, match="followup_wait_ns"):
        native.encode_probe(session=1, seq=1, tx_ns=1, two_step=True, followup_wait_ns=10**10)
    with pytest.raises(ValueError, match="needs two_step"):
        native.encode_probe(session=1, seq=1, tx_ns=1, followup_wait_ns=100_000)


@pytest.mark.parametrize(("keyed", "smallest"), [(False, 64), (True, 80)])
def test_two_step_needs_room_for_its_block(keyed: bool, smallest: int) -> None:
    key = KEY if keyed else None
    assert smallest == native.TWO_STEP_MIN_SIZE + (native.HMAC_SIZE if keyed else 0)
    native.encode_probe(session=1, seq=1, tx_ns=1, size=smallest, key=key, two_step=True)
    with pytest.raises(ValueError, match="probe size"):
        native.encode_probe(session=1, seq=1, tx_ns=1, size=smallest - 1, key=key, two_step=True)


def test_version_2_reply_layout() -> None:
    data = native.encode_probe(
        session=0x0A0B0C0D,
        seq=9,
        tx_ns=10,
        size=96,
        version=2,
        flags=native.FLAG_REPLY,
        refl_rx_ns=11,
        refl_tx_ns=12,
        rx_source=native.TS_KERNEL,
        followup_source=native.FOLLOWUP_KERNEL,
        followup_seq=8,
        followup_tx_ns=13,
    )
    assert struct.unpack_from("!IBBHIBBHQQQQQQ", data) == (
        native.MAGIC,
        2,
        native.FLAG_REPLY,
        96,
        0x0A0B0C0D,
        1,
        1,
        0,
        9,
        10,
        11,
        12,
        8,
        13,
    )
    assert data[64:] == bytes(32)
    probe = native.decode_probe(data)
    assert (probe.version, probe.rx_source, probe.followup_source) == (2, 1, 1)
    assert (probe.followup_seq, probe.followup_tx_ns) == (8, 13)
    assert probe.is_reply
    assert not probe.is_followup


def test_followup_round_trip() -> None:
    data = native.encode_probe(
        session=3,
        seq=5,
        tx_ns=0,
        size=80,
        key=KEY,
        version=2,
        flags=native.FLAG_REPLY | native.FLAG_FOLLOWUP,
        followup_source=native.FOLLOWUP_LOST,
        followup_seq=5,
    )
    probe = native.decode_probe(data, key=KEY)
    assert probe.is_followup
    assert (probe.seq, probe.followup_seq, probe.followup_source) == (5, 5, native.FOLLOWUP_LOST)


V2 = native.encode_probe(
    session=1, seq=1, tx_ns=1, size=64, version=2, flags=native.FLAG_REPLY, refl_rx_ns=2
)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_mutate(V2, 5, b"\x00"), "without the REPLY flag"),
        (_mutate(_mutate(V2[:56], 6, struct.pack("!H", 56)), 0, b"DTNT"), "two-step block"),
        (_mutate(V2, 5, b"\x09"), "flag bits 0x08"),
        (_mutate(V2, 12, b"\x03"), "stamp source"),
        (_mutate(V2, 13, b"\x04"), "stamp source"),
        (_mutate(V2, 14, b"\x01"), "reserved"),
        (_mutate(V2, 48, b"\x01"), "without a stamp source"),
        (_mutate(_mutate(V2, 13, b"\x03"), 56, b"\x01"), "lost stamp"),
        (_mutate(_mutate(V2, 5, b"\x05"), 13, b"\x01"), "follow-up packet"),
        (_mutate(GOOD, 5, b"\x04"), "flag bits 0x04"),  # FOLLOWUP is not a version-1 flag
        (_mutate(GOOD, 4, b"\x03"), "version 3"),
    ],
)
def test_invalid_version_2_packets(data: bytes, reason: str) -> None:
    with pytest.raises(native.PacketError, match=reason):
        native.decode_probe(data)
    with pytest.raises(native.PacketError):
        native.make_reply(data, rx_ns=1, tx_ns=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": 3},
        {"version": 2},  # a version-2 packet is a reply
        {"version": 2, "flags": native.FLAG_REPLY, "followup_seq": 1},
        {"version": 2, "flags": native.FLAG_REPLY | native.FLAG_FOLLOWUP},
        {"flags": native.FLAG_FOLLOWUP},
        {"followup_source": 1},  # stamp fields need version 2
        {"two_step": True, "flags": native.FLAG_REPLY},
        {"version": 2, "flags": native.FLAG_REPLY, "size": 63},
    ],
)
def test_encode_rejects_invalid_version_2_fields(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"session": 1, "seq": 1, "tx_ns": 1, **kwargs}
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies per argument
        native.encode_probe(**args)  # type: ignore[arg-type]


def test_make_reply_answers_a_two_step_request_one_step() -> None:
    # The TCP echo server has no per-frame kernel TX stamp: its reply stays version 1.
    req = native.encode_probe(session=2, seq=3, tx_ns=4, size=64, two_step=True)
    reply = native.decode_probe(native.make_reply(req, rx_ns=5, tx_ns=6))
    assert (reply.version, reply.is_reply, reply.refl_rx_ns) == (1, True, 5)


def test_make_reply_checks_replies_before_the_hmac() -> None:
    # The reflectors' order: a reply is refused as a reply even when its HMAC is wrong.
    keyed_reply = native.make_reply(
        native.encode_probe(session=1, seq=1, tx_ns=1, key=KEY), rx_ns=1, tx_ns=2, key=KEY
    )
    with pytest.raises(native.PacketError, match="reply") as info:
        native.make_reply(keyed_reply, rx_ns=1, tx_ns=2)
    assert not isinstance(info.value, native.HmacError)


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(0, 2**64 - 1),
    stamp=st.integers(1, 2**64 - 1),
    source=st.sampled_from([1, 2]),
    size=st.integers(64, 1500),
    keyed=st.booleans(),
)
def test_fuzz_version_2_round_trip(
    seq: int, stamp: int, source: int, size: int, keyed: bool
) -> None:
    key = KEY if keyed else None
    size = max(size, native.TWO_STEP_MIN_SIZE + (native.HMAC_SIZE if keyed else 0))
    data = native.encode_probe(
        session=1,
        seq=seq,
        tx_ns=0,
        size=size,
        key=key,
        version=2,
        flags=native.FLAG_REPLY | native.FLAG_FOLLOWUP,
        followup_source=source,
        followup_seq=seq,
        followup_tx_ns=stamp,
    )
    probe = native.decode_probe(data, key=key)
    assert (probe.followup_seq, probe.followup_tx_ns, probe.followup_source) == (seq, stamp, source)
