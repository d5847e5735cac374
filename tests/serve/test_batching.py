"""The batching policy alone: which queued images form the next batch, and how long to wait otherwise."""

from __future__ import annotations

import pytest

from app.model.sampling import SamplingParams
from app.serve.engine import GenerationRequest
from app.serve.engine.batch_limit import BatchLimit
from app.serve.engine.queue import next_batch, rows_waiting
from app.serve.engine.requests import Pending


def pending(variant: str, n: int, arrived: float, label: int = 0) -> Pending:
    request = GenerationRequest(variant, label, tuple(range(n)), SamplingParams(), timeout_s=60)
    return Pending(request, arrived=arrived, deadline=arrived + 60)


def test_empty_queue_waits_for_a_request() -> None:
    decision = next_batch([], now=0.0, max_batch_size=4, max_wait_s=0.01)
    assert decision.rows == [] and decision.wait_s is None


def test_waits_max_wait_counted_from_the_oldest_request() -> None:
    queue = [pending("a", 1, arrived=1.000), pending("a", 1, arrived=1.004)]
    decision = next_batch(queue, now=1.006, max_batch_size=4, max_wait_s=0.010)
    assert decision.rows == []
    assert decision.wait_s == pytest.approx(0.004)
    due = next_batch(queue, now=1.010, max_batch_size=4, max_wait_s=0.010)
    assert [r.pending for r in due.rows] == queue


def test_a_full_batch_goes_without_waiting() -> None:
    queue = [pending("a", 3, arrived=5.0), pending("a", 2, arrived=5.0)]
    decision = next_batch(queue, now=5.0, max_batch_size=4, max_wait_s=10)
    assert [(r.pending, r.row) for r in decision.rows] == [(queue[0], 0), (queue[0], 1), (queue[0], 2), (queue[1], 0)]
    assert rows_waiting(queue) == 1  # the second request's last image waits for the next batch


def test_requests_of_different_classes_share_a_batch_and_only_the_variant_splits() -> None:
    queue = [pending("a", 2, 0.0, label=1), pending("b", 1, 0.1, label=2), pending("a", 1, 0.2, label=3)]
    first = next_batch(queue, now=1.0, max_batch_size=8, max_wait_s=0.5)
    assert {r.pending.variant for r in first.rows} == {"a"}
    assert [r.pending.request.class_label for r in first.rows] == [1, 1, 3]
    second = next_batch(queue, now=1.0, max_batch_size=8, max_wait_s=0.5)
    assert [r.pending for r in second.rows] == [queue[1]]


def test_a_full_variant_goes_before_an_older_one_that_is_not_due() -> None:
    old = pending("a", 1, arrived=0.0)
    full = [pending("b", 2, arrived=0.001), pending("b", 2, arrived=0.002)]
    decision = next_batch([old, *full], now=0.003, max_batch_size=4, max_wait_s=1.0)
    assert {r.pending.variant for r in decision.rows} == {"b"} and len(decision.rows) == 4


def test_a_large_request_is_spread_over_batches_in_order() -> None:
    big = pending("a", 10, arrived=0.0)
    rows = [next_batch([big], now=0.0, max_batch_size=4, max_wait_s=0).rows for _ in range(3)]
    assert [[r.row for r in b] for b in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_running_out_of_memory_halves_the_batch_limit_until_enough_batches_succeed() -> None:
    limit = BatchLimit(max_batch_size=8, backoff_batches=2)
    limit.out_of_memory(8)
    assert limit.current == 4
    limit.out_of_memory(4)  # again, at the lowered limit: lower still, and the count starts over
    limit.batch_done()
    assert limit.current == 2
    limit.batch_done()
    assert limit.current == 8


def test_the_batch_limit_never_drops_below_one_or_rises_on_a_smaller_failure() -> None:
    limit = BatchLimit(max_batch_size=4, backoff_batches=1)
    limit.out_of_memory(1)
    assert limit.current == 1
    limit.out_of_memory(4)  # a split half of an older, larger batch: the limit stays where it is
    assert limit.current == 1
    limit.batch_done()
    assert limit.current == 4
