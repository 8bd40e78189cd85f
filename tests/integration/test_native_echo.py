"""ProbeSocket against plain UDP echo servers (stdlib socketserver, not our code).

A verbatim echo of our request is a row of kind KIND_ECHO; what is neither ours nor an
echo is counted as foreign (the first one kept for the report), apart from bad HMACs and
malformed detnet packets.
"""

from __future__ import annotations

import select
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from detnet import native
from tests.integration.test_native_timestamping import kernel_rx_stamps  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("kernel_rx_stamps")

KEY = b"echo key"


@contextmanager
def udp_server(answer: Callable[[bytes], bytes | None]) -> Iterator[tuple[str, int]]:
    """A stdlib UDP server on loopback that sends ``answer(data)`` back (None: nothing)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            reply = answer(data)
            if reply is not None:
                sock.sendto(reply, self.client_address)

    server = socketserver.UDPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _probe(
    address: tuple[str, int], count: int, **kwargs: object
) -> tuple[np.ndarray, native.ProbeSocket]:
    probe = native.ProbeSocket(address[0], address[1], **{"session": 31, **kwargs})  # type: ignore[arg-type]
    out = np.zeros(64, native.REPLY_DTYPE)
    rows = []
    try:
        sent = np.zeros(count, native.SENT_DTYPE)
        assert probe.send(100, count, sent) == count
        while probe.received < count and select.select([probe.fileno()], [], [], 2.0)[0]:
            n = probe.recv(out)
            rows.append(out[:n].copy())
    finally:
        probe.close()
    return (np.concatenate(rows) if rows else out[:0]), probe


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"size": 200}, {"key": KEY, "size": 96}, {"two_step": True}],
    ids=["plain", "200-bytes", "keyed", "two-step-request"],
)
def test_verbatim_echo_is_an_echo_row(kwargs: dict[str, object]) -> None:
    with udp_server(lambda data: data) as address:
        rows, probe = _probe(address, 5, **kwargs)
    assert sorted(rows["seq"].tolist()) == [100, 101, 102, 103, 104]
    assert (rows["kind"] == native.KIND_ECHO).all()
    assert (rows["refl_rx_ns"] == 0).all()
    assert (rows["refl_tx_ns"] == 0).all()
    assert (rows["refl_source"] == native.TS_UNKNOWN).all()
    assert (rows["source"] == native.TS_KERNEL).all()
    assert probe.stats()["echoes"] == 5
    assert probe.first_foreign is None


def test_foreign_replies_are_counted_and_the_first_is_kept() -> None:
    with udp_server(lambda data: b"HTTP/1.1 400 Bad Request\r\n" + data[:4]) as address:
        rows, probe = _probe(address, 3)
    assert len(rows) == 0
    stats = probe.stats()
    assert stats["foreign"] == 3
    assert stats["invalid"] == stats["bad_hmac"] == 0
    first = probe.first_foreign
    assert first is not None
    assert first.size == 30
    assert first.source == address
    assert first.prefix == b"HTTP/1.1 400 Bad"
    assert "30 bytes from 127.0.0.1:" in first.describe()


def test_a_longer_answer_is_foreign_with_its_real_size() -> None:
    with udp_server(lambda data: data + b"\0" * 1000) as address:
        rows, probe = _probe(address, 1, size=64)
    assert len(rows) == 0
    assert probe.stats()["foreign"] == 1
    assert probe.first_foreign is not None
    assert probe.first_foreign.size == 1064
    assert probe.first_foreign.prefix[:4] == b"DTNT"


def test_another_session_is_foreign() -> None:
    def other_session(data: bytes) -> bytes:
        return data[:8] + b"\x00\x00\x00\x99" + data[12:]

    with udp_server(other_session) as address:
        rows, probe = _probe(address, 2)
    assert len(rows) == 0
    assert probe.stats()["foreign"] == 2


def test_an_altered_echo_is_invalid_and_a_bad_mac_is_bad_hmac() -> None:
    def altered(data: bytes) -> bytes:
        return data[:60] + b"\x01" + data[61:]

    with udp_server(altered) as address:
        rows, probe = _probe(address, 2)
    assert len(rows) == 0
    assert probe.stats()["invalid"] == 2
    assert probe.stats()["foreign"] == 0

    def bad_mac(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1])

    with udp_server(bad_mac) as address:
        rows, probe = _probe(address, 2, key=KEY)
    assert len(rows) == 0
    assert probe.stats()["bad_hmac"] == 2
    assert probe.stats()["invalid"] == probe.stats()["foreign"] == 0


def test_an_echo_of_another_probers_keyed_request_is_invalid() -> None:
    def keyed_echo(data: bytes) -> bytes:
        # What an echo of someone else's keyed probe looks like to an unkeyed prober.
        return native.encode_probe(session=31, seq=1, tx_ns=1, size=len(data), key=b"x")

    with udp_server(keyed_echo) as address:
        rows, probe = _probe(address, 1, size=64)
    assert len(rows) == 0
    assert probe.stats()["invalid"] == 1  # flags differ from ours: not a verbatim echo
