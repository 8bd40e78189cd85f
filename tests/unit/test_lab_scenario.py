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
from detnet.lab.topology import Topology, root_tbf, tbf_args, tbf_command


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


SHOWN = (  # tc -j qdisc show, verbatim
    '[{"kind":"tbf","handle":"1:","root":true,"refcnt":3,'
    '"options":{"rate":33625000,"burst":33591,"lat":20001}}]'
)


def test_root_tbf_reads_tc_json() -> None:
    assert root_tbf(SHOWN) == ("1:", 33_591)
    noqueue = '[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}}]'
    assert root_tbf(noqueue) is None


@pytest.mark.parametrize(
    "shown",
    [
        "",
        "not json",
        "{}",
        "[1]",
        '[{"kind":"tbf","root":true}]',
        '[{"kind":"tbf","handle":"1:","root":true,"options":{"burst":"lots"}}]',
        '[{"kind":"tbf","handle":"1:","root":true,"options":null}]',
        "[" * 10_000,
    ],
)
def test_root_tbf_unreadable_is_none(shown: str) -> None:
    # then the command replaces whatever is there with a fresh tbf: the safe way
    assert root_tbf(shown) is None


@pytest.mark.parametrize(
    ("mbps", "present", "verb", "handle"),
    [
        (50, None, "replace", "1:"),  # nothing of ours: a fresh tbf at 1:
        (400, ("1:", 33_591), "change", "1:"),  # a bigger bucket: in place
        (269, ("1:", 43_206), "replace", "2:"),  # a smaller one: fresh, other handle
        (269, ("2:", 43_206), "replace", "1:"),
        (99, ("1:", 15_137), "change", "1:"),  # the floor burst at a new rate
    ],
)
def test_tbf_command_changes_in_place_only_when_the_bucket_holds(
    mbps: float, present: tuple[str, int] | None, verb: str, handle: str
) -> None:
    argv = tbf_command("ns", "eth0", rate_mbps=mbps, buffer_ms=20, present=present)
    assert argv[:10] == ["tc", "-n", "ns", "qdisc", verb, "dev", "eth0", "root", "handle", handle]
    burst = int(argv[argv.index("burst") + 1])
    assert burst >= (present[1] if verb == "change" and present else 0)


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
