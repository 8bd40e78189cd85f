"""The Kubernetes quantity as Cilium's bandwidth manager reads an egress annotation
(lab/cluster/quantity.py): bit/s, rounded up to whole bits, divided down to bytes; no
limit for what does not parse, for 0 and below. Expected values worked out by hand."""

from __future__ import annotations

from decimal import Decimal

import pytest

from detnet.lab.cluster.quantity import QuantityError, egress_limit, parse_quantity


@pytest.mark.parametrize(
    ("text", "bytes_per_s", "reason"),
    [
        ("80M", 10_000_000, "limit"),
        ("1000M", 125_000_000, "limit"),
        ("500k", 62_500, "limit"),
        ("1.5M", 187_500, "limit"),
        (".5M", 62_500, "limit"),
        ("1Gi", 134_217_728, "limit"),
        ("10Mi", 1_310_720, "limit"),
        ("2e6", 250_000, "limit"),
        ("25E5", 312_500, "limit"),
        ("+8", 1, "limit"),
        ("9", 1, "limit"),  # 9 bit/s: 1 byte/s after Go's integer division
        ("7", None, "zero"),  # 0 bytes/s: the datapath skips a rate of 0
        ("100m", None, "zero"),  # 0.1 bit/s rounds up to 1 bit, which is 0 bytes
        ("0", None, "zero"),
        ("-5M", None, "negative"),
        ("", None, "absent"),
        (None, None, "absent"),
        ("80Mbit", None, "unparsable"),
        ("80 M", None, "unparsable"),
        ("1K", None, "unparsable"),  # the kilo suffix is lower-case
        ("M", None, "unparsable"),
        ("fast", None, "unparsable"),
        ("1" * 65, None, "unparsable"),
    ],
)
def test_egress_limit(text: str | None, bytes_per_s: int | None, reason: str) -> None:
    limit = egress_limit(text)
    assert (limit.bytes_per_s, limit.reason) == (bytes_per_s, reason)


def test_parse_quantity_is_exact() -> None:
    assert parse_quantity("1.5Gi") == Decimal(3 * 2**29)
    assert parse_quantity("250u") == Decimal("0.000250")
    with pytest.raises(QuantityError):
        parse_quantity("1e99999")
