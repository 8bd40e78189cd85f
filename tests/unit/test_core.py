"""ProbeEngine's pure parts: ring sizing, and what an engine refuses before it starts."""

from __future__ import annotations

import pytest

from detnet.engine.core import DEFAULT_CAPACITY, MIN_CAPACITY, ProbeEngine, ring_capacity
from detnet.engine.errors import EngineError, TargetError
from detnet.engine.targets import Target

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run

MS = 1_000_000


def _t(interval_ns: int, batch: int = 1) -> Target:
    return Target(
        name="t", protocol="udp", host="127.0.0.1", port=7, interval_ns=interval_ns, batch=batch
    )


@pytest.mark.parametrize(
    ("interval_ns", "batch", "window_ns", "samples", "slots"),
    [
        (100 * MS, 1, 5_000 * MS, None, MIN_CAPACITY),  # 50 records: the floor
        (MS, 1, 10_000 * MS, None, 16_384),  # 10,000 records + a quarter + 64
        (MS, 4, 1_000 * MS, None, 8_192),  # batches count: 4,000 records
        (MS, 1, 10_000 * MS, 3_000, 4_096),  # both bounds: the smaller one
        (MS, 1, None, 2_000, 4_096),
        (100_000, 8, 60_000 * MS, None, DEFAULT_CAPACITY),  # capped
        (MS, 1, None, None, DEFAULT_CAPACITY),  # an unbounded window keeps the whole ring
    ],
)
def test_rings_are_sized_for_the_window(interval_ns, batch, window_ns, samples, slots):
    t = _t(interval_ns, batch)
    assert ring_capacity(t, window_ns=window_ns, window_samples=samples) == slots


def test_what_an_engine_refuses():
    with pytest.raises(TargetError, match="no targets"):
        ProbeEngine([])
    with pytest.raises(TargetError, match="used twice"):
        ProbeEngine([_t(MS), _t(MS)])
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(EngineError, match="rate cap"):
            ProbeEngine([], allow_empty=True, max_total_rate_pps=bad)
    engine = ProbeEngine([], allow_empty=True)
    assert engine.targets == {}
    assert engine.stats() == {}


async def test_before_start_targets_only_join_the_list():
    engine = ProbeEngine([_t(MS)], max_total_rate_pps=500.0)
    await engine.add_target(Target(name="u", protocol="udp", host="127.0.0.1", port=7))
    assert set(engine.targets) == {"t", "u"}
    rate = engine.rate()
    assert rate.demand_pps == pytest.approx(1_100)
    assert rate.planned_pps <= 500
    with pytest.raises(TargetError, match="used twice"):
        await engine.add_target(_t(MS))
    await engine.remove_target("t")
    changes = await engine.replace_targets([_t(2 * MS)])
    assert (changes.added, changes.removed) == (("t",), ("u",))
    assert set(engine.targets) == {"t"}
    await engine.aclose()
    with pytest.raises(TargetError, match="closed"):
        await engine.add_target(_t(MS))
