"""Both implementations of the native core count alike on real loopback sockets.

The same datagrams (hypothesis-generated, many of them near-valid) fed to a Cython and a
pure-Python reflector, probe socket and ICMP probe socket must leave every counter equal,
so that no drop is ever counted under different names by the two; and each backend's
probe socket talks to the other's reflector. Names, bytes, errors, token buckets and
source tables: tests/unit/test_native_parity.py.
"""

from __future__ import annotations

import os
import select
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detnet.native import _fallback
from tests.unit.test_native_parity import KEY, _both, needs_core

pytestmark = pytest.mark.usefixtures("kernel_rx_stamps")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")
SESSION = 4242
SOCKET_TESTS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
_ROW_FIELDS = [
    name
    for name in _fallback.REPLY_DTYPE.names or ()
    if name not in ("kernel_rx_ns", "user_rx_ns", "hw_rx_ns")  # the clocks differ
]


# --- datagram strategies ----------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` unchanged (often), with one byte set, cut short, or grown by a few bytes."""
    how = draw(st.sampled_from(["keep", "keep", "byte", "cut", "grow"]))
    if how == "byte" and data:
        offset = draw(st.integers(0, len(data) - 1))
        return data[:offset] + bytes([draw(st.integers(0, 255))]) + data[offset + 1 :]
    if how == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if how == "grow":
        return data + draw(st.binary(min_size=1, max_size=8))
    return data


@st.composite
def _request(draw: st.DrawFn, key: bytes | None) -> bytes:
    """Requests and near-requests a reflector sees (replies, other keys, garbage)."""
    what = draw(st.sampled_from(["v1", "two_step", "other_key", "reply", "v2", "random"]))
    size = draw(st.integers(48, 160))
    if key is not None or what == "other_key":
        size = max(size, 64)
    seq, tx = draw(U64), draw(U64)
    k = (b"other" if key is None else None) if what == "other_key" else key
    if what == "random":
        return draw(st.binary(max_size=160))
    if what == "two_step":
        size = max(size, 64 + (16 if k else 0))
        data = _fallback.encode_probe(
            session=draw(st.integers(0, 3)), seq=seq, tx_ns=tx, size=size, key=k, two_step=True
        )
    elif what == "reply":
        data = _fallback.encode_probe(
            session=1, seq=seq, tx_ns=tx, size=size, key=k, flags=1, refl_rx_ns=draw(U64)
        )
    elif what == "v2":
        data = _fallback.encode_probe(
            session=1, seq=seq, tx_ns=tx, size=max(size, 80), key=k, version=2, flags=1
        )
    else:
        data = _fallback.encode_probe(
            session=draw(st.integers(0, 3)), seq=seq, tx_ns=tx, size=size, key=k
        )
    return draw(_mutated(data))


@st.composite
def _reply(draw: st.DrawFn, key: bytes | None, two_step: bool) -> bytes:
    """Datagrams arriving at a probe socket of session SESSION with 96-byte probes."""
    what = draw(
        st.sampled_from(
            ["v1", "v2", "followup", "echo", "other_session", "other_key", "big", "random"]
        )
    )
    seq, tx = draw(U64), draw(U64)
    k = (b"other" if key is None else None) if what == "other_key" else key
    session = draw(st.integers(0, 2**32 - 1)) if what == "other_session" else SESSION
    if what == "random":
        return draw(st.binary(max_size=120))
    if what == "echo":
        data = _fallback.encode_probe(
            session=session, seq=seq, tx_ns=tx, size=96, key=k, two_step=two_step
        )
    elif what in ("v2", "followup"):
        followup = what == "followup"
        source = draw(st.integers(0, 3)) if not followup else draw(st.integers(1, 3))
        data = _fallback.encode_probe(
            session=session,
            seq=seq,
            tx_ns=0 if followup else tx,
            size=draw(st.sampled_from([80, 96])),
            key=k,
            version=2,
            flags=5 if followup else 1,
            refl_rx_ns=0 if followup else draw(U64),
            rx_source=0 if followup else draw(st.integers(0, 2)),
            followup_source=source,
            followup_seq=seq if followup else (draw(U64) if source else 0),
            followup_tx_ns=draw(U64) if source in (1, 2) else 0,
        )
    else:
        size = 112 if what == "big" else draw(st.integers(64, 96))
        data = _fallback.encode_probe(
            session=session,
            seq=seq,
            tx_ns=tx,
            size=size,
            key=k,
            flags=1,
            refl_rx_ns=draw(U64),
            refl_tx_ns=draw(U64),
        )
    return draw(_mutated(data))


