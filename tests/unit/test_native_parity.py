"""Both implementations of the native core agree: same names, bytes, errors and records."""

from __future__ import annotations

import importlib
import select
import socket
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
    for name in (
        "MAGIC",
        "VERSION",
        "HEADER_SIZE",
        "HMAC_SIZE",
        "MIN_SIZE",
        "MAX_SIZE",
        "FLAG_REPLY",
        "FLAG_HMAC",
        "TS_USER",
        "TS_KERNEL",
        "SENT_DTYPE",
        "REPLY_DTYPE",
    ):
        assert getattr(core, name) == getattr(fb, name), name


@needs_core
@settings(max_examples=200, deadline=None)
@given(
    session=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**64 - 1),
    tx_ns=st.integers(0, 2**64 - 1),
    size=st.integers(64, 1500),
    keyed=st.booleans(),
)
def test_same_encoding_and_replies(
    session: int, seq: int, tx_ns: int, size: int, keyed: bool
) -> None:
    core, fb = _both()
    key = KEY if keyed else None
    kw = {"session": session, "seq": seq, "tx_ns": tx_ns, "size": size, "key": key}
    data = core.encode_probe(**kw)
    assert data == fb.encode_probe(**kw)
    assert core.make_reply(data, rx_ns=5, tx_ns=6, key=key) == fb.make_reply(
        data, rx_ns=5, tx_ns=6, key=key
    )


@needs_core
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=40, max_size=80), st.sampled_from([None, KEY]))
def test_same_verdicts_on_garbage(data: bytes, key: bytes | None) -> None:
    core, fb = _both()
    # Make many inputs get past the magic check, so later checks are compared too.
    data = b"DTNT\x01" + data[5:]
    outcomes = []
    for impl in (core, fb):
        try:
            outcomes.append(repr(impl.decode_probe(data, key=key)))
        except impl.HmacError as exc:
            outcomes.append(f"hmac: {exc}")
        except impl.PacketError as exc:
            outcomes.append(f"packet: {exc}")
    assert outcomes[0] == outcomes[1]


def _pair(client: ModuleType, server: ModuleType, **reflector: object):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    refl = server.Reflector(sock, **reflector)
    port = sock.getsockname()[1]
    return sock, refl, port


@needs_core
@pytest.mark.parametrize(("client_name", "server_name"), [("core", "fb"), ("fb", "core")])
def test_backends_interoperate(client_name: str, server_name: str) -> None:
    core, fb = _both()
    impls = {"core": core, "fb": fb}
    client, server = impls[client_name], impls[server_name]
    sock, refl, port = _pair(client, server, key=KEY)
    probe = client.ProbeSocket("127.0.0.1", port, session=77, size=96, key=KEY)
    try:
        sent = np.zeros(4, client.SENT_DTYPE)
        assert probe.send(100, 4, sent) == 4
        assert select.select([sock], [], [], 2)[0]
        for _ in range(20):
            refl.serve()
            if refl.replied == 4:
                break
            select.select([sock], [], [], 0.05)
        got = np.zeros(8, client.REPLY_DTYPE)
        n = 0
        for _ in range(20):
            if not select.select([probe.fileno()], [], [], 1)[0]:
                break
            n += probe.recv(got[n:])
            if n == 4:
                break
        assert n == 4
        assert sorted(got["seq"][:n].tolist()) == [100, 101, 102, 103]
        assert (got["session"][:n] == 77).all()
        assert (got["size"][:n] == 96).all()
    finally:
        probe.close()
        sock.close()
