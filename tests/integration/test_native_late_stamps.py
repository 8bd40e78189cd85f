"""Late and missing kernel TX stamps, made real by a tbf qdisc on loopback.

Each scenario runs in a network namespace of its own (``unshare -n``; it ends with the
process, so nothing is left behind) whose ``lo`` is shaped: packets that wait in the
qdisc get their software TX stamp after the send call returned, packets it drops get
none. That is what a real NIC does with queues, and hardware stamps always arrive late.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

from detnet import native
from tests.integration.test_native_timestamping import kernel_rx_stamps  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.usefixtures("kernel_rx_stamps"),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("tc") is None,
        reason="needs root, unshare and tc (iproute2) for a shaped loopback in a namespace",
    ),
]

_PROBER = """
import json, select, socket
import numpy as np
from detnet import native
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("127.0.0.1", 0))  # bound and never read: no ICMP errors, no replies
probe = native.ProbeSocket("127.0.0.1", sink.getsockname()[1], session=1, size=1000)
sent = np.zeros(20, native.SENT_DTYPE)
n = probe.send(0, 20, sent)
on_time = [int(s) for s in sent["seq"][sent["kernel_tx_ns"] != 0]]
late = np.zeros(64, native.SENT_DTYPE)
rows = np.zeros(4, native.REPLY_DTYPE)
got = wakes = 0
while got + len(on_time) < n and select.select([probe.fileno()], [], [], 2.0)[0]:
    wakes += 1  # readable with no datagram: the error queue woke us
    probe.recv(rows)
    got += probe.take_tx_stamps(late[got:])
user = {int(s["seq"]): int(s["user_tx_ns"]) for s in sent}
print(json.dumps({
    "backend": native.BACKEND, "sent": n, "on_time": on_time, "wakes": wakes,
    "late": [int(x) for x in late["seq"][:got]],
    "ordered": all(int(r["kernel_tx_ns"]) >= user[int(r["seq"])] for r in late[:got]),
    "user_zero": bool((late["user_tx_ns"][:got] == 0).all()),
    "stats": probe.stats(),
}))
"""

_REFLECTOR = """
import json, select, socket
import numpy as np
from detnet import native
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 7000))  # a namespace of our own: the port is free
refl = native.Reflector(sock, two_step=True)
probe = native.ProbeSocket("127.0.0.1", sock.getsockname()[1], session=2, size=1000,
                           two_step=True, followup_wait_ns=WAIT_NS)
probe.send(7, 1, np.zeros(1, native.SENT_DTYPE))
assert select.select([refl.fileno()], [], [], 2.0)[0]
refl.serve()
after_reply = refl.stats()["stamped"]
due = refl.next_followup_ns()
woken = 0
while refl.stats()["stamped"] == after_reply and native.monotonic_ns() < due:
    if select.select([refl.fileno()], [], [], max(due - native.monotonic_ns(), 0) / 1e9)[0]:
        woken += 1
        refl.serve()
while native.monotonic_ns() < due:
    select.select([], [], [], (due - native.monotonic_ns()) / 1e9)
flushed = refl.flush()
rows = np.zeros(8, native.REPLY_DTYPE)
n = 0
while probe.received < 2 and select.select([probe.fileno()], [], [], 1.0)[0]:
    n += probe.recv(rows[n:])
print(json.dumps({
    "backend": native.BACKEND, "after_reply": after_reply, "woken": woken,
    "flushed": flushed, "stats": refl.stats(),
    "rows": [{k: int(r[k]) for k in ("kind", "seq", "followup_seq", "followup_source",
                                     "refl_tx_ns", "refl_tx_kernel_ns")} for r in rows[:n]],
}))
"""


_TBF = "tc qdisc add dev lo root tbf "
# htb with a 1-byte bfifo class for 1000-byte UDP datagrams (IP length 1028) from port
# 7000: the reflector's replies; requests and 64-byte follow-ups take the default class.
_DROP_REPLIES = " && ".join(
    [
        "tc qdisc add dev lo root handle 1: htb default 1 r2q 1000000",
        "tc class add dev lo parent 1: classid 1:1 htb rate 10gbit",
        "tc class add dev lo parent 1: classid 1:2 htb rate 10gbit",
        "tc qdisc add dev lo parent 1:2 handle 2: bfifo limit 1",
        "tc filter add dev lo parent 1: protocol ip u32 match ip sport 7000 0xffff"
        " match u16 1028 0xffff at 2 flowid 1:2",
    ]
)


def _run(script: str, *, qdisc: str) -> dict[str, Any]:
    shell = f'ip link set lo up && {qdisc} && exec "$0" -c "$1"'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", shell, sys.executable, script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["backend"] == native.BACKEND
    return result


def test_probe_tx_stamps_that_arrive_late_wake_the_reader_and_are_taken() -> None:
    # Room for two 1000-byte probes, then 40 ms each: the others wait in the queue, for
    # longer than even a slow (loaded, pure-Python) send loop takes to hand them over.
    result = _run(_PROBER, qdisc=_TBF + "rate 200kbit burst 2000 limit 100000")
    on_time, late = result["on_time"], result["late"]
    assert isinstance(on_time, list)
    assert isinstance(late, list)
    assert result["sent"] == 20
    assert sorted(on_time + late) == list(range(20))  # every probe's stamp, exactly once
    assert len(late) >= 10
    assert result["wakes"] >= 1  # the wake descriptor turned readable for the error queue
    assert result["ordered"] is True
    assert result["user_zero"] is True


def test_a_reflector_stamp_that_arrives_late_still_goes_back() -> None:
    # One packet's burst: the request passes, the reply waits ~0.4 s for tokens (longer
    # than even a slow reflector takes to answer), within the 1 s wait the probe asks for.
    script = _REFLECTOR.replace("WAIT_NS", "1_000_000_000")
    result = _run(script, qdisc=_TBF + "rate 20kbit burst 1100 limit 100000")
    stats = result["stats"]
    assert isinstance(stats, dict)
    assert result["after_reply"] == 0  # no stamp yet when serve() returned
    assert result["woken"] >= 1
    assert stats["stamped"] == 1
    assert stats["lost"] == 0
    rows = result["rows"]
    assert isinstance(rows, list)
    reply = next(r for r in rows if r["kind"] == native.KIND_REPLY_2STEP)
    followup = next(r for r in rows if r["kind"] == native.KIND_FOLLOWUP)
    assert reply["seq"] == followup["followup_seq"] == 7
    assert followup["followup_source"] == native.FOLLOWUP_KERNEL
    assert followup["refl_tx_kernel_ns"] > reply["refl_tx_ns"]  # stamped when it left


def test_a_reply_the_qdisc_drops_is_reported_lost() -> None:
    # The qdisc drops the reply before the driver could stamp it (the follow-up passes).
    result = _run(_REFLECTOR.replace("WAIT_NS", "20_000_000"), qdisc=_DROP_REPLIES)
    stats = result["stats"]
    assert isinstance(stats, dict)
    assert stats["replied"] == 1  # the kernel took it (UDP hides a qdisc drop)
    assert stats["stamped"] == 0
    assert stats["lost"] == 1
    assert result["flushed"] == 1
    rows = result["rows"]
    assert isinstance(rows, list)
    assert [r["kind"] for r in rows] == [native.KIND_FOLLOWUP]
    assert rows[0]["followup_seq"] == 7
    assert rows[0]["followup_source"] == native.FOLLOWUP_LOST
    assert rows[0]["refl_tx_kernel_ns"] == 0
