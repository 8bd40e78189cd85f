"""The control loop with a fake clock, a fake stats source and DryRunEnforcer."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry

from detnet.controller.aimd import AsymmetricAimd, PolicyParams, Scope, Slo
from detnet.controller.enforce.base import DryRunEnforcer
from detnet.controller.errors import EnforcementError
from detnet.controller.loop import RECENT_WINDOW_NS, ControlLoop, DecisionLog
from detnet.controller.metrics import ControllerMetrics
from detnet.controller.workloads import PodRef
from detnet.engine.stats import WindowStats
from detnet.engine.targets import Endpoint
from tests.unit.test_aimd import window

S = 1_000_000_000


class FakeClock:
    """Time moves only when the loop sleeps: each sleep jumps to its deadline."""

    def __init__(self) -> None:
        self.now = 1_000 * S
        self.sleeps: list[int] = []

    def now_ns(self) -> int:
        return self.now

    async def sleep_until(self, deadline_ns: int) -> None:
        self.sleeps.append(deadline_ns)
        self.now = max(self.now, deadline_ns)
        await asyncio.sleep(0)


class FakeEngine:
    """Windows set by the test; every stats() call recorded with its arguments."""

    def __init__(self) -> None:
        self.windows: dict[str, WindowStats | None] = {"robot-control": None}
        self.trace: dict[str, Sequence[tuple[int, float]]] = {}
        self.calls: list[tuple[int | None, Mapping[str, int] | None]] = []

    def stats(
        self,
        now_ns: int | None = None,
        *,
        window_ns: int | None = None,
        since_ns: Mapping[str, int] | None = None,
    ) -> Mapping[str, WindowStats | None]:
        self.calls.append((window_ns, since_ns))
        return dict(self.windows)

    def queue_trace(
        self, now_ns: int | None = None, *, window_ns: int
    ) -> Mapping[str, Sequence[tuple[int, float]]]:
        self.calls.append((window_ns, None))
        return dict(self.trace)


class FlakyEnforcer(DryRunEnforcer):
    """DryRunEnforcer whose apply fails a given number of times."""

    def __init__(self, failures: int, recorded: Mapping[Scope, int] | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0
        self.recorded = dict(recorded or {})

    async def start(self) -> Mapping[Scope, int]:
        return self.recorded

    async def apply(self, limits: Mapping[Scope, int]) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise EnforcementError("API refused the patch (500)")
        await super().apply(limits)


def make(
    enforcer: DryRunEnforcer | None = None,
) -> tuple[ControlLoop, FakeEngine, FakeClock, DryRunEnforcer, io.StringIO, ControllerMetrics]:
    params = PolicyParams(decrease_cooldown_s=1.0, increase_interval_s=2.0)
    policy = AsymmetricAimd(
        params=params,
        slos=[Slo(app="robot-control", max_jitter_ms=1.0)],
        workloads={"telemetry": 100, "erp": None},
    )
    engine, clock = FakeEngine(), FakeClock()
    enforcer = enforcer or DryRunEnforcer()
    out = io.StringIO()
    metrics = ControllerMetrics(CollectorRegistry())
    loop = ControlLoop(
        engine=engine,
        policy=policy,
        enforcer=enforcer,
        interval_s=0.25,
        metrics=metrics,
        clock=clock,
        decision_log=DecisionLog(fmt="json", stream=out, wall_clock=lambda: 1700000000.5),
    )
    return loop, engine, clock, enforcer, out, metrics


def records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def named(limits: Mapping[Scope, int]) -> dict[str, int]:
    """Limits by their scope's name (``workload`` or ``workload@node``)."""
    return {str(scope): mbit for scope, mbit in limits.items()}


async def test_start_applies_initial_limits_and_resumes_recorded() -> None:
    loop, _, _, enforcer, _, metrics = make(FlakyEnforcer(0, recorded={Scope("erp"): 40}))
    assert named(await loop.start()) == {"telemetry": 100, "erp": 40}
    assert named(enforcer.applied) == {"telemetry": 100, "erp": 40}
    value = metrics.registry.get_sample_value(
        "detnet_egress_limit_bytes_per_second", {"workload": "erp", "node": ""}
    )
    assert value == 40 * 125_000


async def test_no_data_holds_then_violation_cuts_and_logs() -> None:
    loop, engine, _, enforcer, out, metrics = make()
    await loop.start()
    d = await loop.step()
    assert d.action == "hold"
    engine.windows["robot-control"] = window("robot-control", jitter_ms=2.31)
    d = await loop.step()
    assert d.action == "decrease"
    assert named(enforcer.applied) == {"telemetry": 80, "erp": 800}
    recs = records(out)
    assert recs[-1]["event"] == "decision"
    assert recs[-1]["action"] == "decrease"
    assert recs[-1]["limits"] == {"telemetry": 80, "erp": 800}
    assert recs[-1]["previous"] == {"telemetry": 100, "erp": 1000}
    assert recs[-1]["ts"] == 1700000000.5
    assert isinstance(recs[-1]["enforce_s"], float)
    assert "robot-control jitter_iqr 2.31 ms > 1.00 ms" in recs[-1]["reasons"]  # type: ignore[operator]
    reg = metrics.registry
    assert reg.get_sample_value("detnet_decisions_total", {"action": "decrease"}) == 1
    assert reg.get_sample_value("detnet_decisions_total", {"action": "hold"}) == 1
    sig = {"target": "robot-control", "signal": "jitter"}
    assert reg.get_sample_value("detnet_slo_violated", sig) == 1
    assert reg.get_sample_value("detnet_slo_threshold_seconds", sig) == 0.001
    count = reg.get_sample_value(
        "detnet_enforcement_latency_seconds_count", {"enforcer": "dry-run"}
    )
    assert count == 2  # start + the cut
    assert reg.get_sample_value("detnet_control_loop_seconds_count") == 2


