"""ICMP echo probes on loopback: the raw socket here, the ping socket and the refusal in
network namespaces this test creates (``unshare -n``: ping_group_range is per namespace,
so the host's is never touched; the namespace ends with its process)."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from detnet import native
from tests.integration.test_native_timestamping import kernel_rx_stamps  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.usefixtures("kernel_rx_stamps"),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="raw ICMP sockets and network namespaces need root; CI is root"
    ),
]
needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="unshare (util-linux) and ip (iproute2) are needed for the namespace tests",
)


def _echo(probe: native.IcmpProbeSocket, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    sent = np.zeros(count, native.SENT_DTYPE)
    assert probe.send(first, count, sent) == count
    out = np.zeros(64, native.REPLY_DTYPE)
    rows = []
    while probe.echoes < count and select.select([probe.fileno()], [], [], 2.0)[0]:
        n = probe.recv(out)
        rows.append(out[:n].copy())
    return sent, (np.concatenate(rows) if rows else out[:0])


def _host_allows_ping_sockets() -> bool:
    with open("/proc/sys/net/ipv4/ping_group_range") as f:
        low, high = (int(x) for x in f.read().split())
    return low <= os.getegid() <= high


def test_auto_takes_the_socket_the_host_allows() -> None:
    probe = native.IcmpProbeSocket("127.0.0.1", session=1)
    try:
        assert probe.kind == ("ping" if _host_allows_ping_sockets() else "raw")
    finally:
        probe.close()


def test_raw_socket_echo_with_kernel_stamps_across_the_16_bit_wrap() -> None:
    probe = native.IcmpProbeSocket("127.0.0.1", session=2, size=100, kind="raw", ident=0x1234)
    try:
        assert (probe.kind, probe.ident) == ("raw", 0x1234)
        assert probe.kernel_tx
        sent, rows = _echo(probe, 65533, 6)
    finally:
        probe.close()
    assert sorted(rows["seq"].tolist()) == list(range(65533, 65539))
    assert (rows["kind"] == native.KIND_ECHO).all()
    assert (rows["size"] == 100).all()
    assert (rows["source"] == native.TS_KERNEL).all()
    tx = {int(s["seq"]): int(s["kernel_tx_ns"]) for s in sent}
    for row in rows:
        assert 0 < tx[int(row["seq"])] <= int(row["kernel_rx_ns"]) <= int(row["user_rx_ns"])
    assert probe.stats()["foreign"] == probe.stats()["invalid"] == 0


def test_raw_sockets_skip_other_processes_echo_replies() -> None:
    mine = native.IcmpProbeSocket("127.0.0.1", session=3, kind="raw", ident=0x1111)
    theirs = native.IcmpProbeSocket("127.0.0.1", session=3, kind="raw", ident=0x2222)
    try:
        _, rows = _echo(theirs, 0, 4)
        assert len(rows) == 4
        _, rows = _echo(mine, 10, 2)
        assert rows["seq"].tolist() == [10, 11]
        # Each raw socket sees every echo reply; the other identifier's are not foreign.
        assert mine.stats()["other_ident"] == 4
        assert mine.stats()["foreign"] == 0
    finally:
        mine.close()
        theirs.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_icmpv6_raw_echo() -> None:
    probe = native.IcmpProbeSocket("::1", session=4, kind="raw")
    try:
        assert probe.family == socket.AF_INET6
        _, rows = _echo(probe, 7, 3)
    finally:
        probe.close()
    assert rows["seq"].tolist() == [7, 8, 9]
    assert (rows["kind"] == native.KIND_ECHO).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="icmp probe size"):
        native.IcmpProbeSocket("127.0.0.1", session=1, size=55)
    with pytest.raises(ValueError, match="kind"):
        native.IcmpProbeSocket("127.0.0.1", session=1, kind="udp")
    with pytest.raises(ValueError, match="16 bits"):
        native.IcmpProbeSocket("127.0.0.1", session=1, kind="raw", ident=70000)


# --- in network namespaces of our own -------------------------------------------------

_SCRIPT = """
import json, select, sys
import numpy as np
from detnet import native
out = {"backend": native.BACKEND}
try:
    probe = native.IcmpProbeSocket("127.0.0.1", session=9, kind=sys.argv[1])
except native.IcmpNotPermitted as exc:
    out["refused"] = str(exc)
else:
    sent = np.zeros(3, native.SENT_DTYPE)
    probe.send(65535, 3, sent)
    rows = np.zeros(8, native.REPLY_DTYPE)
    n = 0
    while n < 3 and select.select([probe.fileno()], [], [], 2.0)[0]:
        n += probe.recv(rows[n:])
    out.update(
        kind=probe.kind, ident=probe.ident, kernel_tx=probe.kernel_tx,
        tx=[int(x) for x in sent["kernel_tx_ns"]], seq=[int(x) for x in rows["seq"][:n]],
        rx=[int(x) for x in rows["kernel_rx_ns"][:n]], kinds=[int(x) for x in rows["kind"][:n]],
        stats=probe.stats(),
    )
    probe.close()
print(json.dumps(out))
"""


def _in_netns(kind: str, *, group_range: str, drop_net_raw: bool = False) -> dict[str, object]:
    """Run _SCRIPT in a new network namespace with ping_group_range set as given."""
    prefix = "setpriv --bounding-set -net_raw " if drop_net_raw else ""
    shell = (
        "ip link set lo up && "
        f"echo '{group_range}' > /proc/sys/net/ipv4/ping_group_range && "
        f'exec {prefix}"$0" -c "$1" "$2"'
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", shell, sys.executable, _SCRIPT, kind],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    assert result["backend"] == native.BACKEND  # the namespace ran the backend under test
    return result


@needs_unshare
def test_ping_socket_in_a_namespace_that_allows_it() -> None:
    gid = os.getegid()
    result = _in_netns("auto", group_range=f"{gid} {gid}")
    assert result["kind"] == "ping"
    assert result["kernel_tx"] is True  # ping sockets give kernel TX stamps (verified here)
    assert result["seq"] == [65535, 65536, 65537]
    assert result["kinds"] == [native.KIND_ECHO] * 3
    tx, rx = result["tx"], result["rx"]
    assert isinstance(tx, list)
    assert isinstance(rx, list)
    assert all(0 < t <= r for t, r in zip(tx, rx, strict=True))


@needs_unshare
def test_ping_socket_refused_says_what_to_set() -> None:
    result = _in_netns("ping", group_range="1 0")
    message = str(result["refused"])
    assert f"include gid {os.getegid()}" in message
    assert "net.ipv4.ping_group_range" in message


@needs_unshare
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed")
def test_neither_socket_permitted_is_one_clear_line() -> None:
    result = _in_netns("auto", group_range="1 0", drop_net_raw=True)
    message = str(result["refused"])
    assert message.startswith("icmp: not permitted")
    assert "CAP_NET_RAW" in message
    assert "ping_group_range" in message
    assert "\n" not in message
