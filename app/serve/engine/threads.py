"""Torch work off the event loop and outside the engine's worker, in a thread that ends with the work.

libgomp (the OpenMP runtime of torch's CPU builds) keeps a team of helper threads for every thread that ever
ran a parallel op, for as long as that thread lives. Once the process holds more OpenMP threads than CPUs,
every team spins only about 100 times at its barriers before it sleeps, so each of the thousands of parallel
regions of a generation pays a wake-up: a pool thread that once loaded or warmed a model (asyncio's
`to_thread`) slowed every later generation of the demo model at 2 threads from 48 to 61-65 ms
(docs/benchmarks.md, "One OpenMP team"). A thread of its own ends with the work and takes its team with it, so
the worker's team is the only one that lives while the service serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_own_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread`, in a new thread that ends when `fn` returns. Like `to_thread`, cancelling the caller
    does not stop `fn`: it runs to its end and its result is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (fn(*args, **kwargs), None)
        except BaseException as e:  # handed to the awaiting coroutine, as to_thread does
            outcome = (None, e)
        if not loop.is_closed():  # else the awaiting coroutine is gone with its loop (a server that stopped)
            with contextlib.suppress(RuntimeError):  # the loop closed since
                loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=f"var-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await future
