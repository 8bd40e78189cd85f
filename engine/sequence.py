"""Sequence tracking, sans-I/O: which probes are in flight, and what each reply means.

Probes are numbered by the sender and kept in fixed arrays indexed by ``seq % capacity``
(user/kernel TX stamps, deadline, clock offset, state). A batch of replies is joined to
them with numpy in one go and classified: received in time, duplicate, late (after the
timeout, or for a probe so old its slot was reused), reordered (a later probe's reply came
first, RFC 4737 style). ``expire(now)`` turns probes whose deadline passed into losses.
Time is passed in (``now_ns``, CLOCK_MONOTONIC); nothing here reads a clock or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]

# Slot states.
EMPTY, PENDING, RECEIVED, LOST, DROPPED = 0, 1, 2, 3, 4
# Outcomes of SequenceTracker.on_reply (RECEIVED as above).
REORDERED, DUPLICATE, LATE = 5, 6, 7


@dataclass(frozen=True)
class ReplyClasses:
    """How a batch of replies joined the probes in flight (masks over the batch)."""

    slots: I64  # seq % capacity of every reply
    received: BOOL  # first reply of a pending probe: a sample
    reordered: BOOL  # among received: came after a later probe's reply
    duplicate: BOOL
    late: BOOL  # the probe had already timed out, or its slot was reused


@dataclass(frozen=True)
class Expired:
    """Probes that reached their deadline without a reply."""

    seq: I64
    slots: I64


_NOTHING = Expired(np.empty(0, np.int64), np.empty(0, np.int64))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class SequenceTracker:
    """Probes in flight for one target, by sequence number."""

    def __init__(self, capacity: int) -> None:
        cap = _pow2(max(capacity, 16))
        self.capacity = cap
        self._mask = cap - 1
        self.seq = np.full(cap, -1, np.int64)
        self.user_tx_ns = np.zeros(cap, np.int64)
        self.kernel_tx_ns = np.zeros(cap, np.int64)
        self.hw_tx_ns = np.zeros(cap, np.int64)  # raw hardware TX stamps (the NIC's clock)
        self.deadline_ns = np.zeros(cap, np.int64)  # CLOCK_MONOTONIC
        self.offset_ns = np.zeros(cap, np.int64)  # realtime - monotonic at send
        self.ring_pos = np.full(cap, -1, np.int64)  # where the probe's record went
        self.state = np.zeros(cap, np.uint8)
        self.next_seq = 0  # the next sequence number to send
        self._oldest = 0  # every seq below this has finished (received, lost or dropped)
        self._max_received = -1
        # Counters over the tracker's life.
        self.sent = 0
        self.received = 0
        self.lost = 0
        self.late = 0
        self.duplicates = 0
        self.reordered = 0
        self.dropped = 0  # replies dropped because the clock stepped during the probe

    @property
    def in_flight(self) -> int:
        """Probes sent and not finished yet (upper bound: includes received ones above
        the oldest pending probe)."""
        return self.next_seq - self._oldest

    def on_sent(
        self,
        *,
        first_seq: int,
        user_tx_ns: I64,
        kernel_tx_ns: I64,
        deadline_ns: int,
        offset_ns: int,
        hw_tx_ns: I64 | None = None,
    ) -> None:
        """Record probes ``first_seq .. first_seq+len(user_tx_ns)-1`` as sent (TX stamps
        0 where there is none).

        The caller must first ``expire(now, reserve=count)`` so no pending slot is reused.
        """
        n = int(user_tx_ns.shape[0])
        if first_seq != self.next_seq:
            raise ValueError(f"probes must be sent in order: expected seq {self.next_seq}")
        if n == 0:
            return
        slots = self._index(first_seq, n)
        self.seq[slots] = np.arange(first_seq, first_seq + n, dtype=np.int64)
        self.user_tx_ns[slots] = user_tx_ns
        self.kernel_tx_ns[slots] = kernel_tx_ns
        self.hw_tx_ns[slots] = 0 if hw_tx_ns is None else hw_tx_ns
        self.deadline_ns[slots] = deadline_ns
        self.offset_ns[slots] = offset_ns
        self.ring_pos[slots] = -1
        self.state[slots] = PENDING
        self.next_seq = first_seq + n
        self.sent += n

    def expire(self, now_ns: int, *, reserve: int = 0) -> Expired:
        """Finish every pending probe whose deadline is before ``now_ns`` as lost; also the
        oldest ones when ``reserve`` new probes would otherwise reuse their slots."""
        start, end = self._oldest, self.next_seq
        if start == end or (
            # Fast path: the oldest outstanding probe is not due and no slot is needed.
            self.deadline_ns[start & self._mask] >= now_ns
            and end + reserve <= start + self.capacity
        ):
            return _NOTHING
        # Deadlines never decrease along the sequence: find the cut by binary search on
        # the (at most two) contiguous pieces of the ring, without copying.
        count = end - start
        s0 = start & self._mask
        first_len = min(count, self.capacity - s0)
        k = int(np.searchsorted(self.deadline_ns[s0 : s0 + first_len], now_ns, side="left"))
        if k == first_len and count > first_len:
            k += int(np.searchsorted(self.deadline_ns[: count - first_len], now_ns, "left"))
        k = max(k, min(count, end + reserve - self.capacity - start))
        if k <= 0:
            return _NOTHING
        slots = self._slots(start, k)
        pending = self.state[slots] == PENDING
        lost_slots = slots[pending]
        self.state[lost_slots] = LOST
        self._oldest = start + k
        self.lost += int(lost_slots.shape[0])
        self._advance()
        return Expired(self.seq[lost_slots].copy(), lost_slots)

    def on_replies(self, seq: npt.NDArray[np.integer]) -> ReplyClasses:
        """Join a batch of reply sequence numbers (arrival order) to the probes in flight.

        Call ``expire(now)`` first, so that a probe still pending is within its timeout.
        """
        s = seq.astype(np.int64, copy=False)
        n = int(s.shape[0])
        slots = s & self._mask
        known = self.seq[slots] == s
        state = np.where(known, self.state[slots], EMPTY)
        if n > 1:
            first = np.zeros(n, np.bool_)
            first[np.unique(s, return_index=True)[1]] = True
        else:
            first = np.ones(n, np.bool_)
        received = known & first & (state == PENDING)
        late = ~known | (state == LOST)
        duplicate = ~received & ~late
        rs = s[received]
        if rs.shape[0]:
            prior = np.maximum.accumulate(np.concatenate(([self._max_received], rs[:-1])))
            reordered_r = rs < prior
            self._max_received = max(self._max_received, int(rs.max()))
            self.state[slots[received]] = RECEIVED
        else:
            reordered_r = np.zeros(0, np.bool_)
        reordered = np.zeros(n, np.bool_)
        reordered[received] = reordered_r
        self.received += int(rs.shape[0])
        self.late += int(np.count_nonzero(late))
        self.duplicates += int(np.count_nonzero(duplicate))
        self.reordered += int(np.count_nonzero(reordered_r))
        if rs.shape[0]:
            self._advance()
        return ReplyClasses(slots, received, reordered, duplicate, late)

    def on_reply(self, seq: int) -> int:
        """Scalar twin of ``on_replies`` for one reply (the common case at low rates);
        returns RECEIVED, REORDERED (received, out of order), DUPLICATE or LATE."""
        slot = seq & self._mask
        if int(self.seq[slot]) != seq:
            self.late += 1
            return LATE
        state = int(self.state[slot])
        if state == LOST:
            self.late += 1
            return LATE
        if state != PENDING:
            self.duplicates += 1
            return DUPLICATE
        self.state[slot] = RECEIVED
        self.received += 1
        reordered = seq < self._max_received
        if reordered:
            self.reordered += 1
        else:
            self._max_received = seq
        self._advance()
        return REORDERED if reordered else RECEIVED

    def late_tx(self, seq: int, *, kernel_tx_ns: int, hw_tx_ns: int) -> bool:
        """A TX stamp of probe ``seq`` that came after its send returned (a non-zero
        field replaces the slot's); False when the probe has finished or is unknown."""
        slot = seq & self._mask
        if int(self.seq[slot]) != seq or int(self.state[slot]) != PENDING:
            return False
        if kernel_tx_ns:
            self.kernel_tx_ns[slot] = kernel_tx_ns
        if hw_tx_ns:
            self.hw_tx_ns[slot] = hw_tx_ns
        return True

    def drop(self, slots: I64 | int) -> None:
        """Turn received probes into dropped ones (their RTT spans a clock step)."""
        self.state[slots] = DROPPED
        n = 1 if isinstance(slots, int) else int(slots.shape[0])
        self.received -= n
        self.dropped += n

    def _advance(self) -> None:
        # Move the oldest-pending mark past probes already answered, so that expire()
        # scans only what is really outstanding.
        while self._oldest < self.next_seq:
            slot = self._oldest & self._mask
            if self.state[slot] == PENDING:
                break
            self._oldest += 1

    def _slots(self, first: int, n: int) -> I64:
        return np.arange(first, first + n, dtype=np.int64) & self._mask

    def _index(self, first: int, n: int) -> slice | I64:
        # A slice when the run does not wrap: much cheaper than fancy indexing.
        start = first & self._mask
        if start + n <= self.capacity:
            return slice(start, start + n)
        return self._slots(first, n)
