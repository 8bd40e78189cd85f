"""The engine's Prometheus collector: metric families built at scrape time.

Nothing is set in a loop: ``collect()`` (on the HTTP server's thread) takes one
``readings()`` of the engine (ring copies, histogram copies, counters, all from one set of
running targets) and builds fresh families, so there are no races between scrapes, no
stale label sets, and a target added or removed meanwhile is exported whole or not at
all. Names and labels are those of docs/metrics.md ("Engine", "Engine health").

Every probe series carries ``target`` and ``protocol``, and the ``app``, ``pod`` and
``node`` of what the target stands for where they are known (``Target.endpoint``); an
unknown one is left out, which Prometheus reads as empty (``{node=""}`` selects them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from detnet.engine.ring import FLAG_RECEIVED, CumulativeHistogram, HistogramSnapshot
from detnet.engine.stats import ipdv as ipdv_values

if TYPE_CHECKING:
    from detnet.engine.core import ProbeRate, Reading
    from detnet.engine.targets import Target

_NS = 1e-9

# ProbeTotals field -> (metric name without _total, help).
COUNTERS: dict[str, tuple[str, str]] = {
    "sent": ("detnet_probes_sent", "Probes sent."),
    "received": ("detnet_probes_received", "Replies received in time."),
    "lost": ("detnet_probes_lost", "Probes with no reply by their timeout."),
    "late": ("detnet_probes_late", "Replies that came after their timeout."),
    "duplicates": ("detnet_probes_duplicate", "Duplicate replies."),
    "reordered": ("detnet_probes_reordered", "Replies that came out of order."),
    "skipped": ("detnet_probes_skipped", "Send slots skipped (the loop woke late)."),
    "dropped": (
        "detnet_probes_clock_step_dropped",
        "Replies dropped because the clock stepped during the probe.",
    ),
    "foreign": (
        "detnet_probes_foreign_replies",
        "Datagrams or frames that were neither our replies nor an echo of our probes.",
    ),
}


class ReadableEngine(Protocol):
    """What the collector reads of an engine (``ProbeEngine``)."""

    backend: str
    clock_read_ns: float
    lateness: CumulativeHistogram

    @property
    def stream_dropped(self) -> int | None: ...  # None: no --stream

    def readings(self) -> Mapping[str, Reading]: ...

    def rate(self) -> ProbeRate: ...


def target_labels(target: Target) -> dict[str, str]:
    """The labels of a target's probe series: target, protocol, and app/pod/node where
    known."""
    labels = {"target": target.name, "protocol": target.protocol}
    ep = target.endpoint
    if ep is not None:
        for key, value in (("app", ep.app), ("pod", ep.pod), ("node", ep.node)):
            if value is not None:
                labels[key] = value
    return labels


def _histogram(m: Metric, labels: dict[str, str], h: HistogramSnapshot) -> None:
    for edge, count in zip(h.edges_s, h.cumulative, strict=False):
        m.add_sample(m.name + "_bucket", {**labels, "le": repr(float(edge))}, float(count))
    m.add_sample(m.name + "_bucket", {**labels, "le": "+Inf"}, float(h.cumulative[-1]))
    m.add_sample(m.name + "_count", labels, float(h.cumulative[-1]))
    m.add_sample(m.name + "_sum", labels, h.sum_s)


class EngineCollector(Collector):
    """Reads a ProbeEngine at scrape time: ``registry.register(engine.collector())``."""

    def __init__(self, engine: ReadableEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterator[Metric]:
        # Returning nothing keeps register() from calling collect() before the engine runs.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        readings = engine.readings()
        labels = {name: target_labels(r.target) for name, r in readings.items()}

        rtt = Metric(
            "detnet_probe_rtt_seconds", "Network RTT of every received probe.", "histogram"
        )
        for name, r in readings.items():
            _histogram(rtt, labels[name], r.histogram)
        yield rtt

        # Quantiles over a sliding window are what a Prometheus summary is: exported as
        # one (quantile samples plus _count and _sum of the same window).
        window = Metric("detnet_probe_rtt_window_seconds", "RTT over the window.", "summary")
        jitter = Metric(
            "detnet_probe_jitter_seconds",
            "Jitter over the window: iqr (Q3-Q1 of RTT) or rfc3550.",
            "gauge",
        )
        ipdv = Metric(
            "detnet_probe_ipdv_seconds",
            "IPDV (RFC 3393) of |delay variation| per direction over the window.",
            "summary",
        )
        queue = Metric("detnet_probe_queue_delay_seconds", "p90 RTT minus the base RTT.", "gauge")
        base = Metric(
            "detnet_probe_base_rtt_seconds",
            "Base RTT: minimum of per-minute minima over the last 10 minutes.",
            "gauge",
        )
        loss = Metric("detnet_probe_loss_ratio", "Lost / sent over the window.", "gauge")
        interval = Metric(
            "detnet_probe_interval_seconds",
            "Effective probe interval (stretched under the total-rate cap).",
            "gauge",
        )
        for name, r in readings.items():
            lv = labels[name]
            s, snap = r.window.stats, r.window.snapshot
            got = (snap.flags & FLAG_RECEIVED) != 0
            for q, v in (
                ("0", s.rtt_min_ns),
                ("0.5", s.rtt_p50_ns),
                ("0.9", s.rtt_p90_ns),
                ("0.99", s.rtt_p99_ns),
                ("1", s.rtt_max_ns),
            ):
                if v is not None:
                    window.add_sample(window.name, {**lv, "quantile": q}, v * _NS)
            window.add_sample(window.name + "_count", lv, float(s.received))
            window.add_sample(window.name + "_sum", lv, float(np.sum(snap.rtt_ns[got])) * _NS)
            for method, v in (("iqr", s.jitter_iqr_ns), ("rfc3550", s.jitter_rfc3550_ns)):
                if v is not None:
                    jitter.add_sample(jitter.name, {**lv, "method": method}, v * _NS)
            for direction, delays, p50, p99 in (
                ("forward", snap.fwd_ns, s.ipdv_fwd_p50_ns, s.ipdv_fwd_p99_ns),
                ("backward", snap.back_ns, s.ipdv_back_p50_ns, s.ipdv_back_p99_ns),
            ):
                if p50 is None or p99 is None:
                    continue
                dl = {**lv, "direction": direction}
                ipdv.add_sample(ipdv.name, {**dl, "quantile": "0.5"}, p50 * _NS)
                ipdv.add_sample(ipdv.name, {**dl, "quantile": "0.99"}, p99 * _NS)
                values = np.abs(ipdv_values(delays[got], snap.seq[got]))
                ipdv.add_sample(ipdv.name + "_count", dl, float(values.shape[0]))
                ipdv.add_sample(ipdv.name + "_sum", dl, float(np.sum(values)) * _NS)
            for fam, ns in ((queue, s.queue_delay_ns), (base, s.base_rtt_ns)):
                if ns is not None:
                    fam.add_sample(fam.name, lv, ns * _NS)
            if s.loss_ratio is not None:
                loss.add_sample(loss.name, lv, s.loss_ratio)
            interval.add_sample(interval.name, lv, r.interval_ns * _NS)
        yield from (window, jitter, ipdv, queue, base, loss, interval)

        for key, (metric, doc) in COUNTERS.items():
            fam = Metric(metric, doc, "counter")
            for name, r in readings.items():
                fam.add_sample(metric + "_total", labels[name], float(getattr(r.totals, key)))
            yield fam

        src = Metric(
            "detnet_probe_timestamp_source_info", "1 for the timestamp source in use.", "gauge"
        )
        for name, r in readings.items():
            src.add_sample(src.name, {**labels[name], "source": r.timestamp_source}, 1.0)
        yield src

        yield from self._engine_health(engine)

    def _engine_health(self, engine: ReadableEngine) -> Iterator[Metric]:
        late = engine.lateness.snapshot()
        lat = Metric(
            "detnet_engine_send_lateness_seconds",
            "How late each probe left after its deadline.",
            "histogram",
        )
        _histogram(lat, {}, late)
        yield lat
        if engine.stream_dropped is not None:
            yield CounterMetricFamily(
                "detnet_stream_dropped",
                "Probe records --stream dropped because its reader was too slow.",
                value=engine.stream_dropped,
            )
        yield GaugeMetricFamily(
            "detnet_engine_clock_read_seconds",
            "Cost of one clock read.",
            value=engine.clock_read_ns * _NS,
        )
        backend = GaugeMetricFamily(
            "detnet_engine_native_backend_info",
            "1 for the native backend in use.",
            labels=["backend"],
        )
        backend.add_metric([engine.backend], 1.0)
        yield backend
        rate = engine.rate()
        fam = GaugeMetricFamily(
            "detnet_engine_probe_rate_per_second",
            "Probes per second of every target together: asked for (demand), planned "
            "after stretching (planned), and the cap (cap, when set).",
            labels=["kind"],
        )
        fam.add_metric(["demand"], rate.demand_pps)
        fam.add_metric(["planned"], rate.planned_pps)
        if rate.cap_pps is not None:
            fam.add_metric(["cap"], rate.cap_pps)
        yield fam
        yield GaugeMetricFamily(
            "detnet_engine_interval_stretch_ratio",
            "The factor every probe interval is stretched by under the cap (1: none).",
            value=rate.stretch,
        )
