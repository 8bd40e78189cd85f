"""Targets that come and go while the engine runs, against real reflectors on loopback.

Behaviour only: every wait is for a condition, with a generous overall limit.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from detnet.engine.collector import COUNTERS
from detnet.engine.core import ProbeEngine
from detnet.engine.errors import TargetError
from detnet.engine.recorder import Sample
from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from detnet.engine.ring import FLAG_LOST, FLAG_RECEIVED
from detnet.engine.scheduler import STRETCH_STEP, phase_offset
from detnet.engine.targets import Endpoint, Target
from tests.helpers import until

MS = 1_000_000
LIMIT_S = 15.0

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


@pytest.fixture
async def reflectors():
    """Two reflectors on two loopback addresses: two 'replicas' on two 'nodes'."""
    out = []
    for host in ("127.0.0.10", "127.0.0.11"):
        refl = ReflectorServer(ReflectorConfig(udp=(host, 0), tcp=(host, 0)))
        await refl.start()
        out.append(refl)
    try:
        yield out
    finally:
        for refl in out:
            await refl.close()


def _udp(name: str, refl: ReflectorServer, **kw: object) -> Target:
    host, port = refl.udp_address  # type: ignore[misc]
    return Target(name=name, protocol="udp", host=host, port=port, **kw)  # type: ignore[arg-type]


def _received(engine: ProbeEngine, name: str) -> int:
    t = engine.totals().get(name)
    return 0 if t is None else t.received


async def test_others_are_undisturbed_by_a_target_added_and_removed(reflectors):
    a_target = _udp("a", reflectors[0], interval_ns=5 * MS, timeout_ns=2_000 * MS)
    engine = ProbeEngine([a_target], window_ns=None)
    await engine.start()
    try:
        tt = engine.timetable
        assert tt is not None
        sched = tt.schedule("a")
        await until(lambda: _received(engine, "a") >= 10, timeout_s=LIMIT_S)
        ring = engine.probers["a"].recorder.ring
        before = ring.snapshot()

        b = _udp(
            "b",
            reflectors[1],
            interval_ns=2 * MS,
            endpoint=Endpoint("robot", node="n2", pod="robot-b"),
        )
        await engine.add_target(b)
        await until(lambda: _received(engine, "b") >= 10, timeout_s=LIMIT_S)
        assert set(engine.stats()) == {"a", "b"}
        b_prober = engine.probers["b"]
        await engine.remove_target("b")
        assert set(engine.stats()) == set(engine.totals()) == {"a"}
        b_sent = b_prober.recorder.totals().sent
        mark = _received(engine, "a")
        await until(lambda: _received(engine, "a") >= mark + 20, timeout_s=LIMIT_S)
        assert b_prober.recorder.totals().sent == b_sent  # its schedule stopped

        after = ring.snapshot()
        # a's records: nothing rewritten, nothing lost, its sequence unbroken.
        n = len(before)
        for field in ("t_ns", "sent_ns", "seq", "flags"):
            assert np.array_equal(getattr(after, field)[:n], getattr(before, field)), field
        np.testing.assert_array_equal(after.rtt_ns[:n], before.rtt_ns)
        assert after.seq.tolist() == list(range(len(after)))
        assert np.all(after.flags & FLAG_RECEIVED)
        assert not np.any(after.flags & FLAG_LOST)
        # Its schedule: the same object, interval and grid as if b never was.
        assert tt.schedule("a") is sched
        assert sched.interval_ns == 5 * MS
        last = sched.last_deadline_ns
        assert last is not None
        assert (last - tt.start_ns - phase_offset("a", 5 * MS)) % (5 * MS) == 0
        totals = engine.totals()["a"]
        assert totals.sent >= ring.total
        assert totals.lost == 0
    finally:
        await engine.aclose()


async def test_a_removed_target_leaves_metrics_and_closes(reflectors):
    registry = CollectorRegistry()
    engine = ProbeEngine(allow_empty=True, window_ns=10_000 * MS)
    registry.register(engine.collector())
    await engine.start()
    try:
        assert engine.stats() == {}
        ep = Endpoint("robot", node="node-1", pod="robot-0")
        await engine.add_target(_udp("robot-0", reflectors[0], interval_ns=5 * MS, endpoint=ep))
        await until(lambda: _received(engine, "robot-0") >= 5, timeout_s=LIMIT_S)
        labels = {
            "target": "robot-0",
            "protocol": "udp",
            "app": "robot",
            "pod": "robot-0",
            "node": "node-1",
        }
        assert (registry.get_sample_value("detnet_probes_received_total", labels) or 0) >= 5
        prober = engine.probers["robot-0"]
        await engine.remove_target("robot-0")
        text = generate_latest(registry).decode()
        assert "robot-0" not in text
        assert engine.totals() == {}
        assert prober._sock is None  # type: ignore[attr-defined]  # its socket is closed
        with pytest.raises(TargetError, match="no target named 'robot-0'"):
            await engine.remove_target("robot-0")
    finally:
        await engine.aclose()


async def test_bad_additions_change_nothing(reflectors):
    engine = ProbeEngine([_udp("a", reflectors[0], interval_ns=10 * MS)])
    await engine.start()
    try:
        prober = engine.probers["a"]
        with pytest.raises(TargetError, match="used twice"):
            await engine.add_target(_udp("a", reflectors[1]))
        with pytest.raises(TargetError, match="cannot resolve"):
            await engine.add_target(Target(name="x", protocol="udp", host="nope.invalid", port=9))
        closed_port = reflectors[0].tcp_address[1]
        await reflectors[0].close()  # now nothing listens there: a TCP echo cannot open
        with pytest.raises(TargetError, match="cannot open"):
            await engine.add_target(
                Target(
                    name="echo",
                    protocol="tcp",
                    host="127.0.0.10",
                    port=closed_port,
                    mode="echo",
                    timeout_ns=500 * MS,
                )
            )
        assert set(engine.targets) == {"a"}
        assert engine.probers["a"] is prober
        assert engine.timetable is not None
        assert list(engine.timetable) == ["a"]
    finally:
        await engine.aclose()
    with pytest.raises(TargetError, match="closed"):
        await engine.add_target(_udp("late", reflectors[1]))


async def test_replace_targets_applies_the_set_difference(reflectors):
    r0, r1 = reflectors
    samples: list[Sample] = []
    engine = ProbeEngine(
        [_udp("keep", r0, interval_ns=5 * MS), _udp("move", r0, interval_ns=5 * MS)],
        on_sample=samples.append,
    )
    await engine.start()
    try:
        await until(lambda: _received(engine, "move") >= 5, timeout_s=LIMIT_S)
        keep = engine.probers["keep"]
        changes = await engine.replace_targets(
            [
                _udp("keep", r0, interval_ns=5 * MS),
                _udp("move", r1, interval_ns=5 * MS),  # same name, another address
                _udp("new", r1, interval_ns=5 * MS),
                Target(name="bad", protocol="udp", host="nope.invalid", port=9),
            ]
        )
        assert changes.added == ("new",)
        assert changes.replaced == ("move",)
        assert changes.removed == ()
        assert set(changes.failed) == {"bad"}
        assert "cannot resolve" in changes.failed["bad"]
        assert engine.probers["keep"] is keep  # unchanged: not touched
        assert engine.probers["move"].address == "127.0.0.11"
        await until(
            lambda: _received(engine, "new") >= 5 and _received(engine, "move") >= 5,
            timeout_s=LIMIT_S,
        )
        changes = await engine.replace_targets([_udp("keep", r0, interval_ns=5 * MS)])
        assert changes.removed == ("move", "new")
        assert set(engine.targets) == {"keep"}
        with pytest.raises(TargetError, match="used twice"):
            await engine.replace_targets([_udp("keep", r0), _udp("keep", r1)])
        assert set(engine.targets) == {"keep"}
    finally:
        await engine.aclose()


async def test_windows_since_and_over_a_recent_span(reflectors):
    engine = ProbeEngine(
        [_udp("a", reflectors[0], interval_ns=2 * MS), _udp("b", reflectors[1], interval_ns=2 * MS)]
    )
    await engine.start()
    try:
        await until(lambda: min(_received(engine, n) for n in "ab") >= 60, timeout_s=LIMIT_S)
    finally:
        await engine.aclose()
    full = engine.windows()
    t = full["a"].snapshot.t_ns
    mid = int(t[len(t) // 2])
    now = int(max(w.snapshot.t_ns[-1] for w in full.values()))
    since = engine.windows(now, since_ns={"a": mid})
    assert since["a"].snapshot.t_ns.tolist() == [x for x in t.tolist() if x >= mid]
    assert since["a"].stats.sent == np.count_nonzero(t >= mid)
    assert len(since["b"].snapshot) == len(full["b"].snapshot)  # not named: no bound
    recent = engine.stats(now, window_ns=20 * MS)
    for name, w in full.items():
        expected = np.count_nonzero(w.snapshot.t_ns >= now - 20 * MS)
        assert recent[name].sent == expected, name
    empty = engine.stats(now, since_ns={"a": now + 1})["a"]
    assert (empty.sent, empty.received, empty.rtt_p50_ns, empty.loss_ratio) == (0, 0, None, None)
    with pytest.raises(ValueError, match="positive"):
        engine.stats(window_ns=0)
    # The queue trace: each received probe of the span, sent at its completion less its
    # RTT, its RTT over the base RTT (loopback: next to nothing, never negative).
    trace = engine.queue_trace(now, window_ns=20 * MS)
    for name, w in full.items():
        snap, base = w.snapshot, w.stats.base_rtt_ns
        assert base is not None
        keep = (snap.t_ns >= now - 20 * MS) & ~np.isnan(snap.rtt_ns)
        assert [t for t, _ in trace[name]] == (
            snap.t_ns[keep] - snap.rtt_ns[keep].astype(np.int64)
        ).tolist()
        assert all(q >= 0.0 for _, q in trace[name])
        assert [q for _, q in trace[name]] == pytest.approx(
            np.maximum(0.0, (snap.rtt_ns[keep] - base) / 1e6).tolist()
        )


async def test_the_rate_cap_stretches_every_target_and_gives_back(reflectors):
    targets = [_udp(f"ep{i}", reflectors[i % 2], interval_ns=10 * MS) for i in range(8)]
    registry = CollectorRegistry()
    engine = ProbeEngine(targets, max_total_rate_pps=500.0)  # asked: 800 pps
    registry.register(engine.collector())
    await engine.start()
    try:
        rate = engine.rate()
        assert rate.demand_pps == pytest.approx(800)
        assert rate.planned_pps <= 500
        assert rate.stretch >= 1.6
        assert len(set(engine.intervals().values())) == 1
        stretched = engine.intervals()["ep0"]
        assert stretched >= 16 * MS
        assert registry.get_sample_value(
            "detnet_probe_interval_seconds", {"target": "ep3", "protocol": "udp"}
        ) == pytest.approx(stretched / 1e9)
        await engine.add_target(_udp("ep8", reflectors[0], interval_ns=10 * MS))
        assert engine.intervals()["ep0"] > stretched  # everyone moved, the new one too
        assert engine.rate().planned_pps <= 500
        for i in range(5):
            await engine.remove_target(f"ep{i}")
        assert engine.rate().stretch == 1.0  # 400 pps: under the cap with a step to spare
        assert set(engine.intervals().values()) == {10 * MS}
        await until(
            lambda: all(_received(engine, f"ep{i}") >= 5 for i in range(5, 9)), timeout_s=LIMIT_S
        )
    finally:
        await engine.aclose()
    assert STRETCH_STEP > 1


async def test_scrapes_racing_additions_and_removals_see_whole_targets(reflectors):
    registry = CollectorRegistry()
    engine = ProbeEngine(
        [_udp("steady", reflectors[0], interval_ns=5 * MS)], allow_empty=True, window_ns=10**10
    )
    registry.register(engine.collector())
    await engine.start()
    stop = threading.Event()
    errors: list[BaseException] = []
    scrapes: list[str] = []

    def scrape() -> None:
        while not stop.wait(0.002):  # leave the loop some of the GIL
            try:
                scrapes.append(generate_latest(registry).decode())
            except BaseException as exc:  # the test reports any of them
                errors.append(exc)
                return

    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for round_ in range(25):
            names = [f"ep{round_}-{i}" for i in range(5)]
            for i, name in enumerate(names):
                await engine.add_target(_udp(name, reflectors[i % 2], interval_ns=5 * MS))
            await asyncio.sleep(0.005)
            for name in names:
                await engine.remove_target(name)
        await until(lambda: len(scrapes) >= 20, timeout_s=LIMIT_S)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        await engine.aclose()
    assert errors == []
    per_target_families = {f"{m}_total" for m, _ in COUNTERS.values()} | {
        "detnet_probe_interval_seconds",
        "detnet_probe_timestamp_source_info",
        "detnet_probe_rtt_seconds_count",
        "detnet_probe_rtt_window_seconds_count",
    }
    churned = 0
    for text in scrapes:
        seen: dict[str, set[str]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in per_target_families:
                    seen.setdefault(s.labels["target"], set()).add(s.name)
        assert "steady" in seen
        for target, families in seen.items():
            assert families == per_target_families, target  # whole, never half
        churned += len(seen) > 1
    assert churned > 0  # some scrapes did meet the churn
