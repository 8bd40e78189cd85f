"""The lab scenario: quiet, congestion, recovery; once without the controller, once with it.

Both runs share the topology and the timeline. The critical apps' endpoints (``detnet
reflect``) and the sink run throughout; each run starts its measuring process in the
probe namespace (``detnet probe`` without the controller, ``detnet control --enforcer tc``
with it; both stream every probe as a JSON line), waits until every app answers, then:
quiet for ``quiet_s``, best-effort senders for ``congestion_s`` (launched ahead and told
the start time, so traffic begins on the second), and ``recovery_s`` after they stop.

Nothing here imports the controller: it runs the ``detnet`` CLI as subprocesses, with a
config file generated in the controller's own form (docs/config.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from detnet.engine.slo import Slo
from detnet.lab.errors import LabError
from detnet.lab.report import RunData, Timeline, build_report, summarise_run
from detnet.lab.topology import BEST_EFFORT, POD_DEVICE, Topology

UDP_PORT = 7000
TCP_PORT = 7001
SINK_PORT = 5001
METRICS_PORT = 9108
_DETNET = [sys.executable, "-m", "detnet.controller"]
_TRAFFIC = [sys.executable, "-m", "detnet.lab.traffic"]
_PROBE_BYTES = 64 + 8 + 20 + 14  # payload + UDP + IPv4 + Ethernet, for the critical load
STEPS = ("none", "load", "knee")


def check_step(step: str, fraction: float, *, of: str) -> None:
    """LabError unless ``step`` is a known one and a knee step's ``fraction`` of the
    rate (of ``of``) is in (0, 1)."""
    if step not in STEPS:
        raise LabError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    if not 0 < fraction < 1:
        raise LabError(f"the knee step's fraction of the {of} must be in (0, 1)")


def step_time(step: str, timeline: Timeline) -> float | None:
    """When a step happens (run time): halfway through the congestion; None without one."""
    if step == "none":
        return None
    start, end = timeline.bounds("congestion")
    return start + (end - start) / 2


@dataclass(frozen=True, kw_only=True)
class LabSettings:
    """Everything a lab run can be told; defaults make a ~1 minute run that meets the SLOs."""

    quiet_s: float = 5.0
    congestion_s: float = 20.0
    recovery_s: float = 5.0
    bottleneck_mbps: float = 100.0
    buffer_ms: float = 30.0
    steady_flows: int = 2  # erp-dashboard
    bursty_flows: int = 4  # telemetry-upload
    upload_bytes: int = 1_500_000  # per telemetry upload: bursts, then silence
    upload_period_s: float = 1.0
    # robot-control (UDP) and safety-scanner (TCP connect) SLOs and probe cadence
    robot_jitter_ms: float = 1.0
    robot_latency_ms: float = 5.0
    robot_queue_delay_ms: float = 2.0
    scanner_jitter_ms: float = 2.0
    scanner_latency_ms: float = 10.0
    max_loss_ratio: float = 0.02
    probe_interval_s: float = 0.01
    # A harder timeline: halfway through the congestion a second wave of bulk flows joins
    # ("load"), or the bottleneck drops to knee_step_fraction of its rate ("knee").
    step: str = "none"
    knee_step_fraction: float = 0.6
    # Everything else (windows, cadence, the policy) is the product's default: a lab
    # that needs its own policy settings measures a policy nobody deploys.

    def __post_init__(self) -> None:
        for name in ("quiet_s", "congestion_s", "recovery_s", "bottleneck_mbps", "buffer_ms"):
            if not getattr(self, name) > 0:
                raise LabError(f"{name.replace('_', ' ')} must be positive")
        if self.congestion_s < 2.0:
            raise LabError("the congestion phase needs at least 2 s to measure anything")
        if self.steady_flows < 1 or self.bursty_flows < 1 or self.upload_bytes < 1:
            raise LabError("flows and upload size must be at least 1")
        check_step(self.step, self.knee_step_fraction, of="bottleneck")

    @property
    def step_at_s(self) -> float | None:
        """When the step happens (run time), or None without one."""
        return step_time(self.step, self.timeline)

    @property
    def stepped_mbps(self) -> float:
        """The bottleneck's rate after a knee step."""
        return self.bottleneck_mbps * self.knee_step_fraction

    @property
    def timeline(self) -> Timeline:
        """The phase durations."""
        return Timeline(
            quiet_s=self.quiet_s, congestion_s=self.congestion_s, recovery_s=self.recovery_s
        )

    def slos(self) -> list[Slo]:
        """The critical apps' SLOs, as the report evaluates them."""
        return [
            Slo(
                app="robot-control",
                max_jitter_ms=self.robot_jitter_ms,
                max_latency_ms=self.robot_latency_ms,
                max_queue_delay_ms=self.robot_queue_delay_ms,
                max_loss_ratio=self.max_loss_ratio,
            ),
            Slo(
                app="safety-scanner",
                max_jitter_ms=self.scanner_jitter_ms,
                max_latency_ms=self.scanner_latency_ms,
                max_loss_ratio=self.max_loss_ratio,
            ),
        ]

    @property
    def critical_mbps(self) -> float:
        """What the probes themselves send through the bottleneck (replies), Mbit/s."""
        return 2 * _PROBE_BYTES * 8 / self.probe_interval_s / 1e6