async def test_repeated_holds_are_logged_once() -> None:
    loop, _, _, _, out, _ = make()
    await loop.start()
    for _ in range(5):
        await loop.step()
    assert len(records(out)) == 1


async def test_enforcement_error_is_logged_and_retried_next_step() -> None:
    flaky = FlakyEnforcer(0)
    loop, engine, clock, _, out, metrics = make(flaky)
    await loop.start()
    flaky.failures = 1
    engine.windows["robot-control"] = window("robot-control", jitter_ms=5.0)
    d = await loop.step()
    assert d.action == "decrease"
    assert loop.enforcement_errors == 1
    errors = metrics.registry.get_sample_value(
        "detnet_enforcement_errors_total", {"enforcer": flaky.name}
    )
    assert errors == 1
    assert named(flaky.applied) == {"telemetry": 100, "erp": 1000}  # nothing applied yet
    assert records(out)[-1]["error"] == "API refused the patch (500)"
    clock.now += S // 4
    d = await loop.step()  # within the cooldown: holds, but re-applies the cut
    assert d.action == "hold"
    assert named(flaky.applied) == {"telemetry": 80, "erp": 800}
    assert loop.applied == loop.desired


async def test_run_keeps_absolute_deadlines_and_stops() -> None:
    loop, _, clock, _, _, _ = make()
    await loop.start()
    t0 = clock.now
    await loop.run(steps=4)
    assert clock.sleeps == [t0 + k * S // 4 for k in range(1, 5)]
    assert loop.steps == 4
    assert loop.healthy()
    assert not loop.healthy(now_ns=clock.now + 10 * S)


async def test_run_skips_missed_slots() -> None:
    loop, _, clock, _, _, _ = make()
    await loop.start()
    t0 = clock.now
    real_step = loop.step

    async def slow_step():
        clock.now += S  # a step that takes four intervals
        return await real_step()

    loop.step = slow_step  # type: ignore[method-assign]
    await loop.run(steps=2)
    # After a 1 s step the next deadline is the next slot after now, not a burst.
    assert clock.sleeps[0] == t0 + S + S // 4


async def test_stop_ends_run() -> None:
    loop, _, _, _, _, _ = make()
    await loop.start()

    class BlockingClock:
        def now_ns(self) -> int:
            return 0

        async def sleep_until(self, deadline_ns: int) -> None:
            await asyncio.Event().wait()  # never returns by itself

    loop.clock = BlockingClock()
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.01)
    assert loop.steps == 1
    loop.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_text_log() -> None:
    out = io.StringIO()
    loop, engine, _, _, _, _ = make()
    loop.decision_log = DecisionLog(fmt="text", stream=out)
    await loop.start()
    engine.windows["robot-control"] = window("robot-control", jitter_ms=5.0)
    await loop.step()
    line = out.getvalue().strip()
    assert "decrease" in line
    assert "telemetry=100->80M" in line
    assert "robot-control jitter_iqr 5.00 ms > 1.00 ms" in line


async def test_logged_ts_is_when_the_policy_decided_not_when_apply_returned() -> None:
    wall = [1700000000.0]

    class SlowEnforcer(DryRunEnforcer):
        async def apply(self, limits: Mapping[Scope, int]) -> None:
            wall[0] += 0.7  # the apply takes 0.7 s of wall time
            await super().apply(limits)

    loop, engine, _, _, out, _ = make(SlowEnforcer())
    assert loop.decision_log is not None
    loop.decision_log.wall_clock = lambda: wall[0]
    await loop.start()
    engine.windows["robot-control"] = window("robot-control", jitter_ms=5.0)
    decided_at = wall[0]
    d = await loop.step()
    assert d.action == "decrease"
    assert records(out)[-1]["ts"] == decided_at


