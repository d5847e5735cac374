"""The engine's accepted requests behind RequestQueue's methods, and the one lifecycle with its Retry-After
values: event-loop state without a model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from app.model.sampling import SamplingParams
from app.serve.engine import DeadlineExceeded, Draining, GenerationRequest, Lifecycle, NotReady, Phase
from app.serve.engine.lifecycle import (
    DRAINING_RETRY_AFTER_S,
    FAILED_RETRY_AFTER_S,
    LOADING_RETRY_AFTER_S,
    UNHEALTHY_RETRY_AFTER_S,
)
from app.serve.engine.queue import RequestQueue
from app.serve.engine.requests import Pending

T = TypeVar("T")


def pending(variant: str, n: int, arrived: float, deadline: float = 1e9) -> Pending:
    return Pending(GenerationRequest(variant, 0, tuple(range(n)), SamplingParams(), 60.0), arrived, deadline)


def on_loop(body: Callable[[RequestQueue], Coroutine[Any, Any, T]]) -> T:
    async def scenario() -> T:
        return await body(RequestQueue())

    return asyncio.run(asyncio.wait_for(scenario(), 10))


def test_rows_put_back_wait_again_in_their_requests_places() -> None:
    async def body(q: RequestQueue) -> None:
        first, second = pending("a", 3, arrived=1.0), pending("a", 2, arrived=2.0)
        q.add(first), q.add(second)
        rows = q.next_batch(now=5.0, max_batch_size=8, max_wait_s=0).rows
        assert q.rows_waiting() == 0 and len(rows) == 5
        q.put_back(rows[2:])  # the pool had room for two: first's last row and all of second wait again
        assert (first.rows_waiting, second.rows_waiting) == (1, 2)
        again = q.next_batch(now=5.0, max_batch_size=8, max_wait_s=0).rows
        assert [(r.pending, r.row) for r in again] == [(first, 2), (second, 0), (second, 1)]

    on_loop(body)


def test_finish_withdraw_and_expire_end_a_request_once_and_take_its_rows() -> None:
    async def body(q: RequestQueue) -> None:
        done, gone, late = pending("a", 2, 1.0), pending("a", 2, 2.0), pending("a", 1, 3.0, deadline=4.0)
        futures = [q.add(p) for p in (done, gone, late)]
        q.finish(done, RuntimeError("boom"))
        q.finish(done, RuntimeError("a second answer is ignored"))
        q.withdraw(gone)
        q.expire(now=4.0)
        assert len(q) == 0 and q.rows_waiting() == 0
        assert not any(q.awaited(p) for p in (done, gone, late))
        assert str(futures[0].exception()) == "boom"
        assert futures[1].cancelled()
        assert isinstance(futures[2].exception(), DeadlineExceeded)

    on_loop(body)


def test_expire_among_the_rows_of_a_batch_ends_only_those_past_their_deadline() -> None:
    async def body(q: RequestQueue) -> None:
        late, timely = pending("a", 1, 1.0, deadline=2.0), pending("a", 1, 1.5, deadline=9.0)
        q.add(late), q.add(timely)
        rows = q.next_batch(now=1.5, max_batch_size=4, max_wait_s=0).rows
        q.expire(now=3.0, among=[r.pending for r in rows])  # taken rows are no longer waiting, still awaited
        assert not q.awaited(late) and q.awaited(timely)

    on_loop(body)


def test_idle_time_counts_from_the_end_of_the_last_accepted_request() -> None:
    async def body(q: RequestQueue) -> None:
        first, second = pending("a", 1, arrived=1.0), pending("a", 1, arrived=2.0)
        q.add(first), q.add(second)
        assert q.idle_for(time.monotonic() + 5) == 0.0
        q.finish(first, DeadlineExceeded(60.0, computed=False))
        assert q.idle_for(time.monotonic() + 5) == 0.0  # the second is still accepted
        q.withdraw(second)
        ended = time.monotonic()
        assert q.idle_for(ended + 5) == pytest.approx(5, abs=0.5)
        q.withdraw(second)  # ending it again changes nothing
        assert q.idle_for(ended + 5) == pytest.approx(5, abs=0.5)

    on_loop(body)


def test_a_notification_during_the_decision_is_not_lost() -> None:
    async def body(q: RequestQueue) -> None:
        q.notify()  # e.g. a request arrived while the scheduler was deciding
        await q.wait_for_work(timeout_s=5)  # returns at once
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await q.wait_for_work(timeout_s=None)  # the signal was consumed

    on_loop(body)


def test_the_lifecycle_refuses_with_the_retry_after_of_each_phase() -> None:
    life = Lifecycle()
    assert isinstance(life.refusal(), NotReady) and life.retry_after_s() == LOADING_RETRY_AFTER_S
    life.move(Phase.READY)
    assert life.refusal() is None
    unhealthy = life.refusal("a batch is stuck")
    assert isinstance(unhealthy, NotReady) and unhealthy.retry_after_s == UNHEALTHY_RETRY_AFTER_S
    assert "a batch is stuck" in str(unhealthy)
    life.drain()
    assert isinstance(life.refusal(), Draining) and life.retry_after_s() == DRAINING_RETRY_AFTER_S
    life.stop()
    assert life.phase is Phase.STOPPED and isinstance(life.refusal(), Draining)


def test_a_failed_load_stays_failed_through_a_drain() -> None:
    life = Lifecycle()
    life.fail("OSError: no such folder")
    life.drain()
    assert life.phase is Phase.FAILED and life.error == "OSError: no such folder"
    refusal = life.refusal()
    assert isinstance(refusal, NotReady) and refusal.retry_after_s == FAILED_RETRY_AFTER_S


@pytest.mark.parametrize(("start", "to"), [(Phase.READY, Phase.LOADING), (Phase.DRAINING, Phase.READY)])
def test_the_lifecycle_never_goes_back(start: Phase, to: Phase) -> None:
    life = Lifecycle()
    for step in (Phase.READY, Phase.DRAINING)[: 1 + (start is Phase.DRAINING)]:
        life.move(step)
    assert life.phase is start
    with pytest.raises(RuntimeError, match=f"from {start} to {to}"):
        life.move(to)
