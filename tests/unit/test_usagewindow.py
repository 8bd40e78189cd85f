"""The peak of each workload's usage over a horizon (controller/usagewindow.py PeakMeter),
held to the plain definition: the largest mean seen within the horizon."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from detnet.controller.usagewindow import PeakMeter

S = 1_000_000_000


def test_a_peak_lasts_the_horizon_then_leaves() -> None:
    m: PeakMeter[str] = PeakMeter(10 * S)
    assert m.update(0, {"upload": 40.0, "erp": 58.0}) == {"upload": 40.0, "erp": 58.0}
    assert m.update(5 * S, {"upload": 0.5, "erp": 58.0})["upload"] == 40.0
    assert m.update(10 * S, {"upload": 0.5})["upload"] == 40.0
    assert m.update(11 * S, {"upload": 0.5}) == {"upload": 0.5, "erp": 58.0}
    assert m.update(16 * S, {}) == {"upload": 0.5}  # erp is gone: no state is kept
    assert m.update(40 * S, {}) == {}


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3 * S),  # time to the next reading
            st.dictionaries(st.sampled_from("abc"), st.floats(0, 1000)),
        ),
        max_size=60,
    )
)
def test_the_peak_is_the_largest_mean_within_the_horizon(steps) -> None:
    horizon = 5 * S
    m: PeakMeter[str] = PeakMeter(horizon)
    seen: list[tuple[int, str, float]] = []
    now = 0
    for gap, means in steps:
        now += gap
        seen += [(now, k, v) for k, v in means.items()]
        expected: dict[str, float] = {}
        for t, k, v in seen:
            if now - t <= horizon:
                expected[k] = max(expected.get(k, v), v)
        assert m.update(now, means) == expected
