"""ProbeRecorder: two-step replies, follow-ups, echoes, hardware and late TX stamps.

Rows are built as the native core delivers them (its ``REPLY_DTYPE``, both backends) and
fed to the recorder with explicit times; the expected figures are worked out by hand from
the formulas of docs/protocol.md ("Timestamp sources and labels").
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.engine import recorder as rmod
from detnet.engine.recorder import ProbeRecorder, Sample
from detnet.engine.ring import FLAG_DUP, FLAG_KERNEL, FLAG_RECEIVED, FLAG_REORDERED
from detnet.native import _fallback

try:
    _core: ModuleType | None = importlib.import_module("detnet.native._core")
except ImportError:  # the extension is not built: the fallback alone is tested
    _core = None

BACKENDS = [
    pytest.param(_fallback, id="python"),
    pytest.param(
        _core,
        id="cython",
        marks=pytest.mark.skipif(_core is None, reason="Cython extension not built"),
    ),
]

S = 1_000_000_000
MS = 1_000_000
BASE = 1_764_000_000 * S  # our CLOCK_REALTIME
REFL = BASE + 2 * MS  # the reflector's clock runs 2 ms ahead of ours


def _recorder(samples: list[Sample] | None = None, *, tracker: int = 16) -> ProbeRecorder:
    return ProbeRecorder(
        name="t",
        timeout_ns=S,
        capacity=64,
        tracker_capacity=tracker,
        on_sample=None if samples is None else samples.append,
    )


def _send(rec: ProbeRecorder, n: int = 1, *, kernel: bool = True, hw: bool = False) -> None:
    """Probes next_seq.. sent 1 ms apart from BASE + seq ms (kernel stamp 10 ns later,
    hardware 5 ns later)."""
    seqs = np.arange(rec.next_seq, rec.next_seq + n, dtype=np.int64)
    user = BASE + seqs * MS
    rec.on_sent(
        now_ns=0,
        offset_ns=0,
        user_tx_ns=user,
        kernel_tx_ns=user + 10 if kernel else np.zeros(n, np.int64),
        hw_tx_ns=user + 5 if hw else None,
    )


def _row(backend: ModuleType, seq: int, kind: int, **fields: int) -> np.ndarray:
    """A reply row of probe ``seq``: received 600 ns (user) / 500 ns (kernel) after it was
    sent, the reflector's RX 100 ns and its user TX 150 ns into its turnaround."""
    row = np.zeros(1, backend.REPLY_DTYPE)
    sent = BASE + seq * MS
    values: dict[str, int] = {
        "seq": seq,
        "kind": kind,
        "user_rx_ns": sent + 600,
        "kernel_rx_ns": sent + 500,
        "refl_rx_ns": REFL + seq * MS + 100,
        "refl_tx_ns": REFL + seq * MS + 150,
    }
    if kind in (backend.KIND_ECHO, backend.KIND_FOLLOWUP):
        values.update(refl_rx_ns=0, refl_tx_ns=0)
    if kind == backend.KIND_FOLLOWUP:
        values.update(user_rx_ns=0, kernel_rx_ns=0)
    values.update(fields)
    for name, value in values.items():
        row[0][name] = value
    return row


def _stamp(backend: ModuleType, of: int, refl_tx_kernel: int | None) -> dict[str, int]:
    """Row fields carrying the reflector's kernel TX of reply ``of`` (None: LOST)."""
    if refl_tx_kernel is None:
        return {"followup_source": backend.FOLLOWUP_LOST, "followup_seq": of}
    return {
        "followup_source": backend.FOLLOWUP_KERNEL,
        "followup_seq": of,
        "refl_tx_kernel_ns": refl_tx_kernel,
    }


def _feed(rec: ProbeRecorder, rows: list[np.ndarray], now: int = 1) -> None:
    for r in rows:
        rec.record_native(r, now_ns=now, offset_now_ns=0)


def _records(rec: ProbeRecorder) -> list[tuple[int, float | None, int]]:
    """(seq, RTT or None when lost, flags) of every record."""
    snap = rec.ring.snapshot()
    rtt = [None if math.isnan(x) else x for x in snap.rtt_ns.tolist()]
    return list(zip(snap.seq.tolist(), rtt, snap.flags.tolist(), strict=True))


