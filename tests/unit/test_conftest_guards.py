"""The guards of tests/conftest.py can fail: a tiny suite run by pytester leaves an
asyncio task behind and the task-leak guard fails it, while a fixture that closes its
own tasks at teardown passes (the guard is torn down after it)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        filterwarnings = error
        """
    )
    pytester.makeconftest("from tests.conftest import _task_leak_guard, no_leftover_tasks\n")
    return pytester


def test_an_async_test_leaving_a_task_fails(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import asyncio

        async def test_leaks():
            asyncio.create_task(asyncio.sleep(3600), name="the-leak")
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*test left asyncio tasks running*the-leak*"])


def test_a_fixture_closing_its_tasks_at_teardown_passes(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import asyncio
        import contextlib

        import pytest

        @pytest.fixture
        async def engine():
            task = asyncio.create_task(asyncio.sleep(3600))
            yield task
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        async def test_uses_the_engine(engine):
            assert not engine.done()
        """
    )
    suite.runpytest().assert_outcomes(passed=1)


def test_a_task_cancelled_at_the_end_gets_a_moment_to_finish(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import asyncio

        async def test_cancels_without_awaiting():
            async def cleans_up():
                try:
                    await asyncio.sleep(3600)
                finally:
                    await asyncio.sleep(0.05)  # cleanup that takes a few loop rounds

            task = asyncio.create_task(cleans_up())
            await asyncio.sleep(0)
            task.cancel()
        """
    )
    suite.runpytest().assert_outcomes(passed=1)


def test_sync_tests_are_not_given_the_guard(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        def test_sync(request):
            assert "no_leftover_tasks" not in request.fixturenames
        """
    )
    suite.runpytest().assert_outcomes(passed=1)
