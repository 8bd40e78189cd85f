"""`detnet probe` as a user runs it, against an in-process loopback reflector."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import numpy as np
import pytest

from detnet.engine.reflector import ReflectorConfig, ReflectorServer
from tests.helpers import DETNET, until

pytestmark = pytest.mark.usefixtures("native_backend")  # both backends, one run


@pytest.fixture
async def reflector():
    refl = ReflectorServer(ReflectorConfig(udp=("127.0.0.1", 0), tcp=("127.0.0.1", 0)))
    await refl.start()
    try:
        yield refl
    finally:
        await refl.close()


async def _detnet(*args: str, limit_s: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *DETNET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_stream_and_json_summary_agree(reflector):
    up = reflector.udp_address[1]
    rc, out, err = await _detnet(
        "probe",
        "--target", f"robot=udp://127.0.0.1:{up}",
        "--target", "gone=udp://127.0.0.1:9",
        "--interval", "2ms", "--timeout", "50ms",
        "--window", "10s", "--duration", "1s", "--stream", "--json",
    )  # fmt: skip
    assert rc == 0, err
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    records = [json.loads(line) for line in lines[:-1]]
    assert set(records[0]) == {
        "target", "seq", "sent_ns", "rtt_ns", "user_rtt_ns", "fwd_ns", "back_ns", "lost",
        "timestamp_source",
    }  # fmt: skip
    assert summary["backend"] in ("cython", "python")
    for name, t in summary["targets"].items():
        mine = [r for r in records if r["target"] == name]
        rtt = np.array([r["rtt_ns"] for r in mine if not r["lost"]], dtype=np.float64)
        assert t["sent"] == len(mine)
        assert t["lost"] == sum(r["lost"] for r in mine)
        assert t["received"] == len(rtt)
        if len(rtt):
            q1, q3 = np.percentile(rtt, [25, 75])
            assert t["jitter_iqr_ns"] == q3 - q1
            assert t["rtt_ns"]["p99"] == np.percentile(rtt, 99)
            assert t["rtt_ns"]["min"] == rtt.min()
    assert summary["targets"]["robot"]["lost"] == 0
    assert summary["targets"]["robot"]["sent"] > 100
    assert summary["targets"]["gone"]["lost"] == summary["targets"]["gone"]["sent"] > 0


async def test_metrics_endpoint_while_probing(reflector):
    up = reflector.udp_address[1]
    proc = await asyncio.create_subprocess_exec(
        *DETNET, "probe", "--target", f"robot=udp://127.0.0.1:{up}", "--interval", "5ms",
        "--duration", "3s", "--metrics", "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        url = line.split("metrics on ", 1)[1].strip()

        async def scrape() -> str:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            return str(body.decode())

        async def probed() -> bool:  # the first probes were sent
            pattern = r'^detnet_probes_sent_total\{protocol="udp",target="robot"\} (\S+)$'
            sent = re.search(pattern, await scrape(), re.M)
            return sent is not None and float(sent[1]) > 0

        await until(probed, what="probes sent, on /metrics", interval_s=0.05)
        text = await scrape()
        assert 'detnet_probes_sent_total{protocol="udp",target="robot"}' in text
        assert "detnet_probe_rtt_seconds_bucket" in text
        await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "at least one --target"),
        (["--target", "x=udp://no-such-host.invalid:1", "--duration", "1s"], "cannot resolve"),
        (["--target", "x=ftp://h:1"], "scheme"),
        (["--target", "x=udp://127.0.0.1:9", "--interval", "fast"], "interval"),
        (["--target", "x=udp://127.0.0.1:9", "--window", "0"], "window"),
        (["--target", "x=udp://127.0.0.1:9", "--hmac-key-file", "/nonexistent/k"], "hmac"),
        (["--target", "x=udp://127.0.0.1:9", "--metrics", "nope"], "HOST:PORT"),
        (["--target", "x=udp://:9"], "the host is missing"),
        # The codec's bound, checked once by Target: a UDP and a TCP echo target alike.
        (["--target", "x=udp://127.0.0.1:9", "--size", "20"], "probe size 20 is not in 48..9000"),
        (
            ["--target", "x=tcp://127.0.0.1:9?mode=echo", "--size", "20"],
            "probe size 20 is not in 48..9000",
        ),
        (["--target", "x=udp://127.0.0.1:9", "--size", "9001"], "probe size 9001 is not in"),
    ],
)
async def test_bad_input_is_one_line_exit_2(args, message):
    rc, _out, err = await _detnet("probe", *args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


async def test_an_hmac_key_raises_the_size_floor(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"secret\n")
    rc, _out, err = await _detnet(
        "probe", "--target", "x=udp://127.0.0.1:9", "--hmac-key-file", str(key), "--size", "50"
    )
    assert rc == 2
    assert err == (
        "detnet probe: error: target x: probe size 50 is not in 64..9000 bytes "
        "(an HMAC key adds 16)\n"
    )


async def test_a_size_from_the_flags_is_checked_against_config_targets_too(tmp_path):
    cfg = tmp_path / "detnet.yaml"
    cfg.write_text(
        "critical_apps:\n"
        "  - {name: s, host: 127.0.0.1, port: 9, protocol: TCP, mode: echo, max_latency_ms: 5}\n"
        "best_effort_targets:\n  - {deployment: t}\n"
    )
    rc, _out, err = await _detnet("probe", "--config", str(cfg), "--size", "20")
    assert rc == 2
    assert err == "detnet probe: error: target s: probe size 20 is not in 48..9000 bytes\n"


async def test_config_supplies_targets_and_flags_override_them(reflector, tmp_path):
    up, tp = reflector.udp_address[1], reflector.tcp_address[1]
    cfg = tmp_path / "detnet.yaml"
    cfg.write_text(
        f"""
