"""The SLO type the controller and the lab's report share."""

from __future__ import annotations

import pytest

from detnet.engine.slo import Slo

SLO = Slo(app="robot", max_jitter_ms=1.0, max_queue_delay_ms=2.0, max_loss_ratio=0.01)


def test_thresholds_are_the_configured_signals_only() -> None:
    assert SLO.thresholds() == {"jitter": 1.0, "queue_delay": 2.0, "loss": 0.01}
    assert Slo(app="none").thresholds() == {}


@pytest.mark.parametrize(
    ("values", "holds"),
    [
        ({"jitter": 1.0, "queue_delay": 2.0, "loss": 0.01}, True),  # at the threshold holds
        ({"jitter": 0.2, "queue_delay": 0.1, "loss": 0.0, "latency": 500.0}, True),  # unjudged
        ({"jitter": 1.01, "queue_delay": 0.1, "loss": 0.0}, False),
        ({"jitter": 0.2, "queue_delay": 0.1, "loss": 0.02}, False),
        ({"jitter": 0.2, "queue_delay": None, "loss": 0.0}, False),  # no data is no credit
        ({"jitter": 0.2, "loss": 0.0}, False),
        ({"jitter": float("nan"), "queue_delay": 0.1, "loss": 0.0}, False),
    ],
)
def test_holds_when_every_configured_signal_is_at_or_below(
    values: dict[str, float | None], holds: bool
) -> None:
    assert SLO.holds(values) is holds  # type: ignore[arg-type]


def test_an_slo_without_thresholds_always_holds() -> None:
    assert Slo(app="none").holds({})
