"""Loopback tests against a real reflector (engine.reflector on the loaded native backend)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest

from detnet import native
from detnet.engine.reflector import (
    ReflectorConfig,
    ReflectorError,
    ReflectorServer,
    TokenBuckets,
)

KEY = b"reflector test key"
LOOPBACK = ("127.0.0.1", 0)


async def _server(**kwargs: object) -> ReflectorServer:
    server = ReflectorServer(ReflectorConfig(**kwargs))  # type: ignore[arg-type]
    await server.start()
    return server


@pytest.fixture
async def udp_server() -> AsyncIterator[ReflectorServer]:
    server = await _server(udp=LOOPBACK, tcp=LOOPBACK)
    yield server
    await server.close()


async def _collect(probe: native.ProbeSocket, want: int, *, within: float = 2.0) -> np.ndarray:
    """Receive until ``want`` replies arrived or ``within`` s passed (the loop keeps serving)."""
    out = np.zeros(max(want, 1) * 2, native.REPLY_DTYPE)
    n = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while n < want and loop.time() < deadline:
        n += probe.recv(out[n:])
        await asyncio.sleep(0.002)
    return out[:n]


async def _quiet_then_collect(probe: native.ProbeSocket) -> np.ndarray:
    """Give the reflector time to answer, then take whatever came back."""
    await asyncio.sleep(0.2)
    return await _collect(probe, 10**6, within=0.05)


def _probe(server: ReflectorServer, **kwargs: object) -> native.ProbeSocket:
    assert server.udp_address is not None
    host, port = server.udp_address
    return native.ProbeSocket(host, port, **{"session": 42, **kwargs})  # type: ignore[arg-type]


async def test_kernel_timestamps_ordering_and_size(udp_server: ReflectorServer) -> None:
    probe = _probe(udp_server, size=128)
    try:
        assert probe.kernel_rx
        sent = np.zeros(1, native.SENT_DTYPE)
        # The kernel turns RX timestamping on through a deferred work item when the first
        # socket on the machine asks for it, so the very first packets of an otherwise idle
        # machine can arrive unstamped (the engine labels those samples "user"). Warm up
        # until a stamped reply comes back; after that every reply must carry one.
        for warmups in range(1, 101):
            probe.send(1000 + warmups, 1, sent)
            warm = await _collect(probe, 1)
            if len(warm) and warm[0]["source"] == native.TS_KERNEL:
                break
        else:
            pytest.fail("no kernel-stamped reply in 100 warm-up probes")
        replies = []
        for seq in range(20):
            assert probe.send(seq, 1, sent) == 1
            if probe.kernel_tx:
                assert sent[0]["kernel_tx_ns"] >= sent[0]["user_tx_ns"]
            got = await _collect(probe, 1)
            assert len(got) == 1
            replies.append((sent[0].copy(), got[0].copy()))
    finally:
        probe.close()
    for s, r in replies:
        assert r["seq"] == s["seq"]
        assert r["size"] == 128
        assert r["source"] == native.TS_KERNEL
        assert r["kernel_rx_ns"] != 0
        tx = s["kernel_tx_ns"] or s["user_tx_ns"]
        assert r["tx_ns"] == s["user_tx_ns"]
        assert tx <= r["refl_rx_ns"] <= r["refl_tx_ns"] <= r["kernel_rx_ns"] <= r["user_rx_ns"]
    assert udp_server.stats()["replied"] == 20 + warmups


async def test_reply_size_equals_request_size(udp_server: ReflectorServer) -> None:
    for size in (native.MIN_SIZE, 200, 1400):
        probe = _probe(udp_server, size=size)
        try:
            assert probe.send(0, 3, np.zeros(3, native.SENT_DTYPE)) == 3
            got = await _collect(probe, 3)
        finally:
            probe.close()
        assert len(got) == 3
        assert (got["size"] == size).all()


async def test_hmac_accepted_and_rejected() -> None:
    server = await _server(udp=LOOPBACK, key=KEY)
    good = _probe(server, key=KEY)
    wrong = _probe(server, key=b"not the key")
    bare = _probe(server)
    try:
        sent = np.zeros(4, native.SENT_DTYPE)
        assert good.send(0, 4, sent) == 4
        assert len(await _collect(good, 4)) == 4
        wrong.send(0, 3, sent)
        bare.send(0, 2, sent)
        assert len(await _quiet_then_collect(wrong)) == 0
        assert len(await _quiet_then_collect(bare)) == 0
        stats = server.stats()
        assert stats["bad_hmac"] == 5
        assert stats["replied"] == 4
    finally:
        for p in (good, wrong, bare):
            p.close()
        await server.close()


async def test_hmac_request_to_unkeyed_reflector_is_dropped(udp_server: ReflectorServer) -> None:
    probe = _probe(udp_server, key=KEY)
    try:
        probe.send(0, 2, np.zeros(2, native.SENT_DTYPE))
        assert len(await _quiet_then_collect(probe)) == 0
    finally:
        probe.close()
    assert udp_server.stats()["bad_hmac"] == 2


def _raw(server: ReflectorServer) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    assert server.udp_address is not None
    sock.connect(server.udp_address)
    return sock


def _drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(65535)
        except (BlockingIOError, ConnectionRefusedError):
            return n
        n += 1


async def test_undersized_oversized_and_replies_dropped(udp_server: ReflectorServer) -> None:
    good = native.encode_probe(session=1, seq=1, tx_ns=1, size=64)
    big = native.encode_probe(session=1, seq=1, tx_ns=1, size=native.MAX_SIZE)
    bad = [
        good[:47],
        good[:63],
        big[:6] + struct.pack("!H", native.MAX_SIZE + 1) + big[8:] + b"\0",
        good + b"\0",
        native.make_reply(good, rx_ns=1, tx_ns=2),  # a reply: no reflection loops
    ]
    sock = _raw(udp_server)
    try:
        for data in bad:
            sock.send(data)
        await asyncio.sleep(0.2)
        assert _drain(sock) == 0
        sock.send(good)
        await asyncio.sleep(0.1)
        assert _drain(sock) == 1
    finally:
        sock.close()
    stats = udp_server.stats()
    assert stats["invalid"] == len(bad)
    assert stats["replied"] == 1


async def test_rate_limit_caps_replies() -> None:
    server = await _server(udp=LOOPBACK, rate_pps=5.0, burst=4)
    probe = _probe(server)
    try:
        assert probe.send(0, 40, np.zeros(40, native.SENT_DTYPE)) == 40
        got = await _quiet_then_collect(probe)
    finally:
        probe.close()
        await server.close()
    stats = server.stats()
    assert 4 <= len(got) <= 6  # the burst, plus what refilled at 5/s meanwhile
    assert stats["rate_limited"] == 40 - stats["replied"]
    assert stats["rate_limited"] >= 34


async def test_flood_of_garbage_gets_no_reply(udp_server: ReflectorServer) -> None:
    rng = random.Random(1234)
    template = native.encode_probe(session=1, seq=1, tx_ns=1, size=100)
    sock = _raw(udp_server)
    replies = 0
    try:
        for i in range(10_000):
            if i % 2:
                data = rng.randbytes(rng.randrange(0, 200))
            else:
                data = template[: rng.randrange(0, 100)]  # truncated probes
            while True:
                try:
                    sock.send(data)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            if i % 200 == 0:
                await asyncio.sleep(0.001)  # let the reflector keep up
                replies += _drain(sock)
        await asyncio.sleep(0.2)
        replies += _drain(sock)
        assert replies == 0
        assert udp_server.stats()["replied"] == 0
        sock.send(template)
        await asyncio.sleep(0.1)
        assert _drain(sock) == 1
    finally:
        sock.close()
    stats = udp_server.stats()
    assert stats["replied"] == 1
    assert stats["invalid"] + stats["bad_hmac"] == stats["received"] - 1


async def test_tcp_connect_and_echo(udp_server: ReflectorServer) -> None:
    assert udp_server.tcp_address is not None
    host, port = udp_server.tcp_address
    _, w = await asyncio.open_connection(host, port)  # a connect probe: open, close
    w.close()
    await w.wait_closed()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for seq in range(3):
            writer.write(native.encode_probe(session=5, seq=seq, tx_ns=10, size=80))
            reply = native.decode_probe(await reader.readexactly(80))
            assert reply.is_reply
            assert reply.seq == seq
            assert 10 <= reply.refl_rx_ns <= reply.refl_tx_ns
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""  # garbage: the server hangs up
    finally:
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.05)
    stats = udp_server.stats()
    assert stats["tcp_replied"] == 3
    assert stats["tcp_invalid"] == 1
    assert stats["tcp_connections"] == 2


def test_token_buckets() -> None:
    buckets = TokenBuckets(rate_pps=2.0, burst=2, size=2)
    assert [buckets.allow("a", 0) for _ in range(3)] == [True, True, False]
    assert buckets.allow("a", 500_000_000)  # half a second refills one token
    assert not buckets.allow("a", 500_000_000)
    assert buckets.allow("b", 0)


async def test_port_in_use_is_a_clear_error(udp_server: ReflectorServer) -> None:
    with pytest.raises(ReflectorError, match="cannot bind UDP"):
        await _server(udp=udp_server.udp_address)


def test_cli_reflect_answers_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detnet.controller",
            "reflect",
            "--udp",
            "127.0.0.1:0",
            "--stats-interval",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"udp 127\.0\.0\.1:(\d+)", line)
        assert match, line
        probe = native.ProbeSocket("127.0.0.1", int(match.group(1)), session=3)
        try:
            assert probe.send(0, 1, np.zeros(1, native.SENT_DTYPE)) == 1
            out = np.zeros(1, native.REPLY_DTYPE)
            assert select.select([probe.fileno()], [], [], 5)[0]
            assert probe.recv(out) == 1
        finally:
            probe.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "replied=1" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
