"""`detnet reflect`'s bounds on its TCP port, set from the command line, on loopback.

Each run reads the serving line for the port, drives TCP clients, then stops the
reflector with SIGTERM and reads its last stats line: the counters say which bound
closed which connection (no timing is asserted; EOFs are awaited).
"""

from __future__ import annotations

import asyncio

import pytest

from detnet import native
from tests.helpers import DETNET

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


class Reflect:
    """A ``detnet reflect --tcp 127.0.0.1:0`` subprocess and its address."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    async def stop(self) -> dict[str, int]:
        """SIGTERM; the counters of its last stats line."""
        self.proc.terminate()
        _out, err = await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode == 0, err
        last = err.decode().strip().splitlines()[-1]
        assert last.startswith("detnet reflect: "), last
        return {k: int(v) for k, v in (kv.split("=") for kv in last.split()[2:])}


async def reflect(*flags: str) -> Reflect:
    proc = await asyncio.create_subprocess_exec(
        *DETNET, "reflect", "--tcp", "127.0.0.1:0", "--stats-interval", "0", "-v", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
    assert line.startswith("detnet reflect: serving tcp 127.0.0.1:"), line
    return Reflect(proc, int(line.rsplit(":", 1)[1]))


def frame(seq: int) -> bytes:
    return native.encode_probe(session=7, seq=seq, tx_ns=native.realtime_ns(), size=64)


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seq: int) -> None:
    """One frame out, its reply back: the connection is in the reflector's table."""
    writer.write(frame(seq))
    await writer.drain()
    reply = await asyncio.wait_for(reader.readexactly(64), 30)
    assert native.decode_probe(reply).seq == seq


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Wait for the reflector to close (EOF or reset); True when it did."""
    try:
        return await asyncio.wait_for(reader.read(1), 30) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
async def running():
    started: list[Reflect] = []

    async def start(*flags: str) -> Reflect:
        r = await reflect(*flags)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.proc.returncode is None:
            r.proc.kill()
            await r.proc.wait()


async def test_max_connections_closes_the_stalest_idle_one(running) -> None:
    r = await running("--max-connections", "1", "--tcp-idle-timeout", "10m")
    old = await asyncio.open_connection("127.0.0.1", r.port)
    await echoed(*old, seq=1)
    new = await asyncio.open_connection("127.0.0.1", r.port)
    await echoed(*new, seq=2)  # admitted: the idle one made room
    assert await closed_by_peer(old[0])
    for _reader, writer in (old, new):
        writer.close()
    stats = await r.stop()
    assert stats["tcp_evicted"] == 1
    assert stats["tcp_replied"] == 2


async def test_idle_and_frame_timeouts_take_durations(running) -> None:
    # A bare number is seconds, as everywhere; 300ms is a duration with a unit.
    r = await running("--tcp-idle-timeout", "0.3", "--tcp-frame-timeout", "300ms")
    idle = await asyncio.open_connection("127.0.0.1", r.port)
    stalled = await asyncio.open_connection("127.0.0.1", r.port)
    stalled[1].write(frame(1)[:8])  # a frame announced, never finished
    await stalled[1].drain()
    assert await closed_by_peer(idle[0])
    assert await closed_by_peer(stalled[0])
    for _reader, writer in (idle, stalled):
        writer.close()
    stats = await r.stop()
    assert (stats["tcp_idle_timeouts"], stats["tcp_stall_timeouts"]) == (1, 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-connections", "0"], "tcp_max_connections 0: must be at least 1"),
        (["--tcp-idle-timeout", "0"], '--tcp-idle-timeout "0": must be a positive duration'),
        (["--tcp-frame-timeout", "soon"], '--tcp-frame-timeout "soon": must be a duration'),
        (["--tcp-idle-timeout", "1e300s"], '--tcp-idle-timeout "1e300s": must be at most'),
    ],
)
async def test_bad_bounds_are_one_line_exit_2(flags: list[str], message: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *DETNET, "reflect", "--tcp", "127.0.0.1:0", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert out == b""
    assert err.decode().startswith(f"detnet reflect: error: {message}")
    assert err.count(b"\n") == 1
