"""`in_own_thread`: torch work beside the worker, in a thread that ends with it (its OpenMP team with it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.serve.engine.threads import in_own_thread


def test_the_work_runs_in_a_new_thread_that_has_ended_when_awaited() -> None:
    ran_in: list[threading.Thread] = []

    def work(x: int, *, y: int) -> int:
        ran_in.append(threading.current_thread())
        return x + y

    async def main() -> int:
        return await in_own_thread(work, 2, y=3)

    assert asyncio.run(main()) == 5
    [thread] = ran_in
    assert thread is not threading.main_thread()
    thread.join(timeout=5)  # it returns right after handing over the result
    assert not thread.is_alive()


def test_an_error_reaches_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        asyncio.run(in_own_thread(fail))


def test_a_cancelled_caller_leaves_the_work_to_finish() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow() -> str:
        release.wait(5)
        finished.set()
        return "done"

    async def main() -> None:
        task = asyncio.ensure_future(in_own_thread(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.to_thread(finished.wait, 5)  # its result dropped, no error on the closed future

    asyncio.run(main())
    assert finished.is_set()


def test_work_that_outlives_its_loop_ends_without_an_error_in_its_thread() -> None:
    """A server that stopped while a variant still loaded: the loop is closed when the work returns."""
    release, errors = threading.Event(), []
    threads_before = set(threading.enumerate())
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:

        async def main() -> None:
            pending = asyncio.ensure_future(in_own_thread(release.wait, 5))
            await asyncio.sleep(0.05)
            assert not pending.done()

        asyncio.run(main())  # cancels the pending call and closes the loop
        release.set()
        for thread in set(threading.enumerate()) - threads_before:
            thread.join(timeout=5)
    finally:
        threading.excepthook = previous_hook
    assert errors == []
