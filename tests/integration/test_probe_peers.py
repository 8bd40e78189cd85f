"""The engine against every kind of peer on loopback: our reflector (two-step stamps),
plain echo servers that are not ours (stdlib socketserver, UDP and TCP), a server that
answers garbage, and ICMP echo (the kernel answers)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from detnet.engine.core import ProbeEngine
from detnet.engine.recorder import Sample
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.engine.targets import parse_target

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _UdpGarbage(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        _, sock = self.request
        sock.sendto(b"PONG from a service that is not detnet", self.client_address)


class _TcpEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _serve(server: socketserver.UDPServer | socketserver.TCPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield int(server.socket.getsockname()[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def udp_echo() -> Iterator[int]:
    yield from _serve(socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpEcho))


@pytest.fixture
def udp_garbage() -> Iterator[int]:
    yield from _serve(socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpGarbage))


@pytest.fixture
def tcp_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TcpEcho)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture
async def reflector():
    refl = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0)))
    await refl.start()
    try:
        yield refl
    finally:
        await refl.close()


async def _run(specs: list[str], seconds: float, **kw: int) -> tuple[ProbeEngine, list[Sample]]:
    samples: list[Sample] = []
    targets = [parse_target(s, interval_ns=kw.get("interval_ns", 5_000_000)) for s in specs]
    engine = ProbeEngine(targets, window_ns=60 * 10**9, on_sample=samples.append)
    await engine.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await engine.aclose()
    return engine, samples


async def test_our_reflector_sends_its_kernel_tx_stamps_two_step(reflector) -> None:
    port = reflector.udp_address[1]
    # 5 ms apart: stamps ride in the next reply; the last ones come in follow-ups.
    engine, samples = await _run([f"r=udp://127.0.0.1:{port}"], 0.3)
    t = engine.totals()["r"]
    assert t.sent > 20
    assert t.received == t.sent == len(samples)  # the last ones too (drained at close)
    assert {s.timestamp_source for s in samples} == {"kernel-2step"}
    stats = reflector.stats()
    assert stats["two_step"] == t.sent
    assert stats["carried"] + stats["followups"] == t.sent
    assert stats["followups"] >= 1  # the last reply's stamp: no next request came
    assert engine.probers["r"].recorder.awaiting_stamps == 0


async def test_probes_sent_slower_than_the_wait_get_follow_ups(reflector) -> None:
    port = reflector.udp_address[1]
    # 60 ms apart: longer than the 50 ms longest wait, so every stamp is a follow-up.
    engine, samples = await _run([f"r=udp://127.0.0.1:{port}"], 0.4, interval_ns=60_000_000)
    assert {s.timestamp_source for s in samples} == {"kernel-2step"}
    assert reflector.stats()["followups"] == engine.totals()["r"].sent


async def test_a_plain_udp_echo_server_is_recognised_and_said_once(udp_echo, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="detnet.probe")
    engine, samples = await _run([f"e=udp://127.0.0.1:{udp_echo}"], 0.3)
    t = engine.totals()["e"]
    assert t.sent > 20
    assert t.received == t.sent
    assert t.foreign == 0
    assert {s.timestamp_source for s in samples} == {"kernel-echo"}
    assert all(s.fwd_ns is None and s.back_ns is None for s in samples)
    said = [r.getMessage() for r in caplog.records if "echoes our probes verbatim" in r.message]
    assert len(said) == 1
    assert "?mode=echo" in said[0]


async def test_mode_echo_says_it_up_front(udp_echo, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="detnet.probe")
    engine, samples = await _run([f"e=udp://127.0.0.1:{udp_echo}?mode=echo"], 0.2)
    assert engine.totals()["e"].received == engine.totals()["e"].sent > 0
    assert {s.timestamp_source for s in samples} == {"kernel-echo"}
    assert not [r for r in caplog.records if "verbatim" in r.message]


async def test_replies_that_are_not_ours_are_counted_and_described(udp_garbage, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="detnet.probe")
    engine, _ = await _run([f"g=udp://127.0.0.1:{udp_garbage}"], 0.3)
    t = engine.totals()["g"]
    assert t.received == 0
    assert t.foreign >= t.sent - 2 > 0  # replies to the last probes may still be on the way
    (said,) = [r.getMessage() for r in caplog.records if "neither ours nor an echo" in r.message]
    assert "38 bytes from 127.0.0.1:" in said
    assert b"PONG".hex() in said
    assert f"udp://127.0.0.1:{udp_garbage}" in said


async def test_a_plain_tcp_echo_server_is_measured_in_echo_mode(tcp_echo, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="detnet.probe")
    engine, samples = await _run([f"t=tcp://127.0.0.1:{tcp_echo}?mode=echo"], 0.3)
    t = engine.totals()["t"]
    assert t.received == t.sent > 20
    assert t.foreign == 0
    assert all(s.fwd_ns is None for s in samples)
    assert len([r for r in caplog.records if "verbatim" in r.message]) == 1


def _icmp_allowed() -> bool:
    text = Path("/proc/sys/net/ipv4/ping_group_range").read_text()
    lo, hi = (int(x) for x in text.split())
    return os.geteuid() == 0 or any(lo <= g <= hi for g in (os.getegid(), *os.getgroups()))


@pytest.mark.skipif(
    not _icmp_allowed(), reason="needs root or net.ipv4.ping_group_range to include our group"
)
async def test_icmp_echo_is_probed_kernel_to_kernel() -> None:
    fresh = ProbeEngine([parse_target("p=icmp://127.0.0.1")], window_ns=10**9)
    await fresh.start()
    try:  # before any reply can be read (nothing awaited): what the prober expects
        assert fresh.timestamp_sources() == {"p": "kernel-echo"}
    finally:
        await fresh.aclose()
    engine, samples = await _run(["p=icmp://127.0.0.1"], 0.3)
    t = engine.totals()["p"]
    assert t.received == t.sent > 20
    assert {s.timestamp_source for s in samples} == {"kernel-echo"}
    assert engine.stats()["p"].protocol == "icmp"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="a network namespace of our own (unshare -n, setpriv) needs root; CI is root",
)
def test_icmp_refused_is_one_line_that_says_what_to_set() -> None:
    # A namespace of our own: its ping_group_range is the kernel default (nobody), and
    # without CAP_NET_RAW no raw socket either.
    shell = 'ip link set lo up && exec setpriv --bounding-set -net_raw "$0" "$@"'
    argv = [sys.executable, "-m", "detnet.controller", "probe", "--duration", "0.2s"]
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", shell, *argv, "--target", "p=icmp://127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "target p (icmp://127.0.0.1): cannot open: icmp: not permitted" in line
    assert "net.ipv4.ping_group_range" in line
    assert "CAP_NET_RAW" in line


def test_stdlib_echo_servers_are_really_not_ours(udp_echo) -> None:
    # The peer of the echo tests answers byte for byte, nothing more.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"hello", ("127.0.0.1", udp_echo))
        assert s.recv(100) == b"hello"


async def test_a_reflector_that_restarts_mid_run_leaves_no_reply_unrecorded() -> None:
    # The new reflector knows nothing of the stamps the old one owed: those replies are
    # recorded one-step when their wait is over, the rest two-step again.
    first = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0)))
    await first.start()
    assert first.udp_address is not None
    port = first.udp_address[1]
    samples: list[Sample] = []
    engine = ProbeEngine(
        [parse_target(f"r=udp://127.0.0.1:{port}", interval_ns=5_000_000)],
        window_ns=60 * 10**9,
        on_sample=samples.append,
    )
    await engine.start()
    second = None
    try:
        await asyncio.sleep(0.2)
        await first.close()
        second = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", port)))
        await second.start()
        await asyncio.sleep(0.3)
    finally:
        await engine.aclose()
        if second is not None:
            await second.close()
    t = engine.totals()["r"]
    assert t.sent == len(samples)
    assert engine.probers["r"].recorder.awaiting_stamps == 0
    after = [s for s in samples if s.sent_ns > samples[0].sent_ns + 250_000_000]
    assert after
    assert {s.timestamp_source for s in after if not s.lost} == {"kernel-2step"}
