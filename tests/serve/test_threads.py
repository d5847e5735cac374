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
