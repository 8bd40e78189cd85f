"""Both implementations of the native core agree: names, bytes, errors, token buckets and
source tables. Their counters and rows on real sockets:
tests/integration/test_native_parity_sockets.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detnet.native import _fallback

try:
    _core: ModuleType | None = importlib.import_module("detnet.native._core")
except ImportError:  # the extension is not built: nothing to compare against
    _core = None

needs_core = pytest.mark.skipif(_core is None, reason="Cython extension not built")
KEY = b"k3y"


def _both() -> tuple[ModuleType, ModuleType]:
    assert _core is not None
    return _core, _fallback


@needs_core
def test_same_public_names_and_constants() -> None:
    core, fb = _both()
    assert sorted(core.__all__) == sorted(fb.__all__)
    for name in core.__all__:
        value = getattr(core, name)
        if isinstance(value, int | np.dtype):
            assert value == getattr(fb, name), name
    # What is not per packet is shared, not duplicated.
    for name in ("ForeignDatagram", "IcmpNotPermitted", "TimestampPlan", "plan_timestamping"):
        assert getattr(core, name) is getattr(fb, name), name


@needs_core
@settings(max_examples=200, deadline=None)
@given(
    session=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1),
    tx_ns=st.integers(0, 2**64 - 1),
    size=st.integers(64, 1500),
    keyed=st.booleans(),
    two_step=st.booleans(),
    wait=st.integers(0, 6_553_500_000),
)
def test_same_encoding_and_replies(
    session: int, seq: int, tx_ns: int, size: int, keyed: bool, two_step: bool, wait: int
) -> None:
    core, fb = _both()
    key = KEY if keyed else None
    size = max(size, 80) if keyed and two_step else size
    kw = {"session": session, "seq": seq, "tx_ns": tx_ns, "size": size, "key": key}
    kw.update(two_step=two_step, followup_wait_ns=wait if two_step else 0)
    data = core.encode_probe(**kw)
    assert data == fb.encode_probe(**kw)
    assert repr(core.decode_probe(data, key=key)) == repr(fb.decode_probe(data, key=key))
    assert core.make_reply(data, rx_ns=5, tx_ns=6, key=key) == fb.make_reply(
        data, rx_ns=5, tx_ns=6, key=key
    )


@needs_core
@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(0, 2**64 - 1),
    stamp=st.integers(0, 2**64 - 1),
    rx_source=st.integers(0, 2),
    followup_source=st.integers(0, 3),
    followup=st.booleans(),
    keyed=st.booleans(),
)
def test_same_version_2_encoding(
    seq: int, stamp: int, rx_source: int, followup_source: int, followup: bool, keyed: bool
) -> None:
    core, fb = _both()
    kw: dict[str, object] = {
        "session": 1,
        "seq": seq,
        "tx_ns": 0 if followup else 7,
        "size": 96,
        "key": KEY if keyed else None,
        "version": 2,
        "flags": 0x05 if followup else 0x01,
        "rx_source": rx_source,
        "followup_source": followup_source,
        "followup_seq": seq if followup_source else 0,
        "followup_tx_ns": stamp if followup_source in (1, 2) else 0,
    }
    outcomes = []
    for impl in (core, fb):
        try:
            outcomes.append(impl.encode_probe(**kw))
        except ValueError as exc:
            outcomes.append(f"error: {exc}")
    assert outcomes[0] == outcomes[1]


@needs_core
@settings(max_examples=400, deadline=None)
@given(
    st.binary(min_size=40, max_size=100),
    st.sampled_from([None, KEY]),
    st.sampled_from([b"DTNT\x01", b"DTNT\x02"]),
)
def test_same_verdicts_on_garbage(data: bytes, key: bytes | None, prefix: bytes) -> None:
    core, fb = _both()
    # Make many inputs get past the magic check, so later checks are compared too.
    data = prefix + data[5:]
    outcomes = []
    for impl in (core, fb):
        for call in (
            lambda m=impl: repr(m.decode_probe(data, key=key)),
            lambda m=impl: m.make_reply(data, rx_ns=1, tx_ns=2, key=key),
        ):
            try:
                outcomes.append(call())
            except impl.HmacError as exc:
                outcomes.append(f"hmac: {exc}")
            except impl.PacketError as exc:
                outcomes.append(f"packet: {exc}")
    assert outcomes[:2] == outcomes[2:]


# --- the token bucket ----------------------------------------------------------------
# The reflector's fast path charges the C table of SourceBuckets (allow_addr, the same
# _allow_key that allow() reaches); equal verdicts here are equal verdicts there.

_BUCKET_OPS = st.lists(
    st.tuples(st.sampled_from(["take", "borrow", "wait"]), st.integers(-(10**9), 10**10)),
    max_size=60,
)


@needs_core
@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1e-3, 1e9),
    burst=st.floats(1.0, 1e6),
    start=st.integers(0, 2**60),
    ops=_BUCKET_OPS,
)
def test_token_buckets_agree_to_the_bit(
    rate: float, burst: float, start: int, ops: list[tuple[str, int]]
) -> None:
    core, fb = _both()
    buckets = [impl.TokenBucket(rate=rate, burst=burst, now_ns=start) for impl in (core, fb)]
    now = start
    for op, dt in ops:
        now = max(0, now + dt)  # now and then a time earlier than the last
        results = [getattr(b, {"wait": "wait_ns"}.get(op, op))(now) for b in buckets]
        assert results[0] == results[1], (op, now)
        assert buckets[0].tokens == buckets[1].tokens  # exactly: the same float operations


_SOURCES = ["198.18.0.1", "198.18.0.2", "198.18.1.7", "2001:db8::1", "2001:db8::2", "::1"]


@needs_core
@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1e-2, 1e6),
    burst=st.integers(1, 64),
    arrivals=st.lists(
        st.tuples(st.sampled_from(_SOURCES), st.integers(0, 10**9)), min_size=1, max_size=200
    ),
)
def test_source_tables_agree_on_any_arrivals(
    rate: float, burst: int, arrivals: list[tuple[str, int]]
) -> None:
    # Fewer sources than the C table probes per address: neither table forgets one, so
    # every verdict must match (eviction is each table's own, bounded either way).
    core, fb = _both()
    tables = [impl.SourceBuckets(rate_pps=rate, burst=burst) for impl in (core, fb)]
    now = 0
    verdicts: list[list[bool]] = [[], []]
    for source, dt in arrivals:
        now += dt
        for table, out in zip(tables, verdicts, strict=True):
            out.append(table.allow(source, now))
    assert verdicts[0] == verdicts[1]
    assert len(tables[0]) == len(tables[1]) == len({s for s, _ in arrivals})
