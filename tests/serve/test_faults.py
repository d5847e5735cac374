"""Faults injected through the engine's `fault` hook (called in the worker thread with each batch's rows and
images): a poison image, NaN and infinite pixels, running out of memory, a slow batch, a stuck batch and a
scheduler that dies. Each fails only the requests it concerns, and the engine goes on or says it is unhealthy."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import torch

from app.model.pipeline import VARPipeline
from app.serve.engine import BatchFailed, DeadlineExceeded, Engine, NonFiniteOutput, NotAccepting
from app.serve.engine.core import Fault
from app.serve.engine.requests import BatchRow
from app.serve.metrics import ServeMetrics
from tests.serve.conftest import Recording, crash_the_scheduler, policy_settings
from tests.serve.test_engine import FAST, request

T = TypeVar("T")
POISON = 66
pytestmark = pytest.mark.usefixtures("policy")  # every test runs under each batching policy


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=90))


def seeds_of(rows: list[BatchRow]) -> list[int]:
    return [r.pending.request.seeds[r.row] for r in rows]


def started(pipe: Recording, fault: Fault, metrics: ServeMetrics | None = None, **kw: Any) -> Engine:
    values = {"max_batch_size": 3, "max_wait_s": 60.0, "queue_capacity": 16} | policy_settings() | kw
    e = Engine({"baseline": pipe}, metrics=metrics, fault=fault, **values)
    e.start()
    return e


def alone(pipe: VARPipeline, label: int, seed: int) -> torch.Tensor:
    return pipe.generate([label], FAST, seeds=[seed]).images


def sample(metrics: ServeMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_a_poison_image_fails_only_its_request_and_its_batch_mates_get_their_images_alone(
    demo_pipeline: VARPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recording(demo_pipeline)

    def poison(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        if POISON in seeds_of(rows):
            raise RuntimeError("injected poison row")
        return images

    async def scenario() -> list[Any]:
        e = started(rec, poison)  # the three requests fill one batch of 3
        outcomes = await asyncio.gather(
            e.generate(request(1, (11,))),
            e.generate(request(2, (POISON,))),
            e.generate(request(3, (13,))),
            return_exceptions=True,
        )
        await e.stop()
        return outcomes

    with caplog.at_level(logging.ERROR, logger="app.serve.engine"):
        first, bad, third = run(scenario())
    assert [seeds for _, _, seeds in rec.calls] == [[11, POISON, 13], [11], [POISON], [13]]
    assert torch.equal(first.images, alone(demo_pipeline, 1, 11))
    assert torch.equal(third.images, alone(demo_pipeline, 3, 13))
    assert isinstance(bad, BatchFailed) and not isinstance(bad, NonFiniteOutput)
    record = next(r for r in caplog.records if bad.error_id in r.getMessage())
    assert record.exc_info is not None and "injected poison row" in str(record.exc_info[1])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_fail_their_request_and_never_reach_an_answer(
    demo_pipeline: VARPipeline, value: float
) -> None:
    metrics = ServeMetrics(["baseline"], 3, 16)

    def corrupt(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        images = images.clone()
        for i, seed in enumerate(seeds_of(rows)):
            if seed == POISON:
                images[i, :, 0, 0] = value
        return images

    async def scenario() -> list[Any]:
        e = started(Recording(demo_pipeline), corrupt, metrics)
        outcomes = await asyncio.gather(
            e.generate(request(1, (11,))), e.generate(request(2, (12, POISON))), return_exceptions=True
        )
        await e.stop()
        return outcomes

    good, bad = run(scenario())
    assert torch.equal(good.images, alone(demo_pipeline, 1, 11))
    assert isinstance(bad, NonFiniteOutput) and "non-finite output (NaN or infinite pixels)" in str(bad)
    assert bad.error_id in str(bad)
    assert sample(metrics, "var_nonfinite_images_total", variant="baseline") == 1


def small_memory(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
    """A fault: any batch (cohort) of more than two images runs out of memory."""
    if len(rows) > 2:
        raise MemoryError(f"injected: no memory for {len(rows)} images")
    return images


@pytest.mark.parametrize("policy", ["whole"], indirect=True)  # splitting in halves is the whole policy's
def test_out_of_memory_splits_the_batch_and_lowers_the_batch_limit_for_a_while(demo_pipeline: VARPipeline) -> None:
    rec = Recording(demo_pipeline)
    metrics = ServeMetrics(["baseline"], 4, 16)

    async def scenario() -> tuple[list[Any], list[int]]:
        # the four requests are queued before the scheduler runs: one batch of 4, which runs out of memory
        e = started(rec, small_memory, metrics, max_batch_size=4, max_wait_s=0.0, oom_backoff_batches=3)
        first = await asyncio.gather(*(e.generate(request(i, (20 + i,))) for i in range(4)))
        limits = [e.batch_limit]
        assert sample(metrics, "var_batch_limit_images") == 2
        # the two halves and the next batch (the first 2 of these 4) run at the lowered limit; then it is
        # restored, and the last 2 go together as they are all that is queued
        later = await asyncio.gather(*(e.generate(request(i, (30 + i,))) for i in range(4)))
        limits.append(e.batch_limit)
        await e.stop()
        return [*first, *later], limits

    results, limits = run(scenario())
    sizes = [len(seeds) for _, _, seeds in rec.calls]
    assert sizes == [4, 2, 2, 2, 2]
    assert limits == [2, 4]
    for r in results:
        assert torch.equal(r.images, alone(demo_pipeline, r.seeds[0] % 10, r.seeds[0]))
    assert sample(metrics, "var_oom_total", variant="baseline") == 1
    assert sample(metrics, "var_batch_limit_images") == 4


@pytest.mark.parametrize("policy", ["scale", "scale+overlap"], indirect=True)
def test_out_of_memory_in_flight_lowers_the_limit_and_retries_each_image_alone(demo_pipeline: VARPipeline) -> None:
    rec = Recording(demo_pipeline)
    metrics = ServeMetrics(["baseline"], 4, 16)

    async def scenario() -> tuple[list[Any], int]:
        # queued before the scheduler runs: one cohort of 4, which runs out of memory when decoded
        e = started(rec, small_memory, metrics, max_batch_size=4, max_wait_s=0.0, oom_backoff_batches=100)
        results = await asyncio.gather(*(e.generate(request(i, (20 + i,))) for i in range(4)))
        limit = e.batch_limit
        await e.stop()
        return results, limit

    results, limit = run(scenario())
    assert limit == 2 and sample(metrics, "var_batch_limit_images") == 2
    assert [len(seeds) for _, _, seeds in rec.calls] == [4, 1, 1, 1, 1]  # then each image alone
    for r in results:
        assert torch.equal(r.images, alone(demo_pipeline, r.seeds[0] % 10, r.seeds[0]))
    assert sample(metrics, "var_oom_total", variant="baseline") == 1


def test_an_image_that_alone_runs_out_of_memory_fails_with_its_error_id(demo_pipeline: VARPipeline) -> None:
    def no_memory(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        raise MemoryError("injected")

    async def scenario() -> BaseException:
        e = started(Recording(demo_pipeline), no_memory, max_wait_s=0.0)
        with pytest.raises(BatchFailed, match="out of memory") as failed:
            await e.generate(request(1, (1,)))
        assert e.batch_limit == 1
        await e.stop()
        return failed.value

    assert isinstance(run(scenario()), BatchFailed)


@pytest.mark.parametrize("policy", ["whole"], indirect=True)  # under scale nothing waits behind a batch
def test_requests_whose_deadline_passed_behind_a_slow_batch_are_504_and_never_computed(
    demo_pipeline: VARPipeline,
) -> None:
    """A slow first batch; requests queued behind it with a short timeout end 504 and none of their rows is
    in a later batch, also not in the image-by-image retry of a batch that failed."""
    rec = Recording(demo_pipeline)
    slow_done = threading.Event()
    late_known = threading.Event()

    def slow(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        seeds = seeds_of(rows)
        if seeds == [1]:  # the slow batch
            assert late_known.wait(30)
        if POISON in seeds:
            raise RuntimeError("injected poison row")
        if seeds == [2]:  # the first retry of the failed batch: slow until its batch-mate's deadline passed
            slow_done.set()
            assert late_known.wait(30)
        return images

    async def scenario() -> list[Any]:
        e = started(rec, slow, max_batch_size=3, max_wait_s=0.0)
        first = asyncio.create_task(e.generate(request(0, (1,))))
        while not rec.calls:
            await asyncio.sleep(0.005)
        late = [asyncio.create_task(e.generate(request(5, (50 + i,), timeout_s=0.2))) for i in range(3)]
        outcomes: list[Any] = list(await asyncio.gather(*late, return_exceptions=True))
        late_known.set()
        await first
        # [2, 3 (deadline 0.5 s), POISON] fails; 2 is retried alone and slow, 3's deadline passes meanwhile
        late_known.clear()
        mixed = [
            asyncio.create_task(e.generate(request(1, (2,)))),
            asyncio.create_task(e.generate(request(1, (3,), timeout_s=0.5))),
            asyncio.create_task(e.generate(request(1, (POISON,)))),
        ]
        assert await asyncio.to_thread(slow_done.wait, 30)
        with pytest.raises(DeadlineExceeded):
            await mixed[1]
        late_known.set()
        outcomes += await asyncio.gather(*mixed, return_exceptions=True)
        await e.stop()
        return outcomes

    late_0, late_1, late_2, kept, expired, poisoned = run(scenario())
    assert all(isinstance(o, DeadlineExceeded) and not o.computed for o in (late_0, late_1, late_2))
    computed = rec.computed_seeds()
    assert not {50, 51, 52} & set(computed)
    assert [seeds for _, _, seeds in rec.calls if 3 in seeds] == [[2, 3, POISON]]  # never retried alone
    assert isinstance(expired, DeadlineExceeded) and expired.computed
    assert kept.images.shape[0] == 1 and isinstance(poisoned, BatchFailed)


def wait_until(what: str, check: Callable[[], bool], limit_s: float = 30) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_stuck_batch_makes_the_engine_unhealthy_until_it_ends(demo_pipeline: VARPipeline) -> None:
    release = threading.Event()

    def stuck(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        assert release.wait(30)
        return images

    async def scenario() -> None:
        e = started(Recording(demo_pipeline), stuck, max_wait_s=0.0, watchdog_s=0.2)
        assert e.health() is None
        first = asyncio.create_task(e.generate(request(1, (1,))))
        await asyncio.to_thread(wait_until, "the watchdog", lambda: e.health() is not None)
        problem = e.health()
        assert problem is not None and problem.reason == "batch_stuck" and "has run" in problem.detail
        with pytest.raises(NotAccepting, match="unhealthy"):
            await e.generate(request(2, (2,)))
        release.set()
        assert (await first).images.shape[0] == 1
        assert e.health() is None
        await e.generate(request(3, (3,)))
        await e.stop()

    run(scenario())


def test_a_dead_scheduler_fails_accepted_requests_and_makes_the_engine_unhealthy(
    demo_pipeline: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_the_scheduler(monkeypatch)

    async def scenario() -> None:
        e = Engine({"baseline": demo_pipeline}, max_batch_size=2, max_wait_s=0.0, queue_capacity=8)
        e.start()
        with pytest.raises(BatchFailed, match="scheduler failed"):
            await e.generate(request(1, (1,)))
        problem = e.health()
        assert problem is not None and problem.reason == "scheduler_dead"
        assert "injected scheduler bug" in problem.detail
        with pytest.raises(NotAccepting, match="unhealthy"):
            await e.generate(request(2, (2,)))
        await e.stop()

    run(scenario())
