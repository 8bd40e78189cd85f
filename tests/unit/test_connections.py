"""The bounded connection table: eviction order, busy connections, refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.engine.connections import ConnectionTable, TableFull


def test_full_table_evicts_the_least_recently_progressing():
    table: ConnectionTable[str] = ConnectionTable(limit=3)
    for name in "abc":
        assert table.admit(name) is None
    table.progressed("a")  # a completed a frame: b is now the stalest
    assert table.admit("d") == "b"
    assert set(table) == {"a", "c", "d"}
    assert table.admit("e") == "c"
    assert table.admit("f") == "a"
    assert len(table) == 3


def test_busy_connections_are_never_evicted_and_done_counts_as_progress():
    table: ConnectionTable[str] = ConnectionTable(limit=2)
    table.admit("a")
    table.admit("b")
    table.busy("a")
    assert table.admit("c") == "b"
    table.busy("c")
    with pytest.raises(TableFull):
        table.admit("d")
    assert set(table) == {"a", "c"}  # a refusal changes nothing
    table.done("c")
    table.done("a")  # a finished last: c goes first
    assert table.admit("d") == "c"


def test_discard_frees_a_slot_and_unknown_connections_are_ignored():
    table: ConnectionTable[str] = ConnectionTable(limit=1)
    table.admit("a")
    table.busy("a")
    table.discard("a")
    table.discard("never")
    table.progressed("never")
    table.busy("never")
    table.done("never")
    assert len(table) == 0
    assert table.admit("b") is None
    assert "never" not in table


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionTable(limit=0)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "progressed", "busy", "done", "discard"]), st.integers(0, 7)
    ),
    max_size=80,
)


@given(limit=st.integers(1, 5), ops=_ops)
def test_matches_a_reference_model(limit, ops):
    table: ConnectionTable[int] = ConnectionTable(limit=limit)
    # The model: a list of idle connections, stalest first, and a set of busy ones.
    idle: list[int] = []
    busy: set[int] = set()
    for op, conn in ops:
        if op == "admit":
            if conn in idle or conn in busy:
                continue  # connections are unique objects: never admitted twice
            if len(idle) + len(busy) >= limit and not idle:
                with pytest.raises(TableFull):
                    table.admit(conn)
                continue
            expected = idle.pop(0) if len(idle) + len(busy) >= limit else None
            assert table.admit(conn) == expected
            idle.append(conn)
        elif op == "progressed":
            table.progressed(conn)
            if conn in idle:
                idle.remove(conn)
                idle.append(conn)
        elif op == "busy":
            table.busy(conn)
            if conn in idle:
                idle.remove(conn)
                busy.add(conn)
        elif op == "done":
            table.done(conn)
            if conn in busy:
                busy.discard(conn)
                idle.append(conn)
        else:
            table.discard(conn)
            if conn in idle:
                idle.remove(conn)
            busy.discard(conn)
        assert len(table) == len(idle) + len(busy) <= limit
        order = list(table)
        assert order[: len(idle)] == idle  # the eviction order
        assert set(order[len(idle) :]) == busy
