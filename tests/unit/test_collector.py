"""The Prometheus collector: label sets and series counts on a fake engine (real recorders
fed by hand). On a live loopback engine, over HTTP and through promtool:
tests/integration/test_collector_live.py."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from detnet.engine.collector import EngineCollector, target_labels
from detnet.engine.core import ProbeRate, Reading, Window
from detnet.engine.errors import TargetError
from detnet.engine.recorder import ProbeRecorder, Reply
from detnet.engine.ring import LATENESS_EDGES_S, CumulativeHistogram
from detnet.engine.stats import window_stats
from detnet.engine.targets import Endpoint, Target

# Series of one fully measured target, as docs/metrics.md counts them: the RTT histogram
# (24 buckets, +Inf, _count, _sum), the window summary (5 quantiles, _count, _sum),
# jitter (2 methods), IPDV (2 directions x 2 quantiles, _count, _sum), queue delay, base
# RTT, loss ratio, interval, 8 counters, the timestamp source.
SERIES_PER_TARGET = 27 + 7 + 2 + 8 + 4 + 9 + 1

MS = 1_000_000
REALTIME = 1_764_000_000 * 10**9


def _reading(target: Target, *, replies: int = 20, lost: int = 2, now: int = 5 * 10**9) -> Reading:
    """A target's reading from a real recorder: ``replies`` answered probes with reflector
    stamps and varying RTTs, then ``lost`` unanswered ones, swept at ``now``."""
    rec = ProbeRecorder(
        name=target.name, timeout_ns=target.timeout_ns, capacity=256, tracker_capacity=64
    )
    for seq in range(replies + lost):
        t = seq * MS
        tx = REALTIME + t
        rec.on_sent(
            now_ns=t,
            offset_ns=REALTIME,
            user_tx_ns=np.array([tx], np.int64),
            kernel_tx_ns=np.array([tx + 1_000], np.int64),
        )
        if seq < replies:
            rtt = 20_000 + 700 * (seq % 5)
            rec.record_reply(
                Reply(seq, tx + rtt + 3_000, tx + rtt, tx + rtt // 2, tx + rtt // 2 + 500),
                now_ns=t + rtt,
                offset_now_ns=REALTIME,
            )
    rec.sweep(now)
    snap = rec.ring.snapshot()
    stats = window_stats(
        snap, target=target.name, protocol=target.protocol, base_rtt_ns=rec.base_rtt()
    )
    return Reading(
        target=target,
        window=Window(snap, stats),
        totals=rec.totals(),
        histogram=rec.histogram.snapshot(),
        timestamp_source=rec.timestamp_source,
        interval_ns=target.interval_ns * 2,
    )


class FakeEngine:
    """What the collector reads of an engine, from hand-fed recorders."""

    backend = "python"
    clock_read_ns = 30.0

    def __init__(
        self,
        targets: list[Target],
        rate: ProbeRate | None = None,
        stream_dropped: int | None = None,
    ) -> None:
        self.stream_dropped = stream_dropped
        self.lateness = CumulativeHistogram(LATENESS_EDGES_S)
        self.lateness.add_one(2_000)
        self._readings = {t.name: _reading(t) for t in targets}
        self._rate = rate or ProbeRate(cap_pps=None, demand_pps=1.0, planned_pps=1.0, stretch=1)

    def readings(self) -> dict[str, Reading]:
        return self._readings

    def rate(self) -> ProbeRate:
        return self._rate


def _target(name: str, endpoint: Endpoint | None = None) -> Target:
    return Target(
        name=name, protocol="udp", host="127.0.0.1", port=7, interval_ns=10 * MS, endpoint=endpoint
    )


def _series(collector: EngineCollector) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, dict(s.labels)) for m in collector.collect() for s in m.samples]


ENDPOINTS = [
    _target("robot.pod-a", Endpoint("robot", node="node-1", pod="robot-7c9-a")),
    _target("robot.pod-b", Endpoint("robot", node="node-2", pod="robot-7c9-b")),
    _target("scanner", Endpoint("scanner")),  # its Service address: an app, no replica
    _target("plain"),  # `detnet probe` style: no endpoint at all
]


def test_every_probe_series_carries_what_its_target_stands_for():
    series = _series(EngineCollector(FakeEngine(ENDPOINTS)))
    keys_by_target: dict[str, set[frozenset[str]]] = {}
    for name, labels in series:
        if name.startswith("detnet_engine_"):
            assert "target" not in labels, name
            continue
        base = {k for k in labels if k not in ("le", "quantile", "method", "direction", "source")}
        keys_by_target.setdefault(labels["target"], set()).add(frozenset(base))
    assert keys_by_target == {
        "robot.pod-a": {frozenset({"target", "protocol", "app", "pod", "node"})},
        "robot.pod-b": {frozenset({"target", "protocol", "app", "pod", "node"})},
        "scanner": {frozenset({"target", "protocol", "app"})},
        "plain": {frozenset({"target", "protocol"})},  # exactly the series of before
    }
    sent = {
        labels["target"]: labels for name, labels in series if name == "detnet_probes_sent_total"
    }
    assert sent["robot.pod-b"] == {
        "target": "robot.pod-b",
        "protocol": "udp",
        "app": "robot",
        "pod": "robot-7c9-b",
        "node": "node-2",
    }
    assert sent["plain"] == {"target": "plain", "protocol": "udp"}


def test_the_series_count_per_target_is_the_documented_one():
    series = _series(EngineCollector(FakeEngine(ENDPOINTS)))
    per_target: dict[str, int] = {}
    for _, labels in series:
        if "target" in labels:
            per_target[labels["target"]] = per_target.get(labels["target"], 0) + 1
    assert per_target == {t.name: SERIES_PER_TARGET for t in ENDPOINTS}
    # The engine's own series do not grow with the targets.
    assert len(series) - sum(per_target.values()) == len(_series(EngineCollector(FakeEngine([]))))


def test_values_come_from_the_readings():
    engine = FakeEngine(ENDPOINTS[:1])
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    r = engine.readings()["robot.pod-a"]
    lv = target_labels(r.target)
    assert registry.get_sample_value("detnet_probes_sent_total", lv) == 22
    assert registry.get_sample_value("detnet_probes_lost_total", lv) == 2
    assert registry.get_sample_value("detnet_probe_loss_ratio", lv) == 2 / 22
    assert registry.get_sample_value("detnet_probe_rtt_seconds_count", lv) == 20
    assert registry.get_sample_value("detnet_probe_interval_seconds", lv) == 0.02
    p99 = r.window.stats.rtt_p99_ns
    assert p99 is not None
    assert registry.get_sample_value(
        "detnet_probe_rtt_window_seconds", {**lv, "quantile": "0.99"}
    ) == pytest.approx(p99 * 1e-9)


def test_rate_gauges_show_the_cap_at_work():
    capped = ProbeRate(cap_pps=500.0, demand_pps=1000.0, planned_pps=480.0, stretch=2.0)
    registry = CollectorRegistry()
    registry.register(EngineCollector(FakeEngine([], capped)))
    rate = "detnet_engine_probe_rate_per_second"
    assert registry.get_sample_value(rate, {"kind": "cap"}) == 500
    assert registry.get_sample_value(rate, {"kind": "demand"}) == 1000
    assert registry.get_sample_value(rate, {"kind": "planned"}) == 480
    assert registry.get_sample_value("detnet_engine_interval_stretch_ratio") == 2
    uncapped = CollectorRegistry()
    uncapped.register(EngineCollector(FakeEngine([])))
    assert uncapped.get_sample_value(rate, {"kind": "cap"}) is None


def test_the_exposition_parses_with_mixed_label_sets():
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest_of(EngineCollector(FakeEngine(ENDPOINTS))).decode()
    names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert "detnet_probe_rtt_seconds_bucket" in names
    assert 'node="node-1"' in text


def generate_latest_of(collector: EngineCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"app": ""}, "app"),
        ({"app": "a", "node": ""}, "node"),
        ({"app": "a", "pod": "x\n"}, "pod"),
        ({"app": "a", "pod": "p" * 254}, "pod"),
    ],
)
def test_an_endpoint_with_a_bad_name_is_a_target_error(kwargs, field):
    with pytest.raises(TargetError, match=f"endpoint {field}") as info:
        Endpoint(**kwargs)
    assert getattr(info.value, "field", None) == field
