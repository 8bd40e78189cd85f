"""Lab settings, the generated controller config, and parsing what the runs record."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from detnet.engine.recorder import Sample
from detnet.engine.stream import sample_json
from detnet.lab.errors import LabError
from detnet.lab.scenario import LabSettings, _Recorder, controller_config
from detnet.lab.topology import Topology, tbf_args


def test_settings_validate() -> None:
    with pytest.raises(LabError, match="bottleneck mbps must be positive"):
        LabSettings(bottleneck_mbps=0)
    with pytest.raises(LabError, match="at least 2 s"):
        LabSettings(congestion_s=1.0)
    s = LabSettings()
    assert s.timeline.total_s == pytest.approx(30.0)
    assert [slo.app for slo in s.slos()] == ["robot-control", "safety-scanner"]
    assert 0 < s.critical_mbps < 1


def test_controller_config_names_the_pods_namespaces() -> None:
    topo = Topology()  # not entered: names only, nothing is created
    cfg = controller_config(LabSettings(), topo)
    text = yaml.safe_dump(cfg)
    assert "198.18.0.10" in text
    assert "198.18.0.11" in text
    targets = {t["name"]: t["tc"] for t in cfg["best_effort_targets"]}
    assert targets["erp-dashboard"] == {"device": "eth0", "netns": topo.ns("erp-dashboard")}
    assert cfg["critical_apps"][0]["max_jitter_ms"] == 1.0
    # The lab runs the product's policy and cadence: nothing of them in its config.
    assert "policy" not in cfg
    assert set(cfg["control"]) == {"probe_interval"}


def test_controller_config_loads_with_the_controllers_loader(tmp_path: Path) -> None:
    config = pytest.importorskip("detnet.controller.config")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(controller_config(LabSettings(), Topology())))
    loaded = config.load_config(path) if hasattr(config, "load_config") else config.load(path)
    assert [a.name for a in loaded.critical_apps] == ["robot-control", "safety-scanner"]
    assert all(t.tc is not None for t in loaded.best_effort_targets)
    # The controller judges the lab's apps by the very SLOs the lab's report uses.
    assert loaded.slos() == LabSettings().slos()


def test_tbf_args() -> None:
    assert tbf_args(rate_mbps=100, buffer_ms=30) == [
        "tbf",
        "rate",
        "100mbit",
        "burst",
        "15140",
        "latency",
        "30ms",
    ]


def test_recorder_parses_stream_sink_and_decisions(tmp_path: Path) -> None:
    stream = tmp_path / "s.jsonl"
    rec = _Recorder(stream, {"198.18.0.20": "telemetry-upload"})
    now = time.time()
    rec.t0 = now - 10
    sent = int(now * 1e9)  # the engine stamps sends with CLOCK_REALTIME
    # Records as `detnet probe --stream` writes them: the engine's own Sample, through
    # the stream's own encoder (a received probe has rtt_ns, a lost one has none).
    samples = [
        Sample("robot-control", 1, sent, 250_000, 260_000, 100_000, 150_000, False, "kernel"),
        Sample("robot-control", 2, sent, None, None, None, None, True, "user"),
    ]
    text = "".join(sample_json(x) + "\n" for x in samples)
    third = sample_json(Sample("robot-control", 3, sent, 1_000_000, 1_000_000, 1, 1, False, "user"))
    stream.write_text(text + third[:20])  # a partial line waits
    assert rec.read_stream() == 2
    with stream.open("a") as f:
        f.write(third[20:] + "\nnot json\n")
    assert rec.read_stream() == 1
    robot = rec.probes["robot-control"]
    assert robot[0][0] == pytest.approx(10.0, abs=0.5)
    assert robot[0][1] == pytest.approx(0.25)
    assert math.isnan(robot[1][1])
    assert robot[2][1] == pytest.approx(1.0)

    rec.sink_line(json.dumps({"ts": now, "bytes": {"198.18.0.20": 1_250_000, "x": 5}}).encode())
    rec.sink_line(b"garbage")
    rec.control_line(
        json.dumps(
            {"ts": now, "event": "decision", "action": "decrease", "limits": {"a": 40, "b": 40}}
        ).encode()
    )
    rec.control_line(b'{"event": "started"}')
    data = rec.run_data()
    assert [x for pair in data.goodput for x in pair] == pytest.approx([10.0, 10.0])
    assert data.decisions[0]["t_s"] == pytest.approx(10.0)
    assert [x for pair in data.limits for x in pair] == pytest.approx([10.0, 80.0])