critical_apps:
  - {{name: robot-control, host: 127.0.0.1, port: {up}, protocol: UDP, max_jitter_ms: 1}}
  - {{name: safety-scanner, host: 127.0.0.1, port: {tp}, protocol: TCP, mode: echo,
      max_latency_ms: 10, size: 128}}
best_effort_targets:
  - {{deployment: telemetry-upload, namespace: factory}}
control: {{probe_interval: 50ms}}
"""
    )
    rc, out, err = await _detnet(
        "probe", "--config", str(cfg), "--interval", "5ms", "--duration", "1s",
        "--stream", "--json",
    )  # fmt: skip
    assert rc == 0, err
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary["targets"]) == {"robot-control", "safety-scanner"}
    assert summary["targets"]["safety-scanner"]["protocol"] == "tcp"
    records = [json.loads(line) for line in lines[:-1]]
    robot = [r for r in records if r["target"] == "robot-control"]
    # --interval 5ms wins over the config's 50ms: about 200 probes in 1 s, not 20.
    assert len(robot) > 60
    assert all(not r["lost"] for r in robot)


async def _late_reader(*args: str, wait_s: float) -> tuple[int, list[str], str]:
    """Run `detnet probe` with a reader that reads nothing for ``wait_s`` (the pipe fills
    after a few hundred records), then everything."""
    proc = await asyncio.create_subprocess_exec(
        *DETNET, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.sleep(wait_s)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


@pytest.mark.parametrize("buffer", [65_536, 200])
async def test_a_late_stream_reader_never_bends_the_schedule(reflector, buffer):
    up = reflector.udp_address[1]
    rc, lines, err = await _late_reader(
        "probe", "--target", f"robot=udp://127.0.0.1:{up}", "--interval", "1ms",
        "--duration", "3s", "--stream", "--json", "--stream-buffer", str(buffer),
        wait_s=4.0,
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(lines[-1])
    t = summary["targets"]["robot"]
    records = lines[:-1]
    # Every send slot of the 3 s was served (the loop never blocked on the pipe); what
    # the reader could not take in time is dropped and counted, never a probe.
    slots = t["sent"] + t["skipped"]
    assert slots >= 2_900
    assert t["skipped"] <= slots // 10
    assert len(records) + summary["stream_dropped"] == t["sent"]
    if buffer == 200:
        assert summary["stream_dropped"] > 0
    else:
        assert summary["stream_dropped"] == 0
    assert t["foreign_replies"] == 0


async def test_the_stream_buffer_is_checked():
    rc, _, err = await _detnet(
        "probe", "--target", "r=udp://127.0.0.1:9", "--stream", "--stream-buffer", "0"
    )
    assert rc == 2
    assert err.strip().splitlines() == ["detnet probe: error: --stream-buffer 0: not in 1..4194304"]


def test_the_stream_buffer_default_is_the_streams():
    from detnet.controller.cli.probe import STREAM_BUFFER
    from detnet.engine.stream import DEFAULT_CAPACITY

    assert STREAM_BUFFER == DEFAULT_CAPACITY


async def test_a_target_that_never_answers_gets_a_reason(reflector, tmp_path):
    up = reflector.udp_address[1]
    key = tmp_path / "key"
    key.write_bytes(b"not the reflector's key\n")
    rc, _, err = await _detnet(
        "probe", "--target", f"robot=udp://127.0.0.1:{up}", "--target", "gone=udp://127.0.0.1:9",
        "--interval", "20ms", "--timeout", "50ms", "--duration", "0.5s", "--json",
    )  # fmt: skip
    assert rc == 0, err
    lines = err.strip().splitlines()
    (gone,) = [line for line in lines if "target gone" in line]
    assert gone.startswith("detnet probe: target gone (udp://127.0.0.1:9): no reply to ")
    assert "nothing came back" in gone
    assert not [line for line in lines if "target robot" in line]  # it answered
    # With a key the reflector does not hold, every probe is dropped there: say so.
    rc, _, err = await _detnet(
        "probe", "--target", f"robot=udp://127.0.0.1:{up}", "--hmac-key-file", str(key),
        "--interval", "20ms", "--timeout", "50ms", "--duration", "0.5s", "--json",
    )  # fmt: skip
    assert rc == 0, err
    (line,) = [x for x in err.strip().splitlines() if "target robot" in x]
    assert "does not match its key" in line


async def test_probe_and_reflect_read_one_key_file_alike(tmp_path):
    # The first release's `probe` stripped all whitespace and `reflect` only a newline:
    # with this file every probe was dropped as bad_hmac and `probe` reported 100 % loss.
    key = tmp_path / "key"
    key.write_bytes(b" secret \n")
    proc = await asyncio.create_subprocess_exec(
        *DETNET, "reflect", "--udp", "127.0.0.1:0", "--tcp", "127.0.0.1:0",
        "--hmac-key-file", str(key), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        ports = re.findall(r"(udp|tcp) 127\.0\.0\.1:(\d+)", line)
        assert len(ports) == 2, line
        udp, tcp = (port for _, port in ports)
        rc, out, err = await _detnet(
            "probe", "--target", f"u=udp://127.0.0.1:{udp}",
            "--target", f"t=tcp://127.0.0.1:{tcp}?mode=echo", "--hmac-key-file", str(key),
            "--interval", "20ms", "--timeout", "200ms", "--duration", "0.5s", "--json",
        )  # fmt: skip
    finally:
        proc.terminate()
        await proc.wait()
    assert rc == 0, err
    for name, target in json.loads(out)["targets"].items():
        assert target["sent"] > 0, name
        assert target["received"] == target["sent"], (name, err)
