"""Loopback tests against a real reflector (engine.reflector on the loaded native backend)."""

from __future__ import annotations

import asyncio
import contextlib
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
)
from tests.helpers import until

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run

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


def test_bad_rate_limit_is_a_reflector_error() -> None:
    with pytest.raises(ReflectorError, match=r"reflector rate limit: rate_pps -1\.0 must be >= 0"):
        ReflectorServer(ReflectorConfig(tcp=LOOPBACK, rate_pps=-1.0))


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
            "-v",
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


# --- The TCP port under hostile input: bounded connections, idle and stall timeouts. ---


async def _tcp_server(**kwargs: object) -> ReflectorServer:
    return await _server(tcp=LOOPBACK, **kwargs)


async def _echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seq: int) -> None:
    writer.write(native.encode_probe(session=9, seq=seq, tx_ns=10, size=80))
    reply = native.decode_probe(await reader.readexactly(80))
    assert reply.is_reply
    assert reply.seq == seq


async def _hung_up(reader: asyncio.StreamReader) -> bool:
    """Read until the server closes the connection (EOF or reset)."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return True


async def _raw_connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


def _established(port: int) -> int:
    """Established connections on the server side of ``port``, as the kernel sees them."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


async def test_idle_flood_stays_under_the_cap_and_probes_are_still_answered() -> None:
    server = await _tcp_server()
    assert server.tcp_address is not None
    cap = server.tcp_max_connections
    assert cap == 1024  # the default, below this machine's fd limit
    legit_r, legit_w = await asyncio.open_connection(*server.tcp_address)
    flood: list[socket.socket] = []
    try:
        await _echo_once(legit_r, legit_w, 0)
        for i in range(3000):  # the first release held all 3,000 (76.8 MB)
            flood.append(await _raw_connect(server.tcp_address))
            if i % 100 == 99:  # a probe every so often, as the engine's echo prober does
                await _echo_once(legit_r, legit_w, i)
        await until(lambda: server.stats()["tcp_connections"] == 3001, timeout_s=30.0)
        stats = server.stats()
        assert stats["tcp_open"] == cap
        assert stats["tcp_evicted"] == 3001 - cap
        assert _established(server.tcp_address[1]) <= cap
        await _echo_once(legit_r, legit_w, 10**6)  # the kept-open probe connection survived
        r, w = await asyncio.open_connection(*server.tcp_address)  # so does a new one
        await _echo_once(r, w, 1)
        w.close()
        connect_probe = await _raw_connect(server.tcp_address)
        connect_probe.close()
    finally:
        for sock in flood:
            sock.close()
        legit_w.close()
        await server.close()


async def test_full_table_closes_the_connection_idle_longest() -> None:
    server = await _tcp_server(tcp_max_connections=3)
    assert server.tcp_address is not None
    conns = [await asyncio.open_connection(*server.tcp_address) for _ in range(3)]
    try:
        await until(lambda: server.stats()["tcp_open"] == 3, timeout_s=30.0)
        await _echo_once(*conns[0], 0)  # the first one works: the second is now stalest
        newcomer = await asyncio.open_connection(*server.tcp_address)
        conns.append(newcomer)
        async with asyncio.timeout(30):
            assert await _hung_up(conns[1][0])
        for i in (0, 2, 3):
            await _echo_once(*conns[i], i)
        stats = server.stats()
        assert (stats["tcp_evicted"], stats["tcp_open"]) == (1, 3)
    finally:
        for _, w in conns:
            w.close()
        await server.close()


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickle"])
async def test_a_frame_that_stalls_midway_is_closed(trickle: bool) -> None:
    server = await _tcp_server(tcp_frame_timeout=0.3)
    assert server.tcp_address is not None
    frame = native.encode_probe(session=1, seq=1, tx_ns=1, size=native.MAX_SIZE)
    reader, writer = await asyncio.open_connection(*server.tcp_address)
    try:
        writer.write(frame[:8])  # announces 9,000 bytes, sends 8

        async def dribble() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in frame[8:]:  # bytes keep coming: no extension of the deadline
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.02)

        task = asyncio.create_task(dribble()) if trickle else None
        async with asyncio.timeout(30):
            assert await _hung_up(reader)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await until(lambda: server.stats()["tcp_stall_timeouts"] == 1, timeout_s=30.0)
        stats = server.stats()
        assert (stats["tcp_replied"], stats["tcp_open"], stats["tcp_idle_timeouts"]) == (0, 0, 0)
    finally:
        writer.close()
        await server.close()