def test_recorder_kinds_are_the_native_ones() -> None:
    for backend in (_fallback, _core):
        if backend is None:
            continue
        assert (rmod.KIND_REPLY, rmod.KIND_REPLY_2STEP, rmod.KIND_FOLLOWUP, rmod.KIND_ECHO) == (
            backend.KIND_REPLY,
            backend.KIND_REPLY_2STEP,
            backend.KIND_FOLLOWUP,
            backend.KIND_ECHO,
        )
        assert (rmod.FOLLOWUP_NONE, rmod.FOLLOWUP_KERNEL) == (
            backend.FOLLOWUP_NONE,
            backend.FOLLOWUP_KERNEL,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stamp_in_the_next_reply_makes_the_rtt_kernel_to_kernel(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec, 2)
    two = backend.KIND_REPLY_2STEP
    _feed(rec, [_row(backend, 0, two)])
    assert rec.ring.total == 0
    assert rec.awaiting_stamps == 1
    # Reply 1 carries reply 0's kernel TX stamp: 170 ns into the turnaround (20 ns after
    # the user-space read before sendmmsg).
    _feed(rec, [_row(backend, 1, two, **_stamp(backend, 0, REFL + 170))])
    assert _records(rec) == [(0, 500 - 10 - 70, FLAG_RECEIVED | FLAG_KERNEL)]
    assert rec.awaiting_stamps == 1
    assert rec.timestamp_source == "kernel-2step"
    (s,) = samples
    assert (s.rtt_ns, s.user_rtt_ns, s.timestamp_source) == (420, 600 - 70, "kernel-2step")
    assert (s.fwd_ns, s.back_ns) == (2 * MS + 100 - 10, 500 - 2 * MS - 170)
    # A follow-up packet carries reply 1's.
    _feed(rec, [_row(backend, 1, backend.KIND_FOLLOWUP, **_stamp(backend, 1, REFL + MS + 160))])
    assert [r[:2] for r in _records(rec)] == [(0, 420.0), (1, 430.0)]
    assert rec.awaiting_stamps == 0
    assert rec.totals().received == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lost_stamp_records_the_reply_one_step_at_once(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec)
    _feed(rec, [_row(backend, 0, backend.KIND_REPLY_2STEP)])
    _feed(rec, [_row(backend, 0, backend.KIND_FOLLOWUP, **_stamp(backend, 0, None))])
    assert _records(rec) == [(0, 500 - 10 - 50, FLAG_RECEIVED | FLAG_KERNEL)]
    assert samples[0].timestamp_source == "kernel"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stamp_that_never_comes_settles_one_step_when_due(backend) -> None:
    rec = _recorder()
    rec.settle_ns = 30 * MS
    _send(rec)
    _feed(rec, [_row(backend, 0, backend.KIND_REPLY_2STEP)], now=S)
    rec.sweep(S + 30 * MS - 1)
    assert rec.ring.total == 0
    rec.sweep(S + 30 * MS)
    assert [r[:2] for r in _records(rec)] == [(0, 440.0)]
    assert rec.timestamp_source == "kernel"
    assert rec.awaiting_stamps == 0
    # A stamp after that changes nothing.
    _feed(rec, [_row(backend, 0, backend.KIND_FOLLOWUP, **_stamp(backend, 0, REFL + 170))])
    assert [r[:2] for r in _records(rec)] == [(0, 440.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stamp_that_overtakes_its_reply_is_kept_for_it(backend) -> None:
    rec = _recorder()
    _send(rec, 2)
    two = backend.KIND_REPLY_2STEP
    # Reply 1 (carrying 0's stamp) arrives before reply 0.
    _feed(rec, [_row(backend, 1, two, **_stamp(backend, 0, REFL + 170))])
    _feed(rec, [_row(backend, 0, two)])
    assert _records(rec) == [(0, 420.0, FLAG_RECEIVED | FLAG_KERNEL | FLAG_REORDERED)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stamp_for_a_reply_that_was_lost_is_not_used_for_another(backend) -> None:
    rec = _recorder()
    _send(rec, 3)
    two = backend.KIND_REPLY_2STEP
    # Reply 0 never arrives; reply 1 carries its stamp, reply 2 carries reply 1's.
    _feed(rec, [_row(backend, 1, two, **_stamp(backend, 0, REFL + 170))])
    _feed(rec, [_row(backend, 2, two, **_stamp(backend, 1, REFL + MS + 160))])
    assert [r[:2] for r in _records(rec)] == [(1, 430.0)]
    rec.sweep(2 * S)  # reply 0 is lost at its timeout, then reply 2 settles one-step
    assert [r[:2] for r in _records(rec)] == [(1, 430.0), (0, None), (2, 440.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_duplicate_of_a_waiting_reply_flags_its_record(backend) -> None:
    rec = _recorder()
    _send(rec)
    two = backend.KIND_REPLY_2STEP
    _feed(rec, [_row(backend, 0, two), _row(backend, 0, two)])
    _feed(rec, [_row(backend, 0, backend.KIND_FOLLOWUP, **_stamp(backend, 0, REFL + 170))])
    assert _records(rec) == [(0, 420.0, FLAG_RECEIVED | FLAG_KERNEL | FLAG_DUP)]
    assert rec.totals().duplicates == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_echo_has_no_turnaround_and_says_so(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec)
    _feed(rec, [_row(backend, 0, backend.KIND_ECHO)])
    assert _records(rec) == [(0, 490.0, FLAG_RECEIVED | FLAG_KERNEL)]
    (s,) = samples
    assert (s.timestamp_source, s.fwd_ns, s.back_ns) == ("kernel-echo", None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_echo_without_kernel_stamps_is_a_user_space_one(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec, kernel=False)
    _feed(rec, [_row(backend, 0, backend.KIND_ECHO)])
    assert samples[0].rtt_ns == 600
    assert samples[0].timestamp_source == "user"


@pytest.mark.parametrize("backend", BACKENDS)
def test_hardware_stamps_on_both_ends_are_used_together_or_not_at_all(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec, 2, hw=True)
    hw_rx = BASE + 480  # the NIC's clock: 475 ns after its TX stamp
    _feed(rec, [_row(backend, 0, backend.KIND_REPLY, hw_rx_ns=hw_rx)])
    _feed(rec, [_row(backend, 1, backend.KIND_REPLY)])  # this reply had no hardware stamp
    first, second = samples
    assert (first.rtt_ns, first.timestamp_source) == (475 - 50, "hardware")
    # The one-way delays compare with the reflector's software clock: software stamps.
    assert first.fwd_ns == 2 * MS + 100 - 10
    assert (second.rtt_ns, second.timestamp_source) == (440, "kernel")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_late_tx_stamp_reaches_its_probe_in_flight(backend) -> None:
    samples: list[Sample] = []
    rec = _recorder(samples)
    _send(rec, 2, kernel=False)
    late = np.zeros(3, backend.SENT_DTYPE)
    late["seq"] = [0, 1, 9]  # 9 was never sent
    late["kernel_tx_ns"] = [BASE + 10, 0, BASE + 99]
    late["hw_tx_ns"] = [0, BASE + MS + 5, 0]
    assert rec.on_late_tx(late) == 2
    _feed(rec, [_row(backend, 0, backend.KIND_REPLY)])
    assert samples[-1].timestamp_source == "kernel"
    assert samples[-1].rtt_ns == 440
    assert rec.on_late_tx(late[:1]) == 0  # finished: nothing to stamp


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_of_two_stamps_that_overtake_their_reply_counts(backend) -> None:
    # Reply 1's stamp reported twice before reply 1 itself: lost, then a kernel stamp. One
    # row at a time, and in a long batch whose replies the vectorised path takes first,
    # the first report counts (hypothesis found the two disagreeing: the last won here).
    two = backend.KIND_REPLY_2STEP
    rows = [_row(backend, 0, backend.KIND_REPLY) for _ in range(rmod.VECTOR_MIN_ROWS)]
    rows += [
        _row(backend, 1, backend.KIND_FOLLOWUP, **_stamp(backend, 1, None)),
        _row(backend, 0, two, **_stamp(backend, 1, REFL + MS + 170)),
        _row(backend, 1, two),
    ]
    got: list[list[Sample]] = [[], []]
    batch, single = _recorder(got[0]), _recorder(got[1])
    for rec in (batch, single):
        _send(rec, 2, hw=True)
    batch.record_native(np.concatenate(rows), now_ns=0, offset_now_ns=0)
    _feed(single, rows, now=0)
    for samples in got:
        assert [(s.seq, s.timestamp_source) for s in samples] == [(0, "kernel"), (1, "kernel")]


# --- a batch with rows of every kind equals the same rows one at a time ------------------
_kind = st.sampled_from(["reply", "two-step", "followup", "echo"])
_row_spec = st.tuples(
    _kind,
    st.integers(0, 40),  # seq (some never sent)
    st.one_of(st.none(), st.tuples(st.integers(0, 40), st.booleans())),  # a stamp, or LOST
    st.booleans(),  # a hardware RX stamp
)
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 12)),
        # Long batches too: from rmod.VECTOR_MIN_ROWS rows the vectorised path records them.
        # Half the batches have no echo and no hardware stamp, as a reflector sends them.
        st.tuples(st.just("rows"), st.lists(_row_spec, min_size=1, max_size=24), st.booleans()),
        st.tuples(st.just("sweep"), st.integers(0, 40)),
    ),
    max_size=25,
)


def _spec_row(backend: ModuleType, spec: tuple[Any, ...]) -> np.ndarray:
    kind_name, seq, stamp, hw = spec
    kind = {
        "reply": backend.KIND_REPLY,
        "two-step": backend.KIND_REPLY_2STEP,
        "followup": backend.KIND_FOLLOWUP,
        "echo": backend.KIND_ECHO,
    }[kind_name]
    fields: dict[str, int] = {"hw_rx_ns": BASE + seq * MS + 480} if hw else {}
    if kind == backend.KIND_FOLLOWUP and stamp is None:
        stamp = (seq, True)
    if stamp is not None and kind in (backend.KIND_REPLY_2STEP, backend.KIND_FOLLOWUP):
        of, lost = stamp
        if kind == backend.KIND_FOLLOWUP:
            seq = of
        fields.update(_stamp(backend, of, None if lost else REFL + of * MS + 170))
    return _row(backend, seq, kind, **fields)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=300, deadline=None)
@given(steps=_steps)
def test_a_mixed_batch_equals_its_rows_one_at_a_time(backend, steps) -> None:
    got: list[list[Sample]] = [[], []]
    batch, single = _recorder(got[0]), _recorder(got[1])
    now = 0
    for step in steps:
        if step[0] == "send":
            for rec in (batch, single):
                _send(rec, step[1], hw=True)
        elif step[0] == "sweep":
            now += step[1] * MS
            for rec in (batch, single):
                rec.sweep(now)
        else:
            specs = step[1]
            if step[2]:
                specs = [
                    ("two-step" if k == "echo" else k, seq, stamp, False)
                    for k, seq, stamp, _ in specs
                ]
            rows = [_spec_row(backend, spec) for spec in specs]
            batch.record_native(np.concatenate(rows), now_ns=now, offset_now_ns=0)
            _feed(single, rows, now=now)
    # The same records; within one batch a record may come earlier or later (a one-step
    # reply behind a stamp), so they are compared by probe.
    assert sorted(got[0], key=lambda s: s.seq) == sorted(got[1], key=lambda s: s.seq)
    assert sorted(_records(batch)) == sorted(_records(single))
    assert batch.totals() == single.totals()
    assert batch.awaiting_stamps == single.awaiting_stamps


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_two_step_batch_is_recorded_vectorised(backend, monkeypatch) -> None:
    rec = _recorder(tracker=64)
    calls: list[int] = []
    vectorised = rec._record_two_step

    def spy(rows: np.ndarray, **kw: int) -> None:
        calls.append(rows.shape[0])
        vectorised(rows, **kw)

    monkeypatch.setattr(rec, "_record_two_step", spy)
    n = rmod.VECTOR_MIN_ROWS
    _send(rec, n + 1)
    two = backend.KIND_REPLY_2STEP
    rows = [_row(backend, 0, two)] + [
        _row(backend, i, two, **_stamp(backend, i - 1, REFL + (i - 1) * MS + 170))
        for i in range(1, n + 1)
    ]
    rec.record_native(np.concatenate(rows), now_ns=1, offset_now_ns=0)
    assert calls == [n + 1]
    assert [r[1] for r in _records(rec)] == [420.0] * n  # all but the last have stamps
    assert rec.awaiting_stamps == 1
