"""The lab's traffic generator's endpoint parsing. The sink and sender as processes:
tests/integration/test_lab_traffic_processes.py."""

from __future__ import annotations

import pytest

from detnet.lab.traffic import Endpoint, parse_endpoint


def test_parse_endpoint() -> None:
    assert parse_endpoint("198.18.0.2:5001") == Endpoint("198.18.0.2", 5001)
    assert parse_endpoint("[::1]:80") == Endpoint("::1", 80)
    assert parse_endpoint(":5001", listen=True) == Endpoint("0.0.0.0", 5001)  # a sink's
    for bad in ("nohost", ":80", "host:", "host:0", "host:70000", "host:x"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_endpoint(bad)
