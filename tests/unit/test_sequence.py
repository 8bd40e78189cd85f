"""Sequence tracking: loss, late, duplicates and reordering from sequence numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.sequence import (
    DUPLICATE,
    LATE,
    RECEIVED,
    REORDERED,
    SequenceTracker,
)

TIMEOUT = 100


def _send(tr: SequenceTracker, now: int, count: int = 1) -> None:
    tr.expire(now, reserve=count)
    tx = np.full(count, now, np.int64)
    tr.on_sent(
        first_seq=tr.next_seq,
        user_tx_ns=tx,
        kernel_tx_ns=np.zeros(count, np.int64),
        deadline_ns=now + TIMEOUT,
        offset_ns=0,
    )


def test_in_order_replies_are_received():
    tr = SequenceTracker(64)
    _send(tr, 0, 3)
    c = tr.on_replies(np.array([0, 1, 2], np.uint64))
    assert c.received.tolist() == [True] * 3
    assert not c.reordered.any()
    assert not c.duplicate.any()
    assert not c.late.any()
    assert tr.in_flight == 0


def test_loss_at_timeout_then_late_reply():
    tr = SequenceTracker(64)
    _send(tr, 0, 2)
    assert tr.expire(TIMEOUT - 1).seq.tolist() == []
    tr.on_replies(np.array([1], np.uint64))
    assert tr.expire(TIMEOUT + 1).seq.tolist() == [0]
    c = tr.on_replies(np.array([0], np.uint64))
    assert c.late.tolist() == [True]
    assert (tr.lost, tr.late, tr.received) == (1, 1, 1)


def test_duplicates_in_one_batch_and_across_batches():
    tr = SequenceTracker(64)
    _send(tr, 0, 2)
    c = tr.on_replies(np.array([0, 0, 1], np.uint64))
    assert c.received.tolist() == [True, False, True]
    assert c.duplicate.tolist() == [False, True, False]
    c = tr.on_replies(np.array([1], np.uint64))
    assert c.duplicate.tolist() == [True]
    assert tr.duplicates == 2


def test_reordering():
    tr = SequenceTracker(64)
    _send(tr, 0, 4)
    c = tr.on_replies(np.array([0, 2, 1, 3], np.uint64))
    assert c.reordered.tolist() == [False, False, True, False]
    assert tr.reordered == 1


def test_reply_for_a_reused_slot_is_late_not_received():
    tr = SequenceTracker(16)
    _send(tr, 0, 16)
    _send(tr, 1, 1)  # forces seq 0 out (its slot is reused by seq 16)
    assert tr.lost == 1
    c = tr.on_replies(np.array([0], np.uint64))
    assert c.late.tolist() == [True]


def test_expire_across_the_ring_wrap():
    tr = SequenceTracker(16)
    for t in range(40):
        _send(tr, t)  # slots are reused: the oldest pending probes are forced out as lost
    assert tr.lost == 40 - 16
    assert tr.expire(10_000).seq.tolist() == list(range(24, 40))  # wraps the ring
    assert tr.lost == 40
    assert tr.in_flight == 0


@given(
    st.integers(1, 60),
    st.lists(st.integers(0, 80), max_size=120),
)
def test_scalar_and_vector_paths_agree_and_match_a_reference(n, replies):
    vec, sca = SequenceTracker(128), SequenceTracker(128)
    for tr in (vec, sca):
        _send(tr, 0, n)
    c = vec.on_replies(np.array(replies, np.uint64))
    outcomes = [sca.on_reply(s) for s in replies]
    # Reference: first reply of a sent seq is received; later ones duplicates; unsent: late.
    seen: set[int] = set()
    top = -1
    for i, s in enumerate(replies):
        if s >= n:
            expect = LATE
        elif s in seen:
            expect = DUPLICATE
        else:
            expect = REORDERED if s < top else RECEIVED
            top = max(top, s)
            seen.add(s)
        assert outcomes[i] == expect
        assert bool(c.received[i]) == (expect in (RECEIVED, REORDERED))
        assert bool(c.reordered[i]) == (expect == REORDERED)
        assert bool(c.duplicate[i]) == (expect == DUPLICATE)
        assert bool(c.late[i]) == (expect == LATE)
    for field in ("received", "duplicates", "late", "reordered"):
        assert getattr(vec, field) == getattr(sca, field)
    first_missing = next((s for s in range(n) if s not in seen), n)
    assert vec.in_flight == sca.in_flight == n - first_missing


def test_sent_out_of_order_is_refused():
    tr = SequenceTracker(16)
    with pytest.raises(ValueError, match="in order"):
        tr.on_sent(
            first_seq=5,
            user_tx_ns=np.zeros(1, np.int64),
            kernel_tx_ns=np.zeros(1, np.int64),
            deadline_ns=0,
            offset_ns=0,
        )
