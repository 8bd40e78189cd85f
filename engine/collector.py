"""The engine's Prometheus collector: metric families built at scrape time.

Nothing is set in a loop: ``collect()`` (on the HTTP server's thread) takes snapshots of
the engine (ring copies, histogram copies, counters) and builds fresh families, so there
are no races between scrapes and no stale label sets. Names and labels are those of
docs/metrics.md ("Engine", "Engine health").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from detnet.engine.ring import FLAG_RECEIVED, HistogramSnapshot
from detnet.engine.stats import ipdv as ipdv_values

if TYPE_CHECKING:
    from detnet.engine.core import ProbeEngine

_NS = 1e-9
_LABELS = ["target", "protocol"]


def _buckets(h: HistogramSnapshot) -> list[tuple[str, float]]:
    out = [(repr(float(e)), float(c)) for e, c in zip(h.edges_s, h.cumulative, strict=False)]
    out.append(("+Inf", float(h.cumulative[-1])))
    return out


class EngineCollector(Collector):
    """Reads a ProbeEngine at scrape time: ``registry.register(engine.collector())``."""

    def __init__(self, engine: ProbeEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterator[Metric]:
        # Returning nothing keeps register() from calling collect() before the engine runs.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        windows = engine.windows()
        stats = {name: w.stats for name, w in windows.items()}
        totals = engine.totals()
        hists = engine.histograms()
        sources = engine.timestamp_sources()
        proto = {name: t.protocol for name, t in engine.targets.items()}

        rtt = HistogramMetricFamily(
            "detnet_probe_rtt_seconds",
            "Network RTT of every received probe.",
            labels=_LABELS,
        )
        for name, h in hists.items():
            rtt.add_metric([name, proto[name]], _buckets(h), h.sum_s)
        yield rtt

        # Quantiles over a sliding window are what a Prometheus summary is: exported as
        # one (quantile samples plus _count and _sum of the same window).
        window = Metric("detnet_probe_rtt_window_seconds", "RTT over the window.", "summary")
        jitter = GaugeMetricFamily(
            "detnet_probe_jitter_seconds",
            "Jitter over the window: iqr (Q3-Q1 of RTT) or rfc3550.",
            labels=[*_LABELS, "method"],
        )
        ipdv = Metric(
            "detnet_probe_ipdv_seconds",
            "IPDV (RFC 3393) of |delay variation| per direction over the window.",
            "summary",
        )
        queue = GaugeMetricFamily(
            "detnet_probe_queue_delay_seconds",
            "p90 RTT minus the base RTT.",
            labels=_LABELS,
        )
        base = GaugeMetricFamily(
            "detnet_probe_base_rtt_seconds",
            "Base RTT: minimum of per-minute minima over the last 10 minutes.",
            labels=_LABELS,
        )
        loss = GaugeMetricFamily(
            "detnet_probe_loss_ratio", "Lost / sent over the window.", labels=_LABELS
        )
        for name, s in stats.items():
            lv = [name, s.protocol]
            labels = {"target": name, "protocol": s.protocol}
            snap = windows[name].snapshot
            got = (snap.flags & FLAG_RECEIVED) != 0
            for q, v in (
                ("0", s.rtt_min_ns),
                ("0.5", s.rtt_p50_ns),
                ("0.9", s.rtt_p90_ns),
                ("0.99", s.rtt_p99_ns),
                ("1", s.rtt_max_ns),
            ):
                if v is not None:
                    window.add_sample(window.name, {**labels, "quantile": q}, v * _NS)
            window.add_sample(window.name + "_count", labels, float(s.received))
            window.add_sample(window.name + "_sum", labels, float(np.sum(snap.rtt_ns[got])) * _NS)
            for method, v in (("iqr", s.jitter_iqr_ns), ("rfc3550", s.jitter_rfc3550_ns)):
                if v is not None:
                    jitter.add_metric([*lv, method], v * _NS)
            for direction, delays, p50, p99 in (
                ("forward", snap.fwd_ns, s.ipdv_fwd_p50_ns, s.ipdv_fwd_p99_ns),
                ("backward", snap.back_ns, s.ipdv_back_p50_ns, s.ipdv_back_p99_ns),
            ):
                if p50 is None or p99 is None:
                    continue
                dl = {**labels, "direction": direction}
                ipdv.add_sample(ipdv.name, {**dl, "quantile": "0.5"}, p50 * _NS)
                ipdv.add_sample(ipdv.name, {**dl, "quantile": "0.99"}, p99 * _NS)
                values = np.abs(ipdv_values(delays[got], snap.seq[got]))
                ipdv.add_sample(ipdv.name + "_count", dl, float(values.shape[0]))
                ipdv.add_sample(ipdv.name + "_sum", dl, float(np.sum(values)) * _NS)
            if s.queue_delay_ns is not None:
                queue.add_metric(lv, s.queue_delay_ns * _NS)
            if s.base_rtt_ns is not None:
                base.add_metric(lv, s.base_rtt_ns * _NS)
            if s.loss_ratio is not None:
                loss.add_metric(lv, s.loss_ratio)
        yield from (window, jitter, ipdv, queue, base, loss)

        counters = {
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
        }
        for field, (metric, doc) in counters.items():
            fam = CounterMetricFamily(metric, doc, labels=_LABELS)
            for name, t in totals.items():
                fam.add_metric([name, proto[name]], float(getattr(t, field)))
            yield fam

        src = GaugeMetricFamily(
            "detnet_probe_timestamp_source_info",
            "1 for the timestamp source in use.",
            labels=[*_LABELS, "source"],
        )
        for name, source in sources.items():
            src.add_metric([name, proto[name], source], 1.0)
        yield src

        late = engine.lateness.snapshot()
        lat = HistogramMetricFamily(
            "detnet_engine_send_lateness_seconds",
            "How late each probe left after its deadline.",
        )
        lat.add_metric([], _buckets(late), late.sum_s)
        yield lat
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
