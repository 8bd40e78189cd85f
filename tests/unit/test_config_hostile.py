"""Hostile config input: every class of malformed file gets one short line, quickly, with
bounded memory, and `config check` and `control` refuse exactly the same files."""

from __future__ import annotations

import copy
import io
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detnet.controller import cli
from detnet.controller.aimd import Decision, Scope
from detnet.controller.config import Config, load_config, parse_config, reading
from detnet.controller.errors import ConfigError
from detnet.controller.loop import DecisionLog

GOOD = """\
critical_apps:
  - name: robot-control
    host: 127.0.0.1
    port: 5201
    protocol: UDP
    max_jitter_ms: 1.0
best_effort_targets:
  - deployment: telemetry-upload
    initial_bandwidth: 100
"""
MB = 1 << 20


@pytest.fixture(params=["c", "python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with libyaml's parser and PyYAML's pure-Python one."""
    if request.param == "c":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML was built without libyaml")
        monkeypatch.setattr(reading, "_LOADER", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(reading, "_LOADER", yaml.SafeLoader)
    return str(request.param)


def refused(text: str, *, source: str = "bad.yaml", peak_mb: float = 32) -> str:
    """The one-line ConfigError ``text`` gets, checking it allocated at most ``peak_mb``."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            parse_config(text, source=source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message, message[:500]
    assert len(message) < 400, message[:500]
    assert message.startswith(f"{source}:"), message
    assert peak < peak_mb * MB, f"{peak / MB:.0f} MB for {message}"
    return message


# ------------------------------------------------------------- aliases and anchors

_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)  # 9**9 = 387 million strings from ~400 bytes


def _in_configmap(doc: str) -> str:
    inner = textwrap.indent(doc, "    ")
    return f"apiVersion: v1\nkind: ConfigMap\ndata:\n  critical-apps.yaml: |\n{inner}"


@pytest.mark.parametrize(
    "text",
    [
        _BOMB,  # at the top
        GOOD + "policy:\n" + textwrap.indent(_BOMB, "  "),  # under a known section
        GOOD + "nonsense:\n" + textwrap.indent(_BOMB, "  "),  # under an unknown key
        _in_configmap(GOOD + _BOMB.replace("a:", "x:", 1)),  # inside the ConfigMap's string
        _BOMB + "apiVersion: v1\nkind: ConfigMap\n",  # in the ConfigMap's own metadata
        "a: &a [*a]\n",  # a self-referencing alias
        GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: &j 1.0\n    max_latency_ms: *j"),
    ],
)
def test_anchors_and_aliases_are_refused(yaml_parser: str, text: str) -> None:
    assert len(text) < 1500
    msg = refused(text, peak_mb=2)
    assert msg.endswith("YAML anchors and aliases (&name, *name) are not supported")


# ------------------------------------------------------------------ size and shape


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Deeper gets no dearer: the parser's lookahead is bounded, and we stop at 32.
        ("a: " + "[" * 500 + "]" * 500, "nested deeper than 32 levels"),
        ("a: " + "{a: " * 500 + "1" + "}" * 500, "nested deeper than 32 levels"),
        ("a:\n" + "".join("  " * i + "- \n" for i in range(200)), "nested deeper than 32 levels"),
        ("a: 1\n" + "#" * MB, "larger than 1 MiB"),
        (GOOD.replace("robot-control", "r" * MB), "larger than 1 MiB"),
    ],
)
def test_deep_wide_and_large_documents(yaml_parser: str, text: str, problem: str) -> None:
    assert problem in refused(text)


def test_value_count_is_bounded(yaml_parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "MAX_NODES", 1000)  # the same loop at 50000, 50x faster
    msg = refused("a: [" + "1," * 100_000 + "1]")
    assert msg == "bad.yaml:1: more than 1000 YAML values; a config has a few hundred"


def test_large_and_endless_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^/dev/zero: larger than 1 MiB"):
        load_config("/dev/zero")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"a: 1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r":2: not UTF-8 text \(byte 5\)$"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r": cannot read: Is a directory$"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("port: 5201", "port: " + "9" * 5000),
            "bad.yaml:4: critical_apps[0].port: too long for a number (5000 characters, at most",
        ),
        (
            GOOD.replace("port: 5201", 'port: "' + "9" * 5000 + '"'),
            'bad.yaml:4: critical_apps[0].port: must be a whole number, got "'
            + "9" * 80
            + '"... (5000 characters)',
        ),
        (
            GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: 1" + "0" * 5000 + ".5"),
            "bad.yaml:6: critical_apps[0].max_jitter_ms: too long for a number",
        ),
        (GOOD + "x" * 2000 + ": 1\n", "bad.yaml:10: invalid YAML: "),  # a key too long for YAML
        (GOOD + "---\nb: 2\n", "bad.yaml:10: a second YAML document (---)"),
        ("a: \x1b[2J\n", "bad.yaml:1: invalid YAML: unacceptable character U+001B"),
        ("a: \ud800\n", "bad.yaml:1: invalid text: not valid Unicode (a lone surrogate)"),
        (
            GOOD.replace("1.0", "!!python/object/apply:os.system [echo]"),
            "bad.yaml:6: unsupported YAML tag",
        ),
        (
            GOOD.replace("host: 127.0.0.1", "host: !!binary aGVsbG8="),
            "bad.yaml:3: critical_apps[0].host: unsupported YAML tag",
        ),
        (
            GOOD.replace("port: 5201", "port: !!int five"),
            'bad.yaml:4: critical_apps[0].port: not a valid number: "five"',
        ),
        ("[1, 2]\n", "bad.yaml:1: the config must be a mapping, got a list"),
        ("? [a]\n: 1\n", "bad.yaml:1: keys must be plain strings"),
    ],
)
def test_malformed_values_get_one_line(yaml_parser: str, text: str, message: str) -> None:
    assert refused(text).startswith(message)


def test_unknown_keys_are_refused_before_their_values_are_read() -> None:
    # The value would be an error of its own; the unknown key is reported first.
    msg = refused(GOOD + "polcy: {decrease_factor: !!int five}\n")
    assert msg.startswith("bad.yaml:10: polcy: unknown key (did you mean 'policy'?)")
    long_key = "k\x1b" + "k" * 900
    msg = refused(GOOD + f'"{long_key}": 1\n'.replace("\x1b", "\\e"))
    assert msg.startswith("bad.yaml:10: k\\x1b" + "k" * 78 + ": unknown key; known keys:")


# ---------------------------------------------------------------------- number ranges

BAD_NUMBERS = [
    ("control", "control_interval", "1e300s", "must be at most 1m"),
    ("control", "control_interval", "1ns", "must be at least 10ms"),
    ("control", "control_interval", ".inf", "must be a duration like 250ms or 1.5s"),
    ("control", "probe_interval", "1ns", "must be at least 100us"),
    ("control", "probe_interval", "2m", "must be at most 1m"),
    ("control", "window", "1e-300s", "must be at least 1ms"),
    ("control", "window", "1e30", "must be at most 1h"),
    ("control", "window", ".nan", "must be a duration like 250ms or 1.5s"),
    (
        "control",
        "window_size",
        "1000000000000000000000000000000",
        "must be from 2 to 65536 samples",
    ),
    ("control", "probe_timeout", "0", "must be a positive duration"),
    (
        "policy",
        "max_bandwidth",
        "1000000000000000000000000000000",
        "must be a whole number of Mbit/s from 1 to 1000000",
    ),
    ("policy", "min_bandwidth", "1e30", "must be a whole number of Mbit/s from 1 to 1000000"),
    ("policy", "increase_step", ".inf", "must be a whole number of Mbit/s from 1 to 1000000"),
    ("policy", "decrease_factor", ".nan", "must be a fraction between 0 and 1"),
    ("policy", "stable_fraction", "1", "must be a fraction between 0 and 1"),
    ("policy", "severity_max_multiplier", "1e30", "must be a number from 1 to 100"),
    ("policy", "decrease_cooldown", "1e300s", "must be at most 24h"),
    ("policy", "usage_window", "-1s", "must be a positive duration"),
    ("kubernetes", "qps", "1e30", "must be at most 1e+09"),
    ("kubernetes", "qps", ".nan", "must be a positive number"),
    ("kubernetes", "concurrency", "1e6", "must be a whole number"),
    ("kubernetes", "concurrency", "100000", "must be from 1 to 1024"),
    ("control", "max_probe_rate", "1e30", "must be a number from 1 to 1e+06"),
    ("control", "max_probe_rate", ".nan", "must be a number from 1 to 1e+06"),
    ("agent", "deadline", "1e300s", "must be at most 10s"),
    ("agent", "deadline", "1ns", "must be at least 10ms"),
]


@pytest.mark.parametrize(("section", "key", "value", "problem"), BAD_NUMBERS)
def test_every_number_has_a_range(section: str, key: str, value: str, problem: str) -> None:
    msg = refused(GOOD + f"{section}:\n  {key}: {value}\n")
    assert msg.startswith(f"bad.yaml:11: {section}.{key}: {problem}, got "), msg


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("max_jitter_ms", ".nan", "must be a positive number"),
        ("max_latency_ms", ".inf", "must be a positive number"),
        ("max_queue_delay_ms", "1e30", "must be at most 60000"),
        ("max_jitter_ms", "1e-300", "must be at least 1e-06"),
        ("max_latency_ms", "5e-324", "must be at least 1e-06"),
        ("max_loss_ratio", ".nan", "must be a number from 0 to 1"),
        ("priority", "1e999", "must be a whole number"),
        ("priority", "10000000000", "must be from -1000000 to 1000000"),
        ("interval", "1e-300s", "must be at least 100us"),
        ("port", "0", "must be from 1 to 65535"),
    ],
)
def test_app_numbers_have_ranges(key: str, value: str, problem: str) -> None:
    app = {"name": "r", "host": "127.0.0.1", "port": 1, "protocol": "udp", "max_latency_ms": 5}
    lines = [f"    {k}: {v}" for k, v in app.items() if k != key]
    text = "critical_apps:\n  - " + "\n".join([*lines, f"    {key}: {value}"])[4:] + "\n"
    msg = refused(text + GOOD[GOOD.index("best_effort") :])
    assert f"critical_apps[0].{key}: {problem}, got " in msg, msg


@pytest.mark.parametrize("value", ["1000000000", "47", "-1"])
def test_app_size_is_checked_by_the_engine_target_at_its_line(value: str) -> None:
    # One size rule for the config and `detnet probe --size`: the codec's 48..9000 bytes.
    app = "  - {name: r, host: 127.0.0.1, port: 1, protocol: udp, max_latency_ms: 5,\n"
    text = "critical_apps:\n" + app + f"      size: {value}}}\n" + GOOD[GOOD.index("best_effort") :]
    msg = refused(text)
    assert msg == (
        f"bad.yaml:3: critical_apps[0].size: target r: probe size {value} is not in 48..9000 bytes"
    )


def test_list_lengths_have_ranges() -> None:
    apps = "".join(
        f"  - {{name: a{i}, host: 127.0.0.1, port: 1, protocol: udp, max_jitter_ms: 1}}\n"
        for i in range(257)
    )
    msg = refused("critical_apps:\n" + apps + GOOD[GOOD.index("best_effort") :])
    assert msg == "bad.yaml:1: critical_apps: at most 256 entries, got 257"


# ------------------------------------------------------------------------ names

HOSTILE_TEXT = [
    "\x00",
    "\n",
    "\x1b[31m",
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u200b",  # zero-width space
    "\x85",  # next line
    "\u2028",  # line separator
    "\x7f",
]
NAME_FIELDS = [
    ("name: robot-control", "name: {v}", "critical_apps[0].name"),
    ("host: 127.0.0.1", "host: {v}", "critical_apps[0].host"),
    ("host: 127.0.0.1", "service: {v}", "critical_apps[0].service"),
    ("protocol: UDP", "protocol: {v}", "critical_apps[0].protocol"),
    ("deployment: telemetry-upload", "deployment: {v}", "best_effort_targets[0].deployment"),
    ("deployment: telemetry-upload", "workload: {v}", "best_effort_targets[0].workload"),
    ("deployment: telemetry-upload", "name: {v}\n    selector: a=b", "best_effort_targets[0].name"),
    (
        "deployment: telemetry-upload",
        "name: t\n    selector: {v}",
        "best_effort_targets[0].selector",
    ),
    ("initial_bandwidth: 100", "namespace: {v}", "best_effort_targets[0].namespace"),
    ("initial_bandwidth: 100", "tc: {{device: {v}}}", "best_effort_targets[0].tc.device"),
    ("initial_bandwidth: 100", "tc: {{device: e, netns: {v}}}", "best_effort_targets[0].tc.netns"),
    (
        "initial_bandwidth: 100",
        "initial_bandwidth: 100\nkubernetes: {{lease_name: {v}}}",
        "kubernetes.lease_name",
    ),
    (
        "initial_bandwidth: 100",
        "initial_bandwidth: 100\nkubernetes: {{lease_namespace: {v}}}",
        "kubernetes.lease_namespace",
    ),
    (
        "initial_bandwidth: 100",
        "initial_bandwidth: 100\nkubernetes: {{mode: {v}}}",
        "kubernetes.mode",
    ),
    (
        "initial_bandwidth: 100",
        "initial_bandwidth: 100\nmetrics: {{listen: {v}}}",
        "metrics.listen",
    ),
]


@pytest.mark.parametrize(("old", "new", "path"), NAME_FIELDS)
@pytest.mark.parametrize("bad", HOSTILE_TEXT)
def test_names_refuse_control_and_format_characters(
    old: str, new: str, path: str, bad: str
) -> None:
    value = yaml.safe_dump("ok" + bad + "x", default_style='"').strip()  # escaped YAML
    msg = refused(GOOD.replace(old, new.format(v=value), 1))
    assert f": {path}: " in msg, msg
    assert msg.isprintable(), msg  # the message itself shows the character escaped


def test_a_huge_name_gives_a_short_line() -> None:
    msg = refused(GOOD.replace("robot-control", "r" * 1_000_000))
    assert msg == (
        'bad.yaml:2: critical_apps[0].name: must be at most 253 characters, got "'
        + "r" * 80
        + '"... (1000000 characters)'
    )


def test_decision_log_escapes_user_text() -> None:
    out = io.StringIO()
    log = DecisionLog(fmt="text", stream=out, wall_clock=lambda: 0.0)
    evil = "tele\x1b[2J\nFAKE decrease\u202e"
    decision = Decision(
        now_ns=0,
        action="decrease",
        limits={Scope(evil): 80},
        previous={Scope(evil): 100},
        reasons=(f"{evil} jitter_iqr 2.00 ms > 1.00 ms",),
        signals=(),
        no_data=(),
    )
    log.decision(decision, enforce_s=0.001, error="api said:\r\nHTTP 500\x07")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    line = text[:-1]
    assert line.isprintable()
    assert "tele\\x1b[2J\\nFAKE decrease\\u202e=100->80M" in line
    assert "ENFORCEMENT FAILED: api said:\\r\\nHTTP 500\\x07" in line


# ------------------------------------------------- config check and control agree

CORPUS = {
    "alias-bomb": _BOMB,
    "deep": "critical_apps: " + "[" * 5000 + "]" * 5000,
    "huge-int": GOOD.replace("port: 5201", "port: " + "9" * 5000),
    "huge-duration": GOOD + "control: {control_interval: 1e300s}\n",
    "spin": GOOD + "control: {control_interval: 1ns}\n",
    "tiny-window": GOOD + "control: {window: 1e-300s}\n",
    "huge-window": GOOD + "control: {window_size: 1000000000000000000000000000000}\n",
    "huge-bandwidth": GOOD + "policy: {max_bandwidth: 1000000000000000000000000000000}\n",
    "nan": GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: .nan"),
    "tiny-slo": GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: 1e-300"),
    "probe-interval": GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: 1.0\n    interval: 1ns"),
    "probe-size": GOOD.replace("max_jitter_ms: 1.0", "max_jitter_ms: 1.0\n    size: 20000"),
    "probe-timeout": GOOD + "control: {probe_timeout: 1ns}\n",
    "ansi-name": GOOD.replace("deployment: telemetry-upload", 'name: "t\\e[2J"\n    selector: a=b'),
    "bidi-selector": GOOD.replace(
        "deployment: telemetry-upload", 'name: t\n    selector: "a=\\u202eb"'
    ),
    "bad-listen": GOOD + "metrics: {listen: '::1:9108'}\n",
    "bad-lease": GOOD + "kubernetes: {lease_name: 'Not A Name'}\n",
    "qps": GOOD + "kubernetes: {qps: .inf}\n",
    "severity": GOOD + "policy: {severity_max_multiplier: 0.5}\n",
    "configmap-bomb": _in_configmap(GOOD + _BOMB.replace("a:", "x:", 1)),
    "not-utf8": "a: \udcff\n",
}
# TCP connect probes to a closed loopback port: refused at once, nothing to set up.
_TCP = GOOD.replace("protocol: UDP", "protocol: TCP")
EDGES = {
    "ranges-high": _TCP
    + textwrap.dedent(
        """\
        control: {probe_interval: 60s, control_interval: 60s, window: 1h, probe_timeout: 60s}
        policy: {decrease_cooldown: 24h, increase_interval: 24h, usage_window: 1h,
                 max_bandwidth: 1000000, severity_max_multiplier: 100}
        kubernetes: {qps: 1e9, concurrency: 1024}
        metrics: {listen: "127.0.0.1:0"}
        """
    ),
    "ranges-low": _TCP.replace("initial_bandwidth: 100", "initial_bandwidth: 1").replace(
        "max_jitter_ms: 1.0", "max_jitter_ms: 0.000001\n    interval: 10ms"
    )
    + textwrap.dedent(
        """\
        control: {probe_interval: 100us, control_interval: 10ms, window_size: 65536,
                  probe_timeout: 1ms}
        policy: {decrease_cooldown: 1ms, increase_interval: 1ms, usage_window: 1ms,
                 min_bandwidth: 1, max_bandwidth: 1, increase_step: 1}
        kubernetes: {qps: 0.001, concurrency: 1}
        metrics: {listen: "127.0.0.1:0"}
        """
    ),
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_check_and_control_refuse_the_same_files(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(CORPUS[name].encode("utf-8", "surrogateescape"))
    rc, err = _run(["config", "check", str(path)], capsys)
    assert rc == 2, err
    assert err.startswith(f"detnet config: error: {path}:"), err
    assert err.count("\n") == 1, err
    expected = err.removeprefix("detnet config: error: ")
    rc, err = _run(["control", "--config", str(path), "--dry-run", "--duration", "1s"], capsys)
    assert rc == 2, err
    assert err == f"detnet control: error: {expected}"


@pytest.mark.parametrize("name", sorted(EDGES))
def test_check_and_control_accept_the_same_files(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(EDGES[name])
    rc, err = _run(["config", "check", str(path)], capsys)
    assert rc == 0, err
    # control builds its engine, policy, loop and server from the same file and runs.
    rc, err = _run(["control", "--config", str(path), "--dry-run", "--duration", "200ms"], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------- fuzzing, as a class

_FUZZ = settings(
    max_examples=150,
    deadline=None,  # bounded by the caps, not by a clock; tests never assert time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _one_line(exc: ConfigError, source: str) -> str:
    message = str(exc)
    assert "\n" not in message, message[:300]
    assert "\r" not in message, message[:300]
    assert len(message) < 1000, message[:300]
    assert message.startswith(source), message
    return message


def _outcome(text: str) -> Config | str:
    """A Config, or the ConfigError's one-line message; any other exception fails."""
    try:
        return parse_config(text, source="fuzz.yaml")
    except ConfigError as exc:
        error = exc
    return _one_line(error, "fuzz.yaml")


@_FUZZ
@given(st.text())
def test_arbitrary_text(text: str) -> None:
    _outcome(text)


@_FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        error = exc
    else:
        return
    _one_line(error, str(path))


def _dump(tree: Any) -> str:
    return yaml.dump(tree, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


_KEYS = st.sampled_from(
    [
        "critical_apps",
        "best_effort_targets",
        "control",
        "policy",
        "kubernetes",
        "metrics",
        "name",
        "host",
        "service",
        "port",
        "protocol",
        "mode",
        "max_jitter_ms",
        "interval",
        "size",
        "deployment",
        "selector",
        "namespace",
        "initial_bandwidth",
        "tc",
        "device",
        "window",
        "window_size",
        "step_down",
        "severity_multiplier_enabled",
        "kind",
        "apiVersion",
        "data",
        "critical-apps.yaml",
    ]
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["ConfigMap", "v1", "udp", "TCP", "10ms", "1e300s", "1ns", "127.0.0.1"])
)
_TREES = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_KEYS | st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=40,
)


@_FUZZ
@given(_TREES)
def test_arbitrary_structures(tree: Any) -> None:
    _outcome(_dump(tree))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


_BASE = yaml.safe_load(
    GOOD
    + textwrap.dedent(
        """\
        control: {probe_interval: 10ms, window: 2s, step_down: 0.2}
        policy: {decrease_cooldown: 1s, min_bandwidth: 10, max_bandwidth: 500}
        kubernetes: {qps: 10, lease_name: detnet}
        metrics: {listen: ":9108"}
        severity_multiplier_enabled: true
        """
    )
)


@_FUZZ
@given(st.data(), st.booleans())
def test_valid_configs_with_one_value_replaced(data: st.DataObject, configmap: bool) -> None:
    # Mutations of a good config reach every validator, not just the first type check.
    doc = copy.deepcopy(_BASE)
    path = data.draw(st.sampled_from(list(_paths(doc))[1:]))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = data.draw(_TREES)
    text = _dump(doc)
    if configmap:
        text = _dump(
            {"apiVersion": "v1", "kind": "ConfigMap", "data": {"critical-apps.yaml": text}}
        )
    _outcome(text)
