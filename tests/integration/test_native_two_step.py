"""Two-step stamps over loopback, and the four pairings of old and new peers.

"Old" peers are a v1-only codec written here from docs/protocol.md's version-1 rules
(not our code): an old reflector drops anything with an unknown version or flag or a
non-zero reserved field and ignores the fill; an old prober accepts only version-1
replies with known flags. No pairing may lose a probe.
"""

from __future__ import annotations

import hmac
import select
import socket
import struct
from typing import Any

import numpy as np
import pytest

from detnet import native
from tests.integration.test_native_timestamping import kernel_rx_stamps  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("kernel_rx_stamps")

KEY = b"two-step key"
V1 = struct.Struct("!IBBHIIQQQQ")
MAGIC = 0x44544E54


# --- the version-1 peer, from docs/protocol.md ------------------------------------------


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")[:16]


def v1_encode(
    *, session: int, seq: int, tx_ns: int, size: int, key: bytes | None, flags: int = 0, rx=0, tx=0
) -> bytes:
    flags |= 0x02 if key else 0
    buf = bytearray(size)
    V1.pack_into(buf, 0, MAGIC, 1, flags, size, session, 0, seq, tx_ns, rx, tx)
    if key:
        buf[-16:] = _mac(key, bytes(buf[:-16]))
    return bytes(buf)


def v1_parse(data: bytes, key: bytes | None) -> tuple[int, ...] | None:
    """The header fields of a valid version-1 packet, None where v1 says drop."""
    n = len(data)
    if n < 48 or n > 9000:
        return None
    magic, version, flags, length, session, reserved, *rest = V1.unpack_from(data)
    if magic != MAGIC or version != 1 or flags & ~0x03 or length != n or reserved:
        return None
    if flags & 0x02:
        if n < 64 or key is None or not hmac.compare_digest(_mac(key, data[:-16]), data[-16:]):
            return None
    elif key is not None:
        return None
    return (flags, session, *rest)


class OldReflector:
    """A version-1 reflector: answers each valid request with a same-size v1 reply."""

    def __init__(self, key: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.key = key
        self.seen: list[bytes] = []
        self.replied = 0

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        assert _readable(self.sock.fileno())
        while True:
            try:
                data, addr = self.sock.recvfrom(9001)
            except BlockingIOError:
                return
            self.seen.append(data)
            fields = v1_parse(data, self.key)
            if fields is None:
                continue
            flags, session, seq, tx_ns, rx, tx = fields
            if flags & 0x01 or rx or tx:
                continue
            self.sock.sendto(
                v1_encode(
                    session=session,
                    seq=seq,
                    tx_ns=tx_ns,
                    size=len(data),
                    key=self.key,
                    flags=0x01,
                    rx=native.realtime_ns(),
                    tx=native.realtime_ns(),
                ),
                addr,
            )
            self.replied += 1


class OldProber:
    """A version-1 prober: sends zero-filled requests, accepts only valid v1 replies."""

    def __init__(self, port: int, *, session: int, size: int, key: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.session, self.size, self.key = session, size, key
        self.accepted: list[int] = []
        self.rejected = 0

    def send(self, seq: int) -> None:
        self.sock.send(
            v1_encode(session=self.session, seq=seq, tx_ns=1, size=self.size, key=self.key)
        )

    def recv(self) -> None:
        while True:
            try:
                data = self.sock.recv(9001)
            except BlockingIOError:
                return
            fields = v1_parse(data, self.key)
            if fields is None or not fields[0] & 0x01 or fields[1] != self.session:
                self.rejected += 1
                continue
            self.accepted.append(fields[2])


# --- helpers ---------------------------------------------------------------------------


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 2.0)[0])