def _wait_readable(fds: list[int], *, until: object) -> None:
    """select() on ``fds`` until ``until()`` holds (each select is bounded: 2 s)."""
    for _ in range(200):
        if until():  # type: ignore[operator]
            return
        select.select(fds, [], [], 2.0)
    raise AssertionError("datagrams did not arrive")


# --- the reflectors ----------------------------------------------------------------------


def _reflect_both(datagrams: list[bytes], **kwargs: object) -> list[dict[str, int]]:
    """Send ``datagrams`` to a Cython and a Python reflector; return both stats()."""
    core, fb = _both()
    socks, refls = [], []
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        for impl in (core, fb):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            socks.append(sock)
            refls.append(impl.Reflector(sock, **kwargs))
        for data in datagrams:
            for sock in socks:
                sender.sendto(data, sock.getsockname())
        time.sleep(0.02)  # all of them queued, so both read them in the same batches
        for refl, sock in zip(refls, socks, strict=True):
            _wait_readable(
                [sock.fileno()],
                until=lambda r=refl: (r.serve(), r.received)[1] >= len(datagrams),
            )
            refl.flush(2**62)  # every follow-up due: its counters are compared too
        return [refl.stats() for refl in refls]
    finally:
        for refl in refls:
            refl.close()
        for sock in (*socks, sender):
            sock.close()


@needs_core
@pytest.mark.parametrize(
    "datagram",
    [
        # flags 0x03 (a reply with an HMAC) to a reflector without a key
        _fallback.encode_probe(session=1, seq=1, tx_ns=1, key=KEY, flags=1, refl_rx_ns=2),
        # flags 0x02 with a non-zero reflector stamp
        _fallback.encode_probe(session=1, seq=1, tx_ns=1, key=KEY, refl_rx_ns=5),
        _fallback.encode_probe(session=1, seq=1, tx_ns=1, key=KEY, refl_tx_ns=5),
    ],
)
@pytest.mark.parametrize("key", [None, KEY])
def test_reflectors_count_stamped_keyed_packets_as_invalid(
    datagram: bytes, key: bytes | None
) -> None:
    # The bug of the first release: the fallback counted these as bad_hmac.
    core_stats, fb_stats = _reflect_both([datagram], key=key)
    assert core_stats == fb_stats
    assert core_stats["invalid"] == 1
    assert core_stats["bad_hmac"] == 0


@needs_core
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("two_step", [False, True])
@SOCKET_TESTS
@given(datagrams=st.lists(st.deferred(lambda: _request(None)), min_size=1, max_size=30))
def test_reflectors_count_alike_unkeyed_input(
    datagrams: list[bytes], key: bytes | None, two_step: bool
) -> None:
    core_stats, fb_stats = _reflect_both(datagrams, key=key, two_step=two_step)
    assert core_stats == fb_stats
    assert core_stats["received"] == len(datagrams)


@needs_core
@pytest.mark.parametrize("two_step", [False, True])
@SOCKET_TESTS
@given(datagrams=st.lists(st.deferred(lambda: _request(KEY)), min_size=1, max_size=30))
def test_reflectors_count_alike_keyed_input(datagrams: list[bytes], two_step: bool) -> None:
    for key in (None, KEY):
        core_stats, fb_stats = _reflect_both(datagrams, key=key, two_step=two_step)
        assert core_stats == fb_stats