def _threshold_keys(slo: Slo) -> dict[str, float]:
    """An SLO's thresholds as the config spells them (its field names), unset ones left out."""
    return {k: v for k, v in asdict(slo).items() if k != "app" and v is not None}


def controller_config(settings: LabSettings, topology: Topology) -> dict[str, Any]:
    """The ``detnet control``/``detnet probe`` config for this lab, in the controller's form."""
    s = settings
    robot, scanner = s.slos()
    return {
        "critical_apps": [
            {
                "name": robot.app,
                "host": topology.address(robot.app),
                "port": UDP_PORT,
                "protocol": "udp",
                **_threshold_keys(robot),
                "priority": 100,
            },
            {
                "name": scanner.app,
                "host": topology.address(scanner.app),
                "port": TCP_PORT,
                "protocol": "tcp",
                "mode": "connect",
                **_threshold_keys(scanner),
                "priority": 90,
            },
        ],
        "best_effort_targets": [
            {"name": app, "tc": {"device": POD_DEVICE, "netns": topology.ns(app)}}
            for app in BEST_EFFORT
        ],
        "control": {"probe_interval": f"{s.probe_interval_s * 1000:g}ms"},
        "metrics": {"listen": f"{topology.address('probe')}:{METRICS_PORT}"},
    }


# ------------------------------------------------------------------------ recording


def probe_sample(rec: Any, *, mono_to_unix: float) -> tuple[str, float, float] | None:
    """(target, unix send time, RTT ms or NaN when lost) of one ``--stream`` record;
    None when ``rec`` is not a probe record."""
    if not isinstance(rec, dict):
        return None
    try:
        sent_s = int(rec["sent_ns"]) / 1e9
        name = str(rec["target"])
    except (KeyError, TypeError, ValueError):
        return None
    # sent_ns is CLOCK_REALTIME or CLOCK_MONOTONIC: tell them apart by magnitude
    if abs(sent_s - time.time()) > 86_400:
        sent_s += mono_to_unix
    rtt = rec.get("rtt_ns")
    if rtt is None:
        rtt = rec.get("user_rtt_ns")
    rtt_ms = math.nan if rec.get("lost") or rtt is None else float(rtt) / 1e6
    return name, sent_s, rtt_ms


class _Recorder:
    """Collects one run's probes (from the stream file), goodput and decisions."""

    def __init__(self, stream: Path, ip_to_app: Mapping[str, str]) -> None:
        self.stream = stream
        self.ip_to_app = ip_to_app
        self.t0 = 0.0  # unix time of the run's start
        self.probes: dict[str, list[tuple[float, float]]] = {}
        self.goodput: list[tuple[float, float]] = []
        self.goodput_by_app: dict[str, float] = {}
        self.decisions: list[dict[str, Any]] = []
        self.limits: list[tuple[float, float]] = []
        self._offset = 0
        self._partial = b""
        self._mono_to_unix = time.time() - time.monotonic()
        self._lock = threading.Lock()

    def read_stream(self) -> int:
        """Parse probe lines appended since the last call; return how many."""
        try:
            with self.stream.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._offset += len(data)
        data, self._partial = self._partial + data, b""
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next read
        n = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            sample = probe_sample(rec, mono_to_unix=self._mono_to_unix)
            if sample is None:
                continue  # a line that is not a probe record (a stats line, a warning)
            name, sent_s, rtt_ms = sample
            self.probes.setdefault(name, []).append((sent_s - self.t0, rtt_ms))
            n += 1
        return n

    def sink_line(self, line: bytes) -> None:
        """A line of the sink's per-second report."""
        try:
            rec = json.loads(line)
            ts = float(rec["ts"])
            counts = rec["bytes"]
        except (ValueError, KeyError, TypeError):
            return
        with self._lock:
            per_app = {app: counts.get(ip, 0) * 8 / 1e6 for ip, app in self.ip_to_app.items()}
            self.goodput_by_app = per_app
            self.goodput.append((ts - self.t0, sum(per_app.values())))

    def control_line(self, line: bytes) -> None:
        """A line of ``detnet control``'s stdout; decisions are kept."""
        try:
            rec = json.loads(line)
        except ValueError:
            return
        if not isinstance(rec, dict) or rec.get("event") != "decision":
            return
        ts = rec.get("ts")
        t = float(ts) if isinstance(ts, int | float) else time.time()
        rec["t_s"] = round(t - self.t0, 3)
        limits = rec.get("limits")
        with self._lock:
            self.decisions.append(rec)
            if isinstance(limits, dict):
                self.limits.append((t - self.t0, float(sum(limits.values()))))

    def run_data(self) -> RunData:
        """What was recorded, for the report."""
        with self._lock:
            return RunData(
                probes={k: list(v) for k, v in self.probes.items()},
                goodput=list(self.goodput),
                decisions=list(self.decisions),
                limits=list(self.limits),
            )


