"""The cluster keys of the config: endpoints, scope, the probe-rate cap, usage, agent."""

from __future__ import annotations

import textwrap

import pytest

from detnet.controller.config import parse_config
from detnet.controller.errors import ConfigError

BASE = """\
critical_apps:
  - name: robot-control
    service: {service}
    {extra}
    port: 5201
    protocol: UDP
    max_jitter_ms: 1.0
best_effort_targets:
  - deployment: telemetry-upload
"""


def config(service: str = "robot-control.critical-apps.svc.cluster.local", extra: str = "") -> str:
    return BASE.format(service=service, extra=extra or "priority: 1")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="c.yaml")
    return str(err.value)


def test_defaults_leave_the_decisions_to_the_run() -> None:
    cfg = parse_config(config(), source="c.yaml")
    app = cfg.critical_apps[0]
    assert (app.endpoints, app.namespace) == (None, None)
    assert cfg.control.scope is None
    assert cfg.control.max_probe_rate == 5000.0
    assert cfg.usage is None
    assert (cfg.agent.namespace, cfg.agent.service, cfg.agent.deadline_s) == (
        "detnet-agent",
        "detnet-agent",
        0.2,
    )
    assert cfg.agent.token_file == "/var/run/secrets/detnet/agent/token"


def test_every_cluster_key_reads_back_from_the_dump() -> None:
    text = config(extra="endpoints: pods") + textwrap.dedent("""\
        control:
          scope: node
          max_probe_rate: 800
        usage: agent
        agent:
          namespace: agents
          service: usage
          deadline: 150ms
          token_file: /run/token
        """)
    cfg = parse_config(text, source="c.yaml")
    assert cfg.critical_apps[0].endpoints == "pods"
    assert (cfg.control.scope, cfg.control.max_probe_rate, cfg.usage) == ("node", 800.0, "agent")
    assert (cfg.agent.namespace, cfg.agent.service) == ("agents", "usage")
    assert (cfg.agent.deadline_s, cfg.agent.token_file) == (0.15, "/run/token")
    again = parse_config(cfg.dump(), source="dump.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_a_bare_service_name_takes_the_namespace_beside_it() -> None:
    cfg = parse_config(
        config(service="robot-control", extra="namespace: critical-apps\n    endpoints: pods"),
        source="c.yaml",
    )
    assert (cfg.critical_apps[0].service, cfg.critical_apps[0].namespace) == (
        "robot-control",
        "critical-apps",
    )


@pytest.mark.parametrize(
    ("service", "extra", "message"),
    [
        ("robot-control", "endpoints: pods", "critical_apps[0].service: endpoints: pods needs"),
        ("10.0.0.1", "endpoints: pods", "critical_apps[0].service: endpoints: pods needs"),
        ("x.y.svc", "endpoints: pods\n    host: 10.0.0.1", "critical_apps[0].endpoints: pods"),
        ("x.y.svc", "endpoints: all", "critical_apps[0].endpoints: must be pods or service"),
        ("x.y.svc", "namespace: Bad_NS", "critical_apps[0].namespace: must be a Kubernetes"),
        ("x.other.svc", "namespace: y\n    endpoints: pods", "is in namespace"),
    ],
)
def test_endpoint_keys_are_checked_at_their_line(service: str, extra: str, message: str) -> None:
    msg = refused(config(service=service, extra=extra))
    assert msg.startswith("c.yaml:"), msg
    assert message in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("control:\n  scope: nodes\n", "control.scope: must be node or cluster"),
        ("usage: agents\n", "usage: must be agent or none"),
        ("agent:\n  token_file: relative/token\n", "agent.token_file: must be an absolute"),
        ("agent:\n  service: Not_A_Name\n", "agent.service: must be a Kubernetes object name"),
        ("agent:\n  port: 1\n", "agent.port"),
    ],
)
def test_cluster_keys_refuse_bad_values(tail: str, message: str) -> None:
    msg = refused(config() + tail)
    assert message in msg, msg


def test_the_knee_knobs_read_back_and_a_blind_cut_is_never_shallower() -> None:
    text = config() + textwrap.dedent("""\
        policy:
          decrease_factor: 0.7
          knee_margin: 0.05
          knee_memory: 10m
          escalate_after: 5
          effect_delay: 300ms
        """)
    cfg = parse_config(text, source="c.yaml")
    p = cfg.policy
    assert (p.max_blind_factor, p.knee_margin, p.knee_memory_s) == (0.7, 0.05, 600.0)
    assert (p.escalate_after, p.effect_delay_s) == (5, 0.3)
    assert parse_config(cfg.dump(), source="dump.yaml").policy == p
    msg = refused(config() + "policy:\n  decrease_factor: 0.4\n  max_blind_factor: 0.3\n")
    assert "policy.max_blind_factor: must be at least decrease_factor (0.4), got 0.3" in msg


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("knee_margin", "1.5", "must be a fraction between 0 and 1"),
        ("early_warning_fraction", ".nan", "must be a fraction between 0 and 1"),
        ("knee_memory", "1e300s", "must be at most"),
        ("effect_delay", "0", "must be a positive duration"),
        ("escalate_after", "5000", "must be from 1 to 1000"),
    ],
)
def test_the_knee_knobs_have_ranges(key: str, value: str, problem: str) -> None:
    msg = refused(config() + f"policy:\n  {key}: {value}\n")
    assert f"policy.{key}: {problem}" in msg, msg