@needs_core
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("two_step", [False, True])
def test_reflectors_count_alike_on_every_path(key: bytes | None, two_step: bool) -> None:
    core_stats, fb_stats = _reflect_both(_fixed_requests(key), key=key, two_step=two_step)
    assert core_stats == fb_stats
    if two_step:  # the second batch carried stamps, the last ones went as follow-ups
        assert core_stats["two_step"] == 70
        assert core_stats["carried"] > 0
        assert core_stats["followups"] > 0
        assert core_stats["carried"] + core_stats["followups"] == 70


def _fixed_requests(key: bytes | None) -> list[bytes]:
    """Valid requests and the two-step path's steps, so every counter moves at least once."""
    k = key
    out = [_fallback.encode_probe(session=1, seq=i, tx_ns=i, size=80, key=k) for i in range(3)]
    out += [  # more than one batch: the second batch carries the first one's stamps
        _fallback.encode_probe(session=2 + i % 2, seq=i, tx_ns=i, size=80, key=k, two_step=True)
        for i in range(70)
    ]
    out.append(b"garbage")
    return out


# --- the probe sockets -------------------------------------------------------------------


def _probe_both(
    datagrams: list[bytes], **kwargs: object
) -> tuple[list[dict[str, int]], list[np.ndarray], list[object]]:
    """Deliver ``datagrams`` from one peer to a Cython and a Python ProbeSocket."""
    core, fb = _both()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    probes = []
    try:
        for seq, impl in enumerate((core, fb)):
            probe = impl.ProbeSocket("127.0.0.1", peer.getsockname()[1], **kwargs)
            probes.append(probe)
            probe.send(seq, 1, np.zeros(1, impl.SENT_DTYPE))
        addresses = {}
        for _ in probes:
            request, address = peer.recvfrom(2048)
            addresses[int.from_bytes(request[16:24], "big")] = address  # by seq
        for data in datagrams:
            for seq in (0, 1):
                peer.sendto(data, addresses[seq])
        rows = []
        for probe, impl in zip(probes, (core, fb), strict=True):
            out = np.zeros(len(datagrams) + 1, impl.REPLY_DTYPE)
            got = [0]

            def take(p=probe, o=out, g=got) -> bool:
                g[0] += p.recv(o[g[0] :])
                return p.received >= len(datagrams)

            _wait_readable([probe.fileno()], until=take)
            rows.append(out[: got[0]])
        return [p.stats() for p in probes], rows, [p.first_foreign for p in probes]
    finally:
        for probe in probes:
            probe.close()
        peer.close()


@needs_core
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("two_step", [False, True])
@SOCKET_TESTS
@given(data=st.data())
def test_probe_sockets_count_and_write_alike(
    data: st.DataObject, key: bytes | None, two_step: bool
) -> None:
    datagrams = data.draw(st.lists(_reply(key, two_step), min_size=1, max_size=20))
    stats, rows, foreign = _probe_both(
        datagrams, session=SESSION, size=96, key=key, two_step=two_step
    )
    assert stats[0] == stats[1]
    assert stats[0]["received"] == len(datagrams)
    assert rows[0][_ROW_FIELDS].tolist() == rows[1][_ROW_FIELDS].tolist()
    assert foreign[0] == foreign[1]