class NewReflector:
    def __init__(self, **kwargs: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.refl = native.Reflector(self.sock, **{"two_step": True, **kwargs})

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        assert _readable(self.refl.fileno())
        self.refl.serve()

    def close(self) -> None:
        self.refl.close()
        self.sock.close()


def _exchange(probe: native.ProbeSocket, serve: object, seqs: range) -> np.ndarray:
    """One probe at a time: send, let the reflector answer, read the answer."""
    sent = np.zeros(1, native.SENT_DTYPE)
    out = np.zeros(64, native.REPLY_DTYPE)
    rows = []
    for seq in seqs:
        assert probe.send(seq, 1, sent) == 1
        serve()  # type: ignore[operator]
        want = probe.received + 1
        while probe.received < want and _readable(probe.fileno()):
            n = probe.recv(out)
            rows.append(out[:n].copy())
    return np.concatenate(rows) if rows else out[:0]


def _drain(probe: native.ProbeSocket, want: int) -> np.ndarray:
    out = np.zeros(256, native.REPLY_DTYPE)
    rows = []
    while probe.received < want and _readable(probe.fileno()):
        n = probe.recv(out)
        rows.append(out[:n].copy())
    return np.concatenate(rows) if rows else out[:0]


# --- the four pairings ------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY])
def test_new_prober_old_reflector_is_one_step_and_loses_nothing(key: bytes | None) -> None:
    old = OldReflector(key)
    probe = native.ProbeSocket("127.0.0.1", old.port, session=5, size=96, key=key, two_step=True)
    try:
        assert probe.two_step
        rows = _exchange(probe, old.serve, range(20))
    finally:
        probe.close()
        old.sock.close()
    assert rows["seq"].tolist() == list(range(20))
    assert (rows["kind"] == native.KIND_REPLY).all()  # one-step, and labelled so
    assert (rows["refl_source"] == native.TS_UNKNOWN).all()
    assert (rows["followup_source"] == native.FOLLOWUP_NONE).all()
    # The old reflector saw the capability block in the fill, and ignored it.
    assert old.replied == 20
    assert all(struct.unpack_from("!I", d, 48)[0] == native.CAP_MAGIC for d in old.seen)


@pytest.mark.parametrize("key", [None, KEY])
def test_old_prober_new_reflector_gets_version_1_replies(key: bytes | None) -> None:
    new = NewReflector(key=key)
    old = OldProber(new.port, session=6, size=80, key=key)
    try:
        for seq in range(20):
            old.send(seq)
            new.serve()
            assert _readable(old.sock.fileno())
            old.recv()
        assert new.refl.flush(2**62) == 0  # nothing two-step was asked for: no follow-up
    finally:
        old.sock.close()
        stats = new.refl.stats()
        new.close()
    assert old.accepted == list(range(20))
    assert old.rejected == 0
    assert stats["two_step"] == 0
    assert stats["replied"] == 20


def test_old_prober_old_reflector() -> None:
    reflector = OldReflector()
    prober = OldProber(reflector.port, session=7, size=64)
    try:
        for seq in range(5):
            prober.send(seq)
            reflector.serve()
            assert _readable(prober.sock.fileno())
            prober.recv()
    finally:
        prober.sock.close()
        reflector.sock.close()
    assert prober.accepted == list(range(5))


@pytest.mark.parametrize(("key", "size"), [(None, 64), (None, 1400), (KEY, 80)])
def test_new_prober_new_reflector_is_two_step(key: bytes | None, size: int) -> None:
    new = NewReflector(key=key)
    probe = native.ProbeSocket("127.0.0.1", new.port, session=8, size=size, key=key, two_step=True)
    try:
        rows = _exchange(probe, new.serve, range(30))
        assert new.refl.pending_followups() == 1  # the last reply's stamp has no carrier
        assert new.refl.flush(2**62) == 1
        rows = np.concatenate([rows, _drain(probe, probe.received + 1)])
        sent_stats = new.refl.stats()
    finally:
        probe.close()
        new.close()
    replies = rows[rows["kind"] == native.KIND_REPLY_2STEP]
    followups = rows[rows["kind"] == native.KIND_FOLLOWUP]
    assert replies["seq"].tolist() == list(range(30))
    assert len(followups) == 1
    # Every reply's kernel TX stamp came back: in the next reply, or the last in a follow-up.
    stamped = rows[rows["followup_source"] == native.FOLLOWUP_KERNEL]
    assert sorted(stamped["followup_seq"].tolist()) == list(range(30))
    assert followups["followup_seq"].tolist() == [29]
    assert followups["size"].tolist() == [native.TWO_STEP_MIN_SIZE + (16 if key else 0)]
    assert sent_stats["carried"] == 29
    assert sent_stats["followups"] == 1
    assert sent_stats["lost"] == 0
    # The stamps are the reflector's kernel TX: after its user-space TX read, before our RX.
    by_seq = {int(r["seq"]): r for r in replies}
    for row in stamped:
        reply = by_seq[int(row["followup_seq"])]
        kernel_tx = int(row["refl_tx_kernel_ns"])
        assert int(reply["refl_rx_ns"]) <= int(reply["refl_tx_ns"]) <= kernel_tx
        assert kernel_tx <= int(reply["kernel_rx_ns"])
    assert (replies["refl_source"] == native.TS_KERNEL).sum() >= 29  # the first may warm up


# --- room, bounds and limits -------------------------------------------------------------


@pytest.mark.parametrize(("size", "key"), [(48, None), (63, None), (64, KEY), (79, KEY)])
def test_too_small_for_two_step_is_one_step(size: int, key: bytes | None) -> None:
    new = NewReflector(key=key)
    probe = native.ProbeSocket("127.0.0.1", new.port, session=9, size=size, key=key, two_step=True)
    try:
        assert not probe.two_step
        rows = _exchange(probe, new.serve, range(5))
    finally:
        probe.close()
        new.close()
    assert rows["seq"].tolist() == list(range(5))
    assert (rows["kind"] == native.KIND_REPLY).all()


def test_a_session_that_does_not_fit_gets_one_step() -> None:
    new = NewReflector(sessions=1)
    first = native.ProbeSocket("127.0.0.1", new.port, session=10, two_step=True)
    second = native.ProbeSocket("127.0.0.1", new.port, session=11, two_step=True)
    try:
        a = _exchange(first, new.serve, range(3))  # its last stamp stays pending
        b = _exchange(second, new.serve, range(3))
    finally:
        first.close()
        second.close()
        stats = new.refl.stats()
        new.close()
    assert (a["kind"] == native.KIND_REPLY_2STEP).all()
    assert b["seq"].tolist() == [0, 1, 2]
    assert (b["kind"] == native.KIND_REPLY).all()
    assert stats["untracked"] == 3


def test_followups_wait_as_the_request_asks() -> None:
    new = NewReflector(followup_wait_ns=50_000_000)
    probe = native.ProbeSocket(
        "127.0.0.1", new.port, session=12, size=200, two_step=True, followup_wait_ns=3_000_000
    )
    try:
        assert new.refl.next_followup_ns() == 0
        before = native.monotonic_ns()
        _exchange(probe, new.serve, range(1))
        after = native.monotonic_ns()
        due = new.refl.next_followup_ns()
        assert before + 3_000_000 <= due <= after + 3_000_000  # the request's 3 ms, not 50
        assert new.refl.flush(due - 1) == 0
        assert new.refl.pending_followups() == 1
        assert new.refl.flush(due) == 1
        assert new.refl.next_followup_ns() == 0
        rows = _drain(probe, probe.received + 1)
    finally:
        probe.close()
        new.close()
    assert rows["kind"].tolist() == [native.KIND_FOLLOWUP]
    assert rows["size"].tolist() == [64]  # never more than the 200-byte request it follows


def test_followups_take_a_token_from_the_source() -> None:
    new = NewReflector(rate_pps=0.001, burst=1)
    probe = native.ProbeSocket("127.0.0.1", new.port, session=13, two_step=True)
    try:
        _exchange(probe, new.serve, range(1))
        assert new.refl.flush(new.refl.next_followup_ns()) == 0  # the one token went
    finally:
        probe.close()
        stats = new.refl.stats()
        new.close()
    assert stats["replied"] == 1
    assert stats["followups_limited"] == 1
    assert stats["followups"] == 0


def test_reflector_without_two_step_answers_one_step() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    refl = native.Reflector(sock)
    probe = native.ProbeSocket("127.0.0.1", sock.getsockname()[1], session=14, two_step=True)
    try:
        assert not refl.two_step_enabled
        rows = _exchange(probe, lambda: (_readable(sock.fileno()), refl.serve()), range(3))
    finally:
        probe.close()
        sock.close()
    assert (rows["kind"] == native.KIND_REPLY).all()


def test_wake_descriptor_follows_data_and_the_error_queue() -> None:
    new = NewReflector()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    try:
        wake = new.refl.fileno()
        assert not select.select([wake], [], [], 0)[0]
        other.sendto(b"not a probe", ("127.0.0.1", new.port))
        assert select.select([wake], [], [], 2.0)[0]
        new.refl.serve()
        assert not select.select([wake], [], [], 0)[0]
        # A TX stamp nobody waits for (as a late one would be) wakes it, and is read.
        tx_stamp = struct.pack("=I", 1 << 1)  # SOF_TIMESTAMPING_TX_SOFTWARE
        new.sock.sendmsg([b"x"], [(socket.SOL_SOCKET, 37, tx_stamp)], 0, other.getsockname())
        assert select.select([wake], [], [], 2.0)[0]
        new.refl.serve()
        assert not select.select([wake], [], [], 0)[0]
    finally:
        other.close()
        new.close()


def test_a_full_session_still_carries_its_stamps() -> None:
    new = NewReflector()
    probe = native.ProbeSocket("127.0.0.1", new.port, session=15, two_step=True)
    try:
        assert probe.send(0, 64, np.zeros(64, native.SENT_DTYPE)) == 64  # 64 pending: full
        new.serve()
        rows = _drain(probe, 64)
        assert new.refl.pending_followups() == 64
        more = _exchange(probe, new.serve, range(64, 68))  # each carries one, takes one
    finally:
        probe.close()
        stats = new.refl.stats()
        new.close()
    assert len(rows) == 64
    assert (more["kind"] == native.KIND_REPLY_2STEP).all()
    assert more["followup_seq"].tolist() == [0, 1, 2, 3]
    assert stats["untracked"] == 0
