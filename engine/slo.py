"""A critical app's SLO: the thresholds its probes' statistics are judged against.

Both judges use this one type: the controller's policy (``controller/signals.py``: every
window of every target, violated or stable) and the lab's report (``lab/report.py``:
was an app within its SLO in a one-second window). It lives in the engine because the
lab must not import ``detnet.controller``. Thresholds are in milliseconds for the time
signals and a ratio for loss; None means the signal is not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

# jitter: IQR of RTT; latency: p99 RTT; queue_delay: a high RTT quantile minus the base
# RTT; loss: lost / due probes.
Signal = Literal["jitter", "latency", "queue_delay", "loss"]


@dataclass(frozen=True, kw_only=True)
class Slo:
    """One critical app's thresholds; None means the signal is not evaluated."""

    app: str
    max_jitter_ms: float | None = None
    max_latency_ms: float | None = None
    max_queue_delay_ms: float | None = None
    max_loss_ratio: float | None = None

    def thresholds(self) -> dict[Signal, float]:
        """The configured thresholds by signal (ms for time signals, a ratio for loss)."""
        raw: dict[Signal, float | None] = {
            "jitter": self.max_jitter_ms,
            "latency": self.max_latency_ms,
            "queue_delay": self.max_queue_delay_ms,
            "loss": self.max_loss_ratio,
        }
        return {signal: value for signal, value in raw.items() if value is not None}

    def holds(self, values: Mapping[Signal, float | None]) -> bool:
        """True when every configured signal has a value at or below its threshold; a
        signal without a value (None or absent) does not hold."""
        for signal, threshold in self.thresholds().items():
            value = values.get(signal)
            if value is None or not value <= threshold:
                return False
        return True
