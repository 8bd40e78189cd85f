"""The cluster lab's settings (lab/cluster/scenario.py): what a run can be told, refused
with a LabError naming what is wrong, and where a step falls."""

from __future__ import annotations

import pytest

from detnet.lab.cluster.scenario import ClusterSettings
from detnet.lab.errors import LabError


def test_a_step_falls_halfway_through_the_congestion() -> None:
    s = ClusterSettings(quiet_s=4.0, congestion_s=60.0, step="knee")
    assert s.step_at_s == pytest.approx(34.0)
    assert s.stepped_mbps == pytest.approx(60.0)  # 60 % of the 100 Mbit/s uplink
    assert ClusterSettings().step_at_s is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": "sideways"}, "step must be one of none, load, knee"),
        ({"step": "knee", "knee_step_fraction": 1.0}, "fraction of the uplink"),
        ({"step": "knee", "knee_step_fraction": 0.0}, "fraction of the uplink"),
        # node-b's paced senders would congest their own uplink after the step
        ({"step": "knee", "knee_step_fraction": 0.25}, "after the knee step"),
        ({"congestion_s": 1.0}, "at least 2 s"),
        ({"uplink_mbps": 0.0}, "uplink mbps must be positive"),
        ({"runs": ("cluster_scope", "sideways")}, "runs must be among"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(LabError, match=message):
        ClusterSettings(**kwargs)  # type: ignore[arg-type]
