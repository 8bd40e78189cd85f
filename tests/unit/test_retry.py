"""The retry module: classification of API errors and the backoff loop (no network)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from detnet.controller.errors import EnforcementError
from detnet.controller.retry import (
    ApiUnavailable,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    RetryPolicy,
    TooManyRequests,
    Unprocessable,
    call_with_retry,
    classify,
    parse_retry_after,
)


def api_error(status: int, retry_after: str | None = None) -> ApiException:
    exc: Any = ApiException(status=status, reason="r")
    exc.body = b'{"kind":"Status","message":"pods \\"x\\" not found","code":%d}' % status
    exc.headers = {"Retry-After": retry_after} if retry_after else {}
    return exc


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (404, NotFound),
        (409, Conflict),
        (410, Gone),
        (422, Unprocessable),
        (403, Forbidden),
        (429, TooManyRequests),
        (500, ApiUnavailable),
        (503, ApiUnavailable),
    ],
)
def test_classify_by_status(status: int, cls: type) -> None:
    err = classify(api_error(status), what="patch pod ns/x")
    assert type(err) is cls
    assert isinstance(err, EnforcementError)
    assert err.code == str(status)
    assert "patch pod ns/x" in str(err)
    assert 'pods "x" not found' in str(err)


def test_classify_transport_errors() -> None:
    for exc in (aiohttp.ServerDisconnectedError(), TimeoutError(), ConnectionRefusedError()):
        err = classify(exc, what="list pods")
        assert isinstance(err, ApiUnavailable)
        assert err.code == "connection"


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = datetime(2030, 1, 1, tzinfo=UTC)
    now = (when - timedelta(seconds=7)).timestamp()
    assert parse_retry_after(format_datetime(when, usegmt=True), now=now) == pytest.approx(7)


class Script:
    """An operation that fails with the given exceptions, then returns "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


async def run(op: Script, policy: RetryPolicy | None = None) -> tuple[object, list, list]:
    sleeps: list[float] = []
    codes: list[str] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    try:
        result: object = await call_with_retry(
            op, what="op", policy=policy, on_api_error=codes.append, sleep=fake_sleep
        )
    except EnforcementError as exc:
        result = exc
    return result, sleeps, codes


async def test_retries_5xx_429_and_transport_errors() -> None:
    op = Script(api_error(500), api_error(429, "2"), aiohttp.ClientOSError(), TimeoutError())
    result, sleeps, codes = await run(op)
    assert result == "ok"
    assert op.calls == 5
    assert codes == ["500", "429", "connection", "connection"]
    assert sleeps[1] == 2.0  # Retry-After honoured


@pytest.mark.parametrize("status", [404, 409, 410, 422, 400])
async def test_never_retries_client_errors(status: int) -> None:
    op = Script(api_error(status))
    result, sleeps, codes = await run(op)
    assert isinstance(result, EnforcementError)
    assert op.calls == 1
    assert sleeps == []
    assert codes == [str(status)]
    assert isinstance(result.__cause__, ApiException)


async def test_gives_up_after_attempts() -> None:
    op = Script(*[api_error(503) for _ in range(10)])
    result, sleeps, _ = await run(op, RetryPolicy(attempts=3))
    assert isinstance(result, ApiUnavailable)
    assert op.calls == 3
    assert len(sleeps) == 2
    assert "gave up after 3 attempts" in str(result)


async def test_one_attempt_fails_at_once_without_a_give_up_note() -> None:
    # The leader elector's policy: its own period is the retry.
    op = Script(api_error(503))
    result, sleeps, codes = await run(op, RetryPolicy(attempts=1))
    assert isinstance(result, ApiUnavailable)
    assert (op.calls, sleeps, codes) == (1, [], ["503"])
    assert "gave up" not in str(result)


async def test_retry_after_is_capped() -> None:
    op = Script(api_error(429, "3600"))
    _, sleeps, _ = await run(op, RetryPolicy(max_retry_after_s=5))
    assert sleeps == [5]


def test_backoff_is_capped_exponential_with_jitter() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=1.0)
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.4), (8, 1.0)]:
        for _ in range(50):
            assert full / 2 <= policy.backoff(attempt) <= full
