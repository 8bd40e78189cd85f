"""The engine end to end on loopback, against the real reflector."""

from __future__ import annotations

import asyncio
import contextlib
import os

import numpy as np
import pytest

from detnet.engine.core import ProbeEngine
from detnet.engine.errors import TargetError
from detnet.engine.recorder import Sample
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.engine.targets import parse_target

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


@pytest.fixture
async def reflector():
    refl = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await refl.start()
    try:
        yield refl
    finally:
        await refl.close()


async def _run(engine: ProbeEngine, seconds: float) -> None:
    await engine.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await engine.aclose()


async def test_udp_tcp_connect_and_echo_with_a_dead_target(reflector):
    up, tp = reflector.udp_address[1], reflector.tcp_address[1]
    samples: list[Sample] = []
    engine = ProbeEngine(
        [
            parse_target(f"udp=udp://127.0.0.1:{up}", interval_ns=2_000_000, batch=2),
            parse_target(f"conn=tcp://127.0.0.1:{tp}?mode=connect", interval_ns=20_000_000),
            parse_target(f"echo=tcp://127.0.0.1:{tp}?mode=echo", interval_ns=10_000_000),
            parse_target("dead=udp://127.0.0.1:9", interval_ns=10_000_000, timeout_ns=50_000_000),
        ],
        window_ns=60 * 10**9,
        on_sample=samples.append,
    )
    await _run(engine, 0.6)
    stats, totals = engine.stats(), engine.totals()
    for name in ("udp", "conn", "echo"):
        s, t = stats[name], totals[name]
        assert t.sent > 0, name
        assert t.lost == 0, (name, t)
        assert t.received == t.sent, (name, t)
        assert s.rtt_min_ns is not None
        assert s.rtt_p50_ns is not None
        assert s.rtt_max_ns is not None
        assert 0 < s.rtt_min_ns <= s.rtt_p50_ns <= s.rtt_max_ns
    # Our reflector sends its kernel TX stamps two-step; a stamp that comes too late
    # (a loaded machine) leaves its record one-step, never unmeasured.
    udp = [s.timestamp_source for s in samples if s.target == "udp"]
    assert set(udp) <= {"kernel-2step", "kernel"}
    assert udp.count("kernel-2step") >= 0.9 * len(udp)
    assert stats["udp"].ipdv_fwd_p50_ns is not None
    assert stats["conn"].ipdv_fwd_p50_ns is None  # no reflector stamps on a handshake
    assert totals["dead"].lost == totals["dead"].sent > 0  # down: loss, others go on
    assert stats["dead"].loss_ratio == 1.0
    # Every probe sent was accounted for, once, in the stream (drained at close).
    by_target: dict[str, list[Sample]] = {}
    for smp in samples:
        by_target.setdefault(smp.target, []).append(smp)
    for name, t in totals.items():
        seqs = sorted(s.seq for s in by_target[name])
        assert seqs == list(range(t.sent)), name


async def test_stream_agrees_with_window_stats(reflector):
    up = reflector.udp_address[1]
    samples: list[Sample] = []
    engine = ProbeEngine(
        [parse_target(f"r=udp://127.0.0.1:{up}", interval_ns=1_000_000)],
        window_ns=60 * 10**9,
        on_sample=samples.append,
    )
    await _run(engine, 0.4)
    s = engine.stats()["r"]
    rtt = np.array([x.rtt_ns for x in samples if not x.lost])
    assert s.received == len(rtt)
    assert s.sent == len(samples)
    assert s.rtt_p99_ns == np.percentile(rtt, 99)
    assert s.jitter_iqr_ns == np.percentile(rtt, 75) - np.percentile(rtt, 25)
    kernel = [x for x in samples if x.timestamp_source == "kernel-2step"]
    assert kernel
    assert all((x.user_rtt_ns or 0) >= (x.rtt_ns or 0) for x in kernel)


async def test_window_by_sample_count(reflector):
    up = reflector.udp_address[1]
    engine = ProbeEngine(
        [parse_target(f"r=udp://127.0.0.1:{up}", interval_ns=1_000_000)], window_samples=10
    )
    await _run(engine, 0.2)
    s = engine.stats()["r"]
    assert s.sent == 10
    assert engine.totals()["r"].sent > 10


async def test_unresolvable_target_is_a_target_error_and_nothing_stays_open(reflector):
    up = reflector.udp_address[1]
    engine = ProbeEngine(
        [
            parse_target(f"ok=udp://127.0.0.1:{up}"),
            parse_target("bad=udp://no-such-host.invalid:1"),
        ]
    )
    before = _open_sockets()
    with pytest.raises(TargetError, match="cannot resolve"):
        await engine.start()  # "ok" is opened first, then "bad" fails
    assert _open_sockets() == before, "a socket of the failed start stayed open"
    assert engine.probers == {}
    await engine.aclose()


def _open_sockets() -> set[str]:
    """This process's open sockets, as /proc/self/fd names them ("socket:[inode]")."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:"):
                out.add(link)
    return out


async def test_tcp_echo_reconnects_after_the_server_goes_away():
    refl = ReflectorServer(ReflectorConfig(tcp=("127.0.0.1", 0)))
    await refl.start()
    assert refl.tcp_address is not None
    port = refl.tcp_address[1]
    engine = ProbeEngine(
        [
            parse_target(
                f"e=tcp://127.0.0.1:{port}?mode=echo", interval_ns=5_000_000, timeout_ns=50_000_000
            )
        ],
        window_ns=10**10,
    )
    await engine.start()
    try:
        await asyncio.sleep(0.1)
        await refl.close()
        await asyncio.sleep(0.2)
        assert engine.totals()["e"].lost > 0
        refl = ReflectorServer(ReflectorConfig(tcp=("127.0.0.1", port)))
        await refl.start()
        before = engine.totals()["e"].received
        await asyncio.sleep(1.0)
        assert engine.totals()["e"].received > before
    finally:
        await engine.aclose()
        await refl.close()
