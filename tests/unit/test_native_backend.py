"""Which native backend loads, and the ``native_backend`` fixture that runs the shared
suite on both in one pytest run (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest

from detnet import native
from detnet.engine import core, probers, reflector
from detnet.native import _fallback


def test_backend_matches_environment() -> None:
    # A broken extension build must fail CI instead of silently testing the fallback twice.
    expected = "python" if os.environ.get("DETNET_NO_EXTENSIONS") else "cython"
    assert expected == native.BACKEND


@pytest.mark.usefixtures("native_backend")
def test_the_fixture_swaps_the_backend_under_the_engine(native_backend: str) -> None:
    from detnet.native import _core

    impl = _core if native_backend == "cython" else _fallback
    assert native_backend == native.BACKEND
    for module in (core, probers, reflector):  # each looks native.X up when it calls it
        assert module.native.ProbeSocket is impl.ProbeSocket
        assert module.native.monotonic_ns is impl.monotonic_ns
    assert (os.environ.get("DETNET_NO_EXTENSIONS") == "1") == (native_backend == "python")
