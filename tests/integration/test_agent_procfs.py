"""The /proc resolver (controller/agent/procfs.py) on a /proc-shaped tree of files whose
PIDs are real child processes (so pidfds, exits and poll are real): bounded scans,
re-resolution when a process exits, the top-process rule, unreadable entries counted,
and every descriptor closed. The real /proc and real cgroups: test_agent_node.py."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from detnet.controller.agent.procfs import ProcResolver

UID_A = "88f6f4e3-59c0-4ce8-9ecf-391c8b5a60ad"
UID_B = "fd698699-eabf-4c23-92ef-cf0bbdb78261"
SHIM = 1  # the parent of a container's top process: outside every pod


def cgroup(uid: str, container: str = "a" * 64) -> str:
    slice_ = f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    return (
        f"0::/kubepods.slice/kubepods-besteffort.slice/{slice_}/cri-containerd-{container}.scope\n"
    )


def net_dev(tx: int, rx: int = 0) -> bytes:
    return (
        b"Inter-|   Receive  |  Transmit\n face |bytes packets|bytes packets\n"
        b"    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n"
        + f"  eth0: {rx} 1 0 0 0 0 0 0 {tx} 1 0 0 0 0 0 0\n".encode()
    )


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[subprocess.Popen[bytes]] = []

    def entry(self, pid: int, cg: str, *, ppid: int = SHIM, tx: int = 0) -> int:
        d = self.root / str(pid)
        (d / "net").mkdir(parents=True, exist_ok=True)
        (d / "cgroup").write_text(cg)
        (d / "stat").write_text(f"{pid} (sleep (x)) S {ppid} {pid} {pid} 0 -1\n")
        (d / "net" / "dev").write_bytes(net_dev(tx))
        return pid

    def process(self, cg: str, *, ppid: int = SHIM, tx: int = 0) -> int:
        child = subprocess.Popen(["sleep", "30"])
        self.children.append(child)
        return self.entry(child.pid, cg, ppid=ppid, tx=tx)

    def set_tx(self, pid: int, tx: int) -> None:
        with open(self.root / str(pid) / "net" / "dev", "r+b") as f:  # same inode
            f.truncate(0)
            f.write(net_dev(tx))

    def kill(self, pid: int) -> None:
        for c in self.children:
            if c.pid == pid:
                c.kill()
                c.wait()

    def close(self) -> None:
        """End every process this fake started (by its own pid) that is still running."""
        for c in self.children:
            if c.poll() is None:
                c.kill()
                c.wait()


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[FakeProc]:
    fake = FakeProc(tmp_path / "proc")
    fake.root.mkdir()
    try:
        yield fake
    finally:
        fake.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_resolves_a_pod_and_rereads_its_counters(proc: FakeProc) -> None:
    for noise in range(2, 40):
        proc.entry(noise, "0::/system.slice/containerd.service\n")
    pid = proc.process(cgroup(UID_A), tx=1000)
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A})
    assert r.unresolved == {UID_A}
    assert r.scan(0) > 0
    assert r.pid_of(UID_A) == pid
    t1, data1, source1 = r.read()[UID_A]
    assert data1 == net_dev(1000)
    proc.set_tx(pid, 5000)
    t2, data2, source2 = r.read()[UID_A]
    assert data2 == net_dev(5000)  # the same open file, read again from its start
    assert source2 == source1
    assert t2 >= t1
    r.close()


def test_a_scan_examines_at_most_its_budget(proc: FakeProc) -> None:
    for noise in range(2, 102):
        proc.entry(noise, "0::/\n")
    pid = proc.process(cgroup(UID_A))  # a real PID: above the noise
    assert pid > 101
    r = ProcResolver(proc=str(proc.root), scan_budget=40)
    r.want({UID_A})
    assert r.scan(0) == 40
    assert r.scan(1) == 40
    assert r.pid_of(UID_A) is None
    assert r.scan(2) == 21  # the last 20 noise entries, then the pod
    assert r.pid_of(UID_A) == pid
    assert r.scan(3) == 0  # nothing left to resolve: no scanning
    assert r.examined == 101
    r.close()


def test_an_unfound_pod_is_looked_for_again_after_rescan_or_new_demand(proc: FakeProc) -> None:
    proc.entry(2, "0::/\n")
    r = ProcResolver(proc=str(proc.root), rescan_ns=1000)
    r.want({UID_A})
    assert r.scan(0) == 1
    assert r.scan(10) == 0  # a full pass found nothing: wait for the rescan
    assert r.scan(1010) == 1
    r.want({UID_A, UID_B})  # a new pod: look at once
    assert r.scan(1020) == 1
    assert r.passes == 3
    r.close()


def test_a_process_that_exits_is_replaced_by_another_of_the_pod(proc: FakeProc) -> None:
    first = proc.process(cgroup(UID_A, "a" * 64), tx=100)
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A})
    r.scan(0)
    assert r.pid_of(UID_A) == first
    source = r.read()[UID_A][2]
    second = proc.process(cgroup(UID_A, "b" * 64), tx=100)
    proc.kill(first)
    assert UID_A not in r.read()  # gone: unknown until resolved again
    assert r.errors["vanished"] == 1
    assert r.unresolved == {UID_A}
    r.scan(1)
    assert r.pid_of(UID_A) == second
    assert r.read()[UID_A][2] != source  # a new segment for the rates
    r.close()


def test_only_a_containers_top_process_is_chosen(proc: FakeProc) -> None:
    top = proc.process(cgroup(UID_A))
    # A child of the top process (maybe in a network namespace of its own): skipped,
    # although its PID comes first in the scan.
    child = proc.entry(2, cgroup(UID_A), ppid=top)
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A})
    r.scan(0)
    assert r.pid_of(UID_A) == top != child
    r.close()


def test_unreadable_entries_are_counted_not_fatal(proc: FakeProc) -> None:
    bad = proc.root / "2"
    bad.mkdir()
    (bad / "cgroup").mkdir()  # reading a directory: EISDIR
    pid = proc.process(cgroup(UID_A))
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A})
    r.scan(0)
    assert r.errors["proc_unreadable"] == 1
    assert r.pid_of(UID_A) == pid
    r.forget(UID_A)  # the sampler's answer to a file that does not parse
    assert r.pid_of(UID_A) is None
    assert r.unresolved == {UID_A}
    r.scan(1)
    assert r.pid_of(UID_A) == pid
    r.close()


def test_a_net_dev_that_cannot_be_read_is_counted_and_resolved_again(proc: FakeProc) -> None:
    pid = proc.process(cgroup(UID_A))
    dev = proc.root / str(pid) / "net" / "dev"
    dev.unlink()
    os.mkfifo(dev)  # pread on it fails (ESPIPE), as an unreadable entry would
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A})
    r.scan(0)
    assert r.pid_of(UID_A) == pid
    assert r.read()[UID_A][1] is None
    assert r.errors["netdev_unreadable"] == 1
    assert r.pid_of(UID_A) is None  # resolved again at the next scan
    r.close()


def test_pods_no_longer_wanted_close_their_descriptors(proc: FakeProc) -> None:
    before = open_fds()
    pids = [proc.process(cgroup(uid)) for uid in (UID_A, UID_B)]
    r = ProcResolver(proc=str(proc.root))
    r.want({UID_A, UID_B})
    r.scan(0)
    assert [r.pid_of(UID_A), r.pid_of(UID_B)] == pids
    assert open_fds() == before + 2 * 2  # a pidfd and net/dev per pod
    r.want({UID_B})
    assert r.pid_of(UID_A) is None
    assert open_fds() == before + 2
    r.close()
    assert open_fds() == before


def test_an_unlistable_proc_is_counted(tmp_path: Path) -> None:
    r = ProcResolver(proc=str(tmp_path / "missing"))
    r.want({UID_A})
    assert r.scan(0) == 0
    assert r.errors["proc_unreadable"] == 1


def test_the_real_proc_finds_nothing_for_a_pod_that_is_not_here() -> None:
    r = ProcResolver(scan_budget=100_000)
    r.want({UID_A})
    assert r.scan(0) > 0
    assert r.unresolved == {UID_A}
    assert sum(r.errors.values()) == 0, r.errors
    r.close()
