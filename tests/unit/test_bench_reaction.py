"""``detnet bench reaction``'s lab table from a report (the runs themselves need root)."""

from __future__ import annotations

from typing import Any

from detnet.bench.reaction import render_lab


def test_the_lab_table_shows_protection_enforcement_and_each_step() -> None:
    report: dict[str, Any] = {
        "runs": 2,
        "time_to_protect_s": [0.5, None],
        "tc_enforce_ms": {"n": 7, "p50": 1.25, "p99": 3.5, "max": 4.0},
        "steps": {
            "load": {"broke": False, "recovery_s": 0.0, "slo_attainment": 1.0},
            "knee": {"broke": True, "recovery_s": 2.0, "slo_attainment": 0.8},
        },
    }
    text = render_lab(report)
    assert "0.5, never" in text
    assert "1.25 / 3.50 / 4.00" in text
    assert "SLO held, 100%" in text
    assert "2.0 s, 80%" in text
    report["steps"]["knee"]["recovery_s"] = None
    assert "never, 80%" in render_lab(report)