def _pump(stream: IO[bytes] | None, handle: Callable[[bytes], None]) -> threading.Thread:
    """Feed each line of a child's stdout to ``handle`` on a daemon thread."""

    def loop() -> None:
        assert stream is not None
        for line in stream:
            handle(line)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------- runs

View = Callable[[str, float, str, _Recorder], None]


def run_lab(
    settings: LabSettings, *, view: View | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build the topology, run both scenarios, tear down; return the report (JSON form)."""
    with (
        Topology(bottleneck_mbps=settings.bottleneck_mbps, buffer_ms=settings.buffer_ms) as topo,
        tempfile.TemporaryDirectory(prefix="detnet-lab-") as tmp,
    ):
        cfg = controller_config(settings, topo)
        cfg_path = Path(tmp) / "lab.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log(
            f"lab: namespaces {topo.prefix}*, bottleneck {settings.bottleneck_mbps:g} Mbit/s, "
            f"buffer {settings.buffer_ms:g} ms"
        )
        forward = _Forward()
        sink = _start_endpoints(topo)
        _pump(sink.stdout, forward)
        runs: dict[str, Any] = {}
        for name in ("without_controller", "with_controller"):
            log(f"lab: run {name.replace('_', ' ')} ({settings.timeline.total_s:g} s)")
            data = _one_run(
                settings,
                topo,
                cfg_path=cfg_path,
                controlled=name == "with_controller",
                tmp=Path(tmp),
                name=name,
                view=view,
                forward=forward,
            )
            knee = settings.step == "knee"
            runs[name] = summarise_run(
                data,
                slos=settings.slos(),
                timeline=settings.timeline,
                bottleneck_mbps=settings.bottleneck_mbps,
                critical_mbps=settings.critical_mbps,
                bottleneck_from_s=settings.step_at_s if knee else None,
                bottleneck_after_mbps=settings.stepped_mbps if knee else None,
                step_at_s=settings.step_at_s,
            )
            runs[name]["_data"] = data  # for the plot; dropped from the JSON by the caller
        return build_report({"lab": asdict(settings), "controller": cfg}, runs)


def _start_endpoints(topo: Topology) -> subprocess.Popen[bytes]:
    topo.spawn(
        "robot-control",
        [*_DETNET, "reflect", "--udp", f"0.0.0.0:{UDP_PORT}", "--stats-interval", "0"],
    )
    topo.spawn(
        "safety-scanner",
        [*_DETNET, "reflect", "--tcp", f"0.0.0.0:{TCP_PORT}", "--stats-interval", "0"],
    )
    sink = topo.spawn(
        "sink", [*_TRAFFIC, "sink", "--listen", f"0.0.0.0:{SINK_PORT}"], stdout=subprocess.PIPE
    )
    topo.wait_for_port("robot-control", UDP_PORT, proto="udp")
    topo.wait_for_port("safety-scanner", TCP_PORT)
    topo.wait_for_port("sink", SINK_PORT)
    return sink


def _one_run(
    settings: LabSettings,
    topo: Topology,
    *,
    cfg_path: Path,
    controlled: bool,
    tmp: Path,
    name: str,
    view: View | None,
    forward: _Forward,
) -> RunData:
    for app in BEST_EFFORT:  # each run starts unshaped
        subprocess.run(
            ["tc", "-n", topo.ns(app), "qdisc", "del", "dev", POD_DEVICE, "root"],
            capture_output=True,
            check=False,
        )
    stream = tmp / f"{name}.jsonl"
    ip_to_app = {topo.address(app): app for app in BEST_EFFORT}
    rec = _Recorder(stream, ip_to_app)
    out: Any = subprocess.PIPE if controlled else subprocess.DEVNULL
    if controlled:
        argv = [
            *_DETNET,
            "control",
            "--config",
            str(cfg_path),
            "--enforcer",
            "tc",
            "--log-format",
            "json",
            "--stream",
            str(stream),
        ]
    elif _probe_takes_config():  # `detnet probe --stream` writes the records to stdout
        argv = [*_DETNET, "probe", "--config", str(cfg_path), "--stream"]
        out = stream.open("wb")
    else:  # the same engine and measurements, deciding but enforcing nothing
        argv = [
            *_DETNET,
            "control",
            "--config",
            str(cfg_path),
            "--dry-run",
            "--log-format",
            "json",
            "--stream",
            str(stream),
        ]
    try:
        measurer = topo.spawn("probe", argv, stdout=out)
    finally:
        if not isinstance(out, int):
            out.close()  # the child holds its own copy
    if controlled:
        _pump(measurer.stdout, rec.control_line)
    try:
        _wait_warm(rec, measurer, what=argv[3], timeout_s=15.0)
        rec.t0 = time.time() + 1.0  # one more second so the window holds quiet samples only
        rec.probes.clear()
        tl = settings.timeline
        c_start, c_end = tl.bounds("congestion")
        senders: list[subprocess.Popen[bytes]] = []
        launched = False
        stopped = False
        step_at, stepped = settings.step_at_s or 0.0, settings.step_at_s is None
        # senders launch ahead and are told the start time; a rate changes on the spot
        step_due = step_at - (1.5 if settings.step == "load" else 0.0)
        forward.rec = rec
        while (now := time.time() - rec.t0) < tl.total_s:
            if not launched and now >= c_start - 1.5:
                senders += _wave(settings, topo, at=rec.t0 + c_start)
                launched = True
            if not stepped and now >= step_due:
                if settings.step == "load":
                    senders += _wave(settings, topo, at=rec.t0 + step_at)
                else:
                    topo.set_bottleneck(settings.stepped_mbps)
                stepped = True
            if launched and not stopped and now >= c_end:
                for proc in senders:
                    topo.stop(proc, timeout_s=2.0)
                stopped = True
            if measurer.poll() is not None:
                raise LabError(
                    f"`detnet {'control' if controlled else 'probe'}` exited with status "
                    f"{measurer.returncode} during the {name.replace('_', ' ')} run"
                )
            rec.read_stream()
            if view is not None:
                phase = "quiet" if now < c_start else "congestion" if now < c_end else "recovery"
                view(name, now, phase, rec)
            time.sleep(0.25)
        for proc in senders:
            topo.stop(proc, timeout_s=2.0)
    finally:
        forward.rec = None
        topo.stop(measurer, timeout_s=10.0)
        if settings.step == "knee":
            topo.set_bottleneck(settings.bottleneck_mbps)  # the next run starts at full rate
    rec.read_stream()
    return rec.run_data()


def _wave(settings: LabSettings, topo: Topology, *, at: float) -> list[subprocess.Popen[bytes]]:
    """One wave of best-effort senders (erp-dashboard steady, telemetry-upload bursty),
    launched ahead and told to start at unix time ``at``."""
    send = [*_TRAFFIC, "send", "--to", f"{topo.address('sink')}:{SINK_PORT}"]
    at_args = ("--start-at", f"{at:.6f}")
    steady = ("--mode", "steady", "--flows", str(settings.steady_flows))
    bursty = ("--mode", "bursty", "--flows", str(settings.bursty_flows))
    upload = (
        "--upload-bytes",
        str(settings.upload_bytes),
        "--period",
        str(settings.upload_period_s),
    )
    return [
        topo.spawn("erp-dashboard", [*send, *steady, *at_args]),
        topo.spawn("telemetry-upload", [*send, *bursty, *upload, *at_args]),
    ]


def _probe_takes_config() -> bool:
    """Whether this ``detnet probe`` reads a config file and streams probes."""
    out = subprocess.run(
        [*_DETNET, "probe", "--help"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    return "--config" in out and "--stream" in out and "--stream FILE" not in out


def _wait_warm(
    rec: _Recorder, measurer: subprocess.Popen[bytes], *, what: str, timeout_s: float
) -> None:
    """Wait until every critical app has answered a probe."""
    deadline = time.monotonic() + timeout_s
    rec.t0 = time.time()
    while time.monotonic() < deadline:
        if measurer.poll() is not None:
            raise LabError(
                f"`detnet {what}` exited with status "
                f"{measurer.returncode} before probing started (see its message above)"
            )
        rec.read_stream()
        answered = {
            app for app, samples in rec.probes.items() if any(not math.isnan(r) for _, r in samples)
        }
        if {"robot-control", "safety-scanner"} <= answered:
            return
        time.sleep(0.1)
    raise LabError(f"the critical apps did not answer probes within {timeout_s:g} s")


class _Forward:
    """Routes the sink's per-second reports (read for the whole lab) to the current run."""

    def __init__(self) -> None:
        self.rec: _Recorder | None = None

    def __call__(self, line: bytes) -> None:
        rec = self.rec
        if rec is not None:
            rec.sink_line(line)