async def test_an_idle_connection_is_closed_and_an_active_one_is_not() -> None:
    server = await _tcp_server(tcp_idle_timeout=1.0)
    assert server.tcp_address is not None
    idle_r, idle_w = await asyncio.open_connection(*server.tcp_address)
    busy_r, busy_w = await asyncio.open_connection(*server.tcp_address)
    try:
        seq = 0
        while not idle_r.at_eof():  # probes well inside the timeout keep busy open
            await _echo_once(busy_r, busy_w, seq)
            seq += 1
            await asyncio.sleep(0.1)
            assert seq < 300, "the idle connection was never closed"
        await _echo_once(busy_r, busy_w, seq)
        stats = server.stats()
        assert (stats["tcp_idle_timeouts"], stats["tcp_open"]) == (1, 1)
    finally:
        idle_w.close()
        busy_w.close()
        await server.close()


async def test_a_client_that_does_not_read_its_replies_is_cut_off() -> None:
    server = await _tcp_server(tcp_frame_timeout=0.3)
    assert server.tcp_address is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, server.tcp_address)
    frame = native.encode_probe(session=1, seq=1, tx_ns=1, size=native.MAX_SIZE)
    try:
        with contextlib.suppress(ConnectionError):
            while not server.stats()["tcp_stall_timeouts"]:
                try:
                    sock.send(frame * 16)
                except BlockingIOError:
                    await asyncio.sleep(0.01)  # the server stopped reading us
        assert server.stats()["tcp_stall_timeouts"] == 1
        await until(lambda: server.stats()["tcp_open"] == 0, timeout_s=30.0)
    finally:
        sock.close()
        await server.close()


_FD_LIMITED_REFLECTOR = """
import asyncio, resource, sys
import uvloop  # the loop `detnet reflect` runs on
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from detnet.engine.reflector import ReflectorConfig, ReflectorServer

async def main():
    server = ReflectorServer(ReflectorConfig(tcp=("127.0.0.1", 0)))
    await server.start()
    print(server.tcp_address[1], server.tcp_max_connections, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(server.stats()["tcp_evicted"], flush=True)
    await server.close()

uvloop.run(main())
"""


async def test_at_a_low_fd_limit_the_cap_keeps_probes_answered() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FD_LIMITED_REFLECTOR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        port_text, cap_text = (await proc.stdout.readline()).split()
        port, cap = int(port_text), int(cap_text)
        assert 0 < cap < 256 - 64  # the default of 1024 shrank to what the limit leaves
        for _ in range(1000):  # far past the limit: each newcomer pushes the stalest out
            flood.append(await _raw_connect(("127.0.0.1", port)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for seq in range(3):
            await _echo_once(reader, writer, seq)
        writer.close()
        proc.stdin.close()
        evicted = int(await proc.stdout.readline())
        assert evicted >= 1000 - cap
        assert await proc.wait() == 0
    finally:
        for sock in flood:
            sock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_tcp_limits_are_checked() -> None:
    with pytest.raises(ReflectorError, match="tcp_idle_timeout 0: must be"):
        ReflectorConfig(tcp=LOOPBACK, tcp_idle_timeout=0)
    with pytest.raises(ReflectorError, match="tcp_frame_timeout nan: must be"):
        ReflectorConfig(tcp=LOOPBACK, tcp_frame_timeout=float("nan"))
    with pytest.raises(ReflectorError, match="tcp_max_connections 0: must be at least 1"):
        ReflectorConfig(tcp=LOOPBACK, tcp_max_connections=0)


async def test_a_cap_beyond_the_fd_limit_is_a_clear_error() -> None:
    with pytest.raises(ReflectorError, match=r"tcp_max_connections 10000000: only \d+ file"):
        await _tcp_server(tcp_max_connections=10_000_000)


async def test_tcp_hmac_and_rate_limit() -> None:
    server = await _tcp_server(key=KEY, rate_pps=1.0, burst=2)
    assert server.tcp_address is not None
    reader, writer = await asyncio.open_connection(*server.tcp_address)
    try:
        for seq in range(4):  # two within the burst, two over it: no reply, still open
            writer.write(native.encode_probe(session=9, seq=seq, tx_ns=10, size=80, key=KEY))
        replies = [native.decode_probe(await reader.readexactly(80), key=KEY) for _ in range(2)]
        assert [r.seq for r in replies] == [0, 1]
        await until(lambda: server.stats()["tcp_rate_limited"] == 2, timeout_s=30.0)
        bare, bare_w = await asyncio.open_connection(*server.tcp_address)
        bare_w.write(native.encode_probe(session=9, seq=0, tx_ns=10, size=80))  # no HMAC
        async with asyncio.timeout(30):
            assert await bare.read() == b""  # dropped and hung up on, bucket or not
        bare_w.close()
        stats = server.stats()
        assert (stats["tcp_replied"], stats["tcp_bad_hmac"]) == (2, 1)
    finally:
        writer.close()
        await server.close()
