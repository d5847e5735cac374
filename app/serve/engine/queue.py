"""The engine's accepted requests: their rows waiting for a batch, and one future per request until it is
answered. Event-loop side only. Its methods keep the invariants: a request is awaited while it has a future;
a request with waiting rows is in the waiting list and awaited; a finished or withdrawn request has neither.

Which rows form the next batch is a pure function of the waiting requests and the clock (`next_batch`), tested
without timing: rows of any class, seed, cfg, top-k, top-p and more_smooth share a batch; only the variant
splits batches; a request may be spread over batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

from app.serve.engine.errors import DeadlineExceeded
from app.serve.engine.requests import BatchRow, GenerationResult, Pending


@dataclass(frozen=True)
class Decision:
    """Either a batch to run now, or how long to wait before deciding again (None: until a request arrives)."""

    rows: list[BatchRow]
    wait_s: float | None = None


def rows_waiting(waiting: Iterable[Pending], variant: str | None = None) -> int:
    return sum(p.rows_waiting for p in waiting if variant is None or p.variant == variant)


def next_batch(waiting: list[Pending], now: float, max_batch_size: int, max_wait_s: float) -> Decision:
    """A variant is due when it has max_batch_size rows waiting or its oldest request has waited max_wait_s;
    of the due variants, the one with the oldest request goes first. Rows are taken in arrival order."""
    oldest: dict[str, float] = {}
    rows: dict[str, int] = {}
    for p in waiting:
        if p.rows_waiting:
            oldest.setdefault(p.variant, p.arrived)
            rows[p.variant] = rows.get(p.variant, 0) + p.rows_waiting
    due = [v for v in oldest if rows[v] >= max_batch_size or now - oldest[v] >= max_wait_s]
    if not due:
        return Decision([], wait_until_due(waiting, now, max_wait_s))
    variant = min(due, key=oldest.__getitem__)
    return Decision(take_rows(waiting, variant, max_batch_size))


def wait_until_due(waiting: Iterable[Pending], now: float, max_wait_s: float) -> float | None:
    """Seconds until the oldest waiting row has waited max_wait_s (negative: already); None: no row waits."""
    oldest = min((p.arrived for p in waiting if p.rows_waiting), default=None)
    return None if oldest is None else oldest + max_wait_s - now


def take_rows(waiting: list[Pending], variant: str, max_batch_size: int) -> list[BatchRow]:
    taken: list[BatchRow] = []
    for p in waiting:
        if p.variant == variant:
            taken += p.take_rows(max_batch_size - len(taken))
            if len(taken) == max_batch_size:
                break
    return taken


class RequestQueue:
    def __init__(self) -> None:
        self._waiting: list[Pending] = []  # in arrival order, each with rows not yet handed to a batch
        self._futures: dict[Pending, asyncio.Future[GenerationResult]] = {}  # accepted, not answered
        self._wakeup = asyncio.Event()  # set when there is something new to schedule
        self._idle_since: float | None = time.monotonic()  # when the last accepted request ended; None: one is

    def __len__(self) -> int:
        """Requests accepted and not yet answered."""
        return len(self._futures)

    def add(self, pending: Pending) -> asyncio.Future[GenerationResult]:
        future = self._futures[pending] = asyncio.get_running_loop().create_future()
        self._idle_since = None
        self._waiting.append(pending)
        self.notify()
        return future

    def idle_for(self, now: float) -> float:
        """Seconds since the last accepted request ended (0 while one is accepted and unanswered)."""
        return 0.0 if self._idle_since is None else now - self._idle_since

    def awaited(self, pending: Pending) -> bool:
        """Whether someone still waits for the request's answer."""
        return pending in self._futures

    def accepted(self) -> list[Pending]:
        return list(self._futures)

    async def settled(self, timeout_s: float) -> None:
        """Until every accepted request has its answer, or timeout_s has passed."""
        if self._futures:
            await asyncio.wait(list(self._futures.values()), timeout=timeout_s)

    def rows_waiting(self, variant: str | None = None) -> int:
        return rows_waiting(self._waiting, variant)

    def next_batch(self, now: float, max_batch_size: int, max_wait_s: float) -> Decision:
        """`next_batch` over the waiting requests; the rows it takes wait no more."""
        decision = next_batch(self._waiting, now, max_batch_size, max_wait_s)
        self._compact()
        return decision

    def due_in(self, now: float, max_wait_s: float) -> float | None:
        return wait_until_due(self._waiting, now, max_wait_s)

    def put_back(self, rows: list[BatchRow]) -> None:
        """Rows taken by `next_batch` but not started (the last ones it took of their requests) wait again, in
        their requests' places."""
        for p in dict.fromkeys(r.pending for r in rows):
            p.return_rows(sum(r.pending is p for r in rows))
            if p not in self._waiting and self.awaited(p):
                self._waiting.append(p)
        self._waiting.sort(key=lambda p: p.arrived)

    def finish(self, pending: Pending, outcome: GenerationResult | Exception) -> None:
        """The request's answer: its images, or an error on its future only."""
        future = self._close(pending)
        if future is not None and not future.done():
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def withdraw(self, pending: Pending) -> None:
        """Nobody waits for the request any more (deadline, a client gone): its rows not yet in a batch never
        will be."""
        future = self._close(pending)
        if future is not None and not future.done():
            future.cancel()

    def expire(self, now: float, among: Iterable[Pending] | None = None) -> None:
        """Requests (the waiting ones, or those `among`) whose deadline has passed end with DeadlineExceeded."""
        candidates = list(self._waiting if among is None else among)
        for p in candidates:
            if self.awaited(p) and p.deadline <= now:
                self.finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))

    def notify(self) -> None:
        """There is something new to schedule."""
        self._wakeup.set()

    async def wait_for_work(self, timeout_s: float | None) -> None:
        """Until `notify` (a request arrived, a retry is due) or timeout_s passes; clears the signal first so
        that a notification during the wait is not lost."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)
        self._wakeup.clear()

    def _close(self, pending: Pending) -> asyncio.Future[GenerationResult] | None:
        pending.close()
        with contextlib.suppress(ValueError):
            self._waiting.remove(pending)
        future = self._futures.pop(pending, None)
        if future is not None and not self._futures:
            self._idle_since = time.monotonic()
        return future

    def _compact(self) -> None:
        self._waiting = [p for p in self._waiting if p.rows_waiting]