async def test_after_a_cut_the_windows_start_when_it_took_effect() -> None:
    loop, engine, clock, _, _, _ = make()
    await loop.start()
    await loop.step()
    # the evidence window and the last second (the queue's trend); the probes of the
    # last control interval only the step after a cut (the queue's slope)
    latest = (loop.interval_ns, None)
    assert engine.calls == [(None, {}), (RECENT_WINDOW_NS, None)]
    engine.windows["robot-control"] = window("robot-control", jitter_ms=5.0)
    cut_at = clock.now
    assert (await loop.observe()).actuation_ns is None  # nothing changed since the start
    assert (await loop.step()).action == "decrease"
    # the next observation says how long the cut took to reach the enforcer
    actuation = (await loop.observe()).actuation_ns
    assert actuation is not None
    assert actuation > 0
    clock.now += S // 4
    await loop.step()
    full, recent, now = engine.calls[-3:]
    effect = round(loop.policy.params.effect_delay_s * 1e9)
    assert full == (None, {"robot-control": cut_at + effect})
    assert (recent, now) == ((RECENT_WINDOW_NS, None), latest)
    calls = len(engine.calls)
    await loop.step()  # the drain was read: no more probe by probe
    assert engine.calls[calls:] == [(None, {"robot-control": cut_at + effect}), recent]


class PlacedEnforcer(DryRunEnforcer):
    """Best-effort pods on two nodes, with the pods the agents are asked about."""

    def placements(self) -> Mapping[str, frozenset[str]]:
        return {"telemetry": frozenset({"node-a", "node-b"}), "erp": frozenset({"node-b"})}

    def pods(self) -> Mapping[str, tuple[PodRef, ...]]:
        return {
            "telemetry": (PodRef("be", "t-a", "node-a"), PodRef("be", "t-b", "node-b")),
            "erp": (PodRef("be", "e-b", "node-b"),),
        }


class RecordingUsage:
    def __init__(self, usage: Mapping[Scope, float]) -> None:
        self.result = dict(usage)
        self.asked: list[Mapping[str, tuple[PodRef, ...]]] = []

    async def usage(self, pods: Mapping[str, Sequence[PodRef]]) -> Mapping[Scope, float]:
        self.asked.append({k: tuple(v) for k, v in pods.items()})
        return self.result


async def test_node_scope_cuts_the_violated_node_from_the_agents_usage() -> None:
    params = PolicyParams(scope="node", decrease_cooldown_s=1.0, increase_interval_s=2.0)
    policy = AsymmetricAimd(
        params=params,
        slos=[Slo(app="robot-control", max_jitter_ms=1.0)],
        workloads={"telemetry": None, "erp": None},
    )
    engine, clock, enforcer = FakeEngine(), FakeClock(), PlacedEnforcer()
    usage = RecordingUsage({Scope("telemetry", "node-b"): 50.0, Scope("erp", "node-b"): 30.0})
    metrics = ControllerMetrics(CollectorRegistry())
    out = io.StringIO()
    endpoints = {
        "robot-control/rc-a": Endpoint("robot-control", node="node-a", pod="rc-a"),
        "robot-control/rc-b": Endpoint("robot-control", node="node-b", pod="rc-b"),
    }
    loop = ControlLoop(
        engine=engine,
        policy=policy,
        enforcer=enforcer,
        metrics=metrics,
        clock=clock,
        endpoints=lambda: endpoints,
        usage=usage,
        decision_log=DecisionLog(fmt="json", stream=out, wall_clock=lambda: 0.0),
    )
    start = named(await loop.start())
    assert start == {"telemetry@node-a": 1000, "telemetry@node-b": 1000, "erp@node-b": 1000}
    engine.windows = {
        "robot-control/rc-a": window("robot-control/rc-a", jitter_ms=0.1),
        "robot-control/rc-b": window("robot-control/rc-b", jitter_ms=5.0),
    }
    decision = await loop.step()
    assert usage.asked == [enforcer.pods()]
    assert decision.action == "decrease"
    assert decision.cut_nodes == ("node-b",)
    limits = named(enforcer.applied)
    assert limits["telemetry@node-a"] == 1000  # node-a's pods keep theirs
    assert limits["telemetry@node-b"] == 40  # 20 % under the 50 Mbit/s it sends
    assert limits["erp@node-b"] == 24
    # the log says what usage each cut started from
    assert records(out)[-1]["usage"] == {"telemetry@node-b": 50.0, "erp@node-b": 30.0}
    reg = metrics.registry
    labels = {"workload": "telemetry", "node": "node-b"}
    assert reg.get_sample_value("detnet_egress_limit_bytes_per_second", labels) == 40 * 125_000
    assert reg.get_sample_value("detnet_egress_usage_bytes_per_second", labels) == 50 * 125_000
    assert (
        reg.get_sample_value(
            "detnet_egress_usage_bytes_per_second", {"workload": "telemetry", "node": "node-a"}
        )
        is None
    )  # unknown usage is no series, not a zero


async def test_failing_usage_means_unknown_usage_not_a_stalled_loop() -> None:
    class BrokenEnforcer(DryRunEnforcer):
        async def usage(self) -> Mapping[Scope, float]:
            raise EnforcementError("interface gone")

    loop, engine, _, enforcer, _, _ = make(BrokenEnforcer())
    await loop.start()
    engine.windows["robot-control"] = window("robot-control", jitter_ms=5.0)
    decision = await loop.step()
    assert decision.action == "decrease"  # cut from the caps, usage unknown
    assert named(enforcer.applied) == {"telemetry": 80, "erp": 800}
