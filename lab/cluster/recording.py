"""What one run of the cluster lab records, as it happens: the controller's probe stream
(per endpoint), the sink's per-second byte counts (per node), the controller's decisions
and the Cilium stand-ins' change records; ``run_data()`` hands them to the report.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from detnet.lab.cluster.report import ClusterRunData
from detnet.lab.scenario import probe_sample


class Tail:
    """The lines appended to a file since the last read (a torn last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def lines(self) -> list[bytes]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [ln for ln in lines if ln.strip()]

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


class ClusterRecorder:
    """One run's probes (per endpoint), goodput (per node), decisions and the
    stand-ins' changes; ``probes``, ``goodput_by_node`` and ``decisions`` are read by the
    live view."""

    def __init__(
        self, *, stream: Path, endpoint_of: Callable[[Mapping[str, Any]], str | None],
        node_of_ip: Mapping[str, str],
    ) -> None:  # fmt: skip
        self.stream = Tail(stream)
        self.endpoint_of = endpoint_of
        self.node_of_ip = node_of_ip
        self.t0 = time.time()
        self.probes: dict[str, list[tuple[float, float]]] = {}
        self.goodput: dict[str, list[tuple[float, float]]] = {}
        self.goodput_by_node: dict[str, float] = {}
        self.decisions: list[dict[str, Any]] = []
        self.bandwidth: list[dict[str, Any]] = []
        self.unknown_targets: set[str] = set()
        self._mono_to_unix = time.time() - time.monotonic()
        self._lock = threading.Lock()

    def read_stream(self) -> None:
        """Take in the probe records appended since the last call."""
        for line in self.stream.lines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            sample = probe_sample(rec, mono_to_unix=self._mono_to_unix)
            if sample is None:
                continue
            endpoint = self.endpoint_of(rec)
            if endpoint is None:
                self.unknown_targets.add(sample[0])
                continue
            self.probes.setdefault(endpoint, []).append((sample[1] - self.t0, sample[2]))

    def sink_line(self, line: bytes) -> None:
        """A line of the sink's per-second report: bytes per pod address."""
        try:
            rec = json.loads(line)
            ts, counts = float(rec["ts"]), rec["bytes"]
        except (ValueError, KeyError, TypeError):
            return
        per_node = dict.fromkeys(set(self.node_of_ip.values()), 0.0)
        for ip, n in counts.items():
            node = self.node_of_ip.get(ip)
            if node is not None and isinstance(n, int | float):
                per_node[node] += n * 8 / 1e6
        with self._lock:
            self.goodput_by_node = per_node
            for node, mbps in per_node.items():
                self.goodput.setdefault(node, []).append((ts - self.t0, mbps))

    def control_line(self, line: bytes) -> None:
        """A line of the controller's stdout; decisions are kept."""
        try:
            rec = json.loads(line)
        except ValueError:
            return
        if not isinstance(rec, dict) or rec.get("event") != "decision":
            return
        if not isinstance(rec.get("ts"), int | float):
            rec["ts"] = time.time()
        with self._lock:
            self.decisions.append(rec)

    def run_data(self, patches: Sequence[Mapping[str, Any]]) -> ClusterRunData:
        """What was recorded, for the report."""
        with self._lock:
            return ClusterRunData(
                probes={k: list(v) for k, v in self.probes.items()},
                goodput={k: list(v) for k, v in self.goodput.items()},
                decisions=[{**d, "t_s": round(d["ts"] - self.t0, 3)} for d in self.decisions],
                bandwidth=list(self.bandwidth),
                patches=list(patches),
            )


def pump(stream: IO[bytes] | None, handle: Callable[[bytes], None]) -> threading.Thread:
    def loop() -> None:
        assert stream is not None
        for line in stream:
            handle(line)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


class Forward:
    """Routes the sink's reports (read for the whole lab) to the current run."""

    def __init__(self) -> None:
        self.rec: ClusterRecorder | None = None

    def __call__(self, line: bytes) -> None:
        rec = self.rec
        if rec is not None:
            rec.sink_line(line)
