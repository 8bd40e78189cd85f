"""The shared test helpers fail the way their callers rely on: ``until`` names what it
waited for and its bound, ``ready_line`` shows what a child said before it ended."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import ready_line, until


async def test_until_returns_once_a_plain_or_async_condition_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def at_once() -> bool:
        return True

    await until(third_time, timeout_s=5.0, interval_s=0)
    await until(at_once, timeout_s=5.0)
    assert len(calls) == 3


async def test_until_names_what_it_waited_for_and_the_bound() -> None:
    said: list[str] = []

    def says_late() -> bool:  # a child that says something while we wait
        said[:] = ["late"]
        return False

    # The message is built when the bound passes: it shows what was said by then.
    with pytest.raises(AssertionError, match=r"^not reached within 0\.05 s: the thing; late$"):
        await until(says_late, timeout_s=0.05, what=lambda: f"the thing; {''.join(said)}")
    with pytest.raises(AssertionError, match=r"within 0\.05 s: .*lambda: 1 > 2"):
        await until(lambda: 1 > 2, timeout_s=0.05)


async def test_ready_line_returns_the_line_and_fails_showing_what_was_said() -> None:
    stream = asyncio.StreamReader()
    stream.feed_data(b"starting\nserving http://127.0.0.1:1/\nmore\n")
    assert await ready_line(stream, "serving http://") == "serving http://127.0.0.1:1/\n"
    ended = asyncio.StreamReader()
    ended.feed_data(b"boom\n")
    ended.feed_eof()
    with pytest.raises(AssertionError, match=r"ended before 'serving'.*boom"):
        await ready_line(ended, "serving")
    silent = asyncio.StreamReader()
    with pytest.raises(AssertionError, match=r"no line with 'serving' within 0\.05 s"):
        await ready_line(silent, "serving", timeout_s=0.05)