# --- the ICMP probe sockets --------------------------------------------------------------


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@st.composite
def _echo_reply(draw: st.DrawFn, ident: int) -> bytes:
    """ICMP messages arriving at raw ICMP sockets of identifier ``ident``, 64 bytes."""
    seq = draw(U64)
    payload = _fallback.encode_probe(
        session=draw(st.sampled_from([SESSION, SESSION, 7])), seq=seq, tx_ns=draw(U64), size=56
    )
    payload = draw(_mutated(payload))
    header = bytes(
        [
            draw(st.sampled_from([0, 0, 0, 3])),  # echo reply (type 3: filtered by the kernel)
            draw(st.sampled_from([0, 0, 1])),
            0,
            0,
        ]
    )
    ident_ = draw(st.sampled_from([ident, ident, ident ^ 1]))
    seq16 = draw(st.sampled_from([seq & 0xFFFF, seq & 0xFFFF, (seq + 1) & 0xFFFF]))
    body = header + ident_.to_bytes(2, "big") + seq16.to_bytes(2, "big") + payload
    checksum = _icmp_checksum(body)
    return body[:2] + checksum.to_bytes(2, "big") + body[4:]


@needs_core
@needs_root
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_icmp_probe_sockets_count_and_write_alike(data: st.DataObject) -> None:
    core, fb = _both()
    ident = 0x5A5A
    messages = data.draw(st.lists(_echo_reply(ident), min_size=1, max_size=15))
    probes = [
        impl.IcmpProbeSocket("127.0.0.1", session=SESSION, size=64, kind="raw", ident=ident)
        for impl in (core, fb)
    ]
    injector = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        for message in messages:
            injector.sendto(message, ("127.0.0.1", 0))
        wanted = sum(1 for m in messages if m[0] == 0)  # the kernel filter drops the others
        rows = []
        for probe, impl in zip(probes, (core, fb), strict=True):
            out = np.zeros(len(messages) + 1, impl.REPLY_DTYPE)
            got = [0]

            def take(p=probe, o=out, g=got) -> bool:
                g[0] += p.recv(o[g[0] :])
                return p.received >= wanted

            _wait_readable([probe.fileno()], until=take)
            rows.append(out[: got[0]])
        assert probes[0].stats() == probes[1].stats()
        assert rows[0][_ROW_FIELDS].tolist() == rows[1][_ROW_FIELDS].tolist()
        assert probes[0].first_foreign == probes[1].first_foreign
    finally:
        injector.close()
        for probe in probes:
            probe.close()


@needs_core
@pytest.mark.parametrize(("client_name", "server_name"), [("core", "fb"), ("fb", "core")])
@pytest.mark.parametrize("two_step", [False, True])
def test_backends_interoperate(client_name: str, server_name: str, two_step: bool) -> None:
    core, fb = _both()
    impls = {"core": core, "fb": fb}
    client, server = impls[client_name], impls[server_name]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    refl = server.Reflector(sock, key=KEY, two_step=True)
    probe = client.ProbeSocket(
        "127.0.0.1", sock.getsockname()[1], session=77, size=96, key=KEY, two_step=two_step
    )
    try:
        sent = np.zeros(4, client.SENT_DTYPE)
        assert probe.send(100, 4, sent) == 4
        _wait_readable([sock.fileno()], until=lambda: (refl.serve(), refl.replied)[1] == 4)
        refl.flush(2**62)
        got = np.zeros(16, client.REPLY_DTYPE)
        n = [0]

        def take() -> bool:
            n[0] += probe.recv(got[n[0] :])
            return probe.received == (8 if two_step else 4)

        _wait_readable([probe.fileno()], until=take)
        rows = got[: n[0]]
        replies = rows[rows["kind"] != client.KIND_FOLLOWUP]
        assert sorted(replies["seq"].tolist()) == [100, 101, 102, 103]
        assert (rows["session"] == 77).all()
        assert (replies["size"] == 96).all()
        kind = client.KIND_REPLY_2STEP if two_step else client.KIND_REPLY
        assert (replies["kind"] == kind).all()
        if two_step:  # all four in one batch: no later reply to carry them, so follow-ups
            followups = rows[rows["kind"] == client.KIND_FOLLOWUP]
            assert sorted(followups["followup_seq"].tolist()) == [100, 101, 102, 103]
            assert (followups["size"] <= 96).all()
    finally:
        probe.close()
        refl.close()
        sock.close()
