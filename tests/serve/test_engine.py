"""The engine with the real demo-shaped pipeline: batching, batch independence, backpressure, deadlines,
cancellation, failure isolation and draining. Pipelines are wrapped to record, block or fail batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import pytest
import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.serve.engine import BatchFailed, DeadlineExceeded, Engine, GenerationRequest, NotAccepting, QueueFull
from app.serve.engine.worker import Pipeline
from app.serve.metrics import ServeMetrics
from tests.serve.conftest import Failing, Gated, Recording, policy_settings

T = TypeVar("T")
FAST = SamplingParams(cfg=1.5, top_k=0, top_p=0.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def request(label: int, seeds: tuple[int, ...], params: SamplingParams = FAST, **kw: Any) -> GenerationRequest:
    return GenerationRequest(kw.pop("variant", "baseline"), label, seeds, params, kw.pop("timeout_s", 30.0))


pytestmark = pytest.mark.usefixtures("policy")  # every test runs under each batching policy


def engine(pipes: Mapping[str, Pipeline], **kw: Any) -> Engine:
    values = {"max_batch_size": 4, "max_wait_s": 0.0, "queue_capacity": 16} | policy_settings() | kw
    e = Engine(pipes, **values)
    e.start()
    return e


async def block_worker(e: Engine, gated: Gated) -> asyncio.Task[Any]:
    """Occupy the worker with one request that waits at the gate; returns its task."""
    task = asyncio.create_task(e.generate(request(0, (999,))))
    assert await asyncio.to_thread(gated.entered.wait, 30)
    return task


MIXED = [
    request(1, (11,), SamplingParams(cfg=1.5, top_k=0, top_p=0.0)),
    request(7, (12, 13), SamplingParams(cfg=4.0, top_k=50, top_p=0.9)),
    request(3, (14,), SamplingParams(cfg=0.0, top_k=5, top_p=0.0, more_smooth=True)),
]


def test_requests_with_different_classes_seeds_and_sampling_share_one_batch(demo_pipeline: VARPipeline) -> None:
    rec = Recording(demo_pipeline)

    async def scenario() -> list[Any]:
        e = engine({"baseline": rec}, max_wait_s=60.0)  # only a full batch (4 images) can start
        results = await asyncio.gather(*(e.generate(r) for r in MIXED))
        await e.stop()
        return results

    results = run(scenario())
    assert len(rec.calls) == 1
    labels, params, seeds = rec.calls[0]
    assert labels == [1, 7, 7, 3] and seeds == [11, 12, 13, 14]
    assert [p.cfg for p in params] == [1.5, 4.0, 4.0, 0.0]
    assert [r.batch_sizes for r in results] == [[4], [4], [4]]
    assert [r.seeds for r in results] == [(11,), (12, 13), (14,)]


def test_each_image_is_bitwise_the_same_batched_or_alone(demo_pipeline: VARPipeline) -> None:
    async def scenario() -> list[Any]:
        e = engine({"baseline": demo_pipeline}, max_wait_s=60.0)
        results = await asyncio.gather(*(e.generate(r) for r in MIXED))
        await e.stop()
        return results

    for req, result in zip(MIXED, run(scenario()), strict=True):
        alone = demo_pipeline.generate([req.class_label] * req.num_images, req.params, seeds=list(req.seeds))
        assert torch.equal(result.images, alone.images), f"class {req.class_label}: batched image differs"


def test_only_the_variant_splits_batches(demo_pipeline: VARPipeline) -> None:
    gated, other = Gated(demo_pipeline), Recording(demo_pipeline)

    async def scenario() -> None:
        e = engine({"baseline": gated, "other": other}, max_batch_size=8)
        first = await block_worker(e, gated)
        queued = [
            e.generate(request(1, (1,))),
            e.generate(request(2, (2,), variant="other")),
            e.generate(request(3, (3,))),
        ]
        tasks = [asyncio.create_task(q) for q in queued]
        await asyncio.sleep(0)  # let all three reach the queue while the worker is busy
        gated.release.set()
        await asyncio.gather(first, *tasks)
        await e.stop()

    run(scenario())
    assert [labels for labels, _, _ in gated.calls] == [[0], [1, 3]]
    assert [labels for labels, _, _ in other.calls] == [[2]]


def test_full_queue_raises_queue_full_with_retry_after(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)

    async def scenario() -> tuple[QueueFull, list[QueueFull | None]]:
        e = engine({"baseline": gated}, queue_capacity=3)
        first = await block_worker(e, gated)
        full = [e.full()]  # rows free: no refusal before parsing
        waiting = asyncio.create_task(e.generate(request(1, (1, 2, 3))))
        await asyncio.sleep(0)
        full.append(e.full())
        with pytest.raises(QueueFull) as refused:
            await e.generate(request(2, (4,)))
        e.lifecycle.drain()
        full.append(e.full())  # draining: the request's own path answers 503
        gated.release.set()
        await asyncio.gather(first, waiting)
        await e.stop()
        return refused.value, full

    refused, full = run(scenario())
    assert refused.retry_after_s >= 1
    assert 4 not in gated.computed_seeds()
    assert full[0] is None and full[2] is None
    assert isinstance(full[1], QueueFull) and full[1].retry_after_s == refused.retry_after_s


def test_request_past_its_deadline_is_never_computed(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)

    async def scenario() -> DeadlineExceeded:
        e = engine({"baseline": gated})
        first = await block_worker(e, gated)
        with pytest.raises(DeadlineExceeded) as late:
            await e.generate(request(5, (55,), timeout_s=0.05))
        assert e.queued_images() == 0
        gated.release.set()
        await first
        await e.generate(request(6, (66,)))  # the engine goes on
        await e.stop()
        return late.value

    assert not run(scenario()).computed
    assert 55 not in gated.computed_seeds() and 66 in gated.computed_seeds()


def test_cancelled_request_leaves_the_queue_and_is_never_computed(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)

    async def scenario() -> None:
        e = engine({"baseline": gated})
        first = await block_worker(e, gated)
        gone = asyncio.create_task(e.generate(request(5, (55, 56))))
        await asyncio.sleep(0)
        assert e.queued_images() == 2
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert e.queued_images() == 0
        gated.release.set()
        await first
        await e.stop()

    run(scenario())
    assert not {55, 56} & set(gated.computed_seeds())


def test_failing_batch_fails_only_the_request_that_fails_alone_and_the_engine_goes_on(
    demo_pipeline: VARPipeline, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    failing = Failing(demo_pipeline, bad_label=9)

    async def scenario() -> list[Any]:
        e = engine({"baseline": failing}, max_batch_size=2, max_wait_s=60.0)
        # two batches of two: [bad, good] fails, then each is retried alone: bad fails, good is computed;
        # [good, good] is computed
        outcomes = await asyncio.gather(
            e.generate(request(9, (1,))),
            e.generate(request(1, (2,))),
            e.generate(request(2, (3, 4))),
            return_exceptions=True,
        )
        after = await e.generate(request(3, (5, 6)))
        await e.stop()
        return [*outcomes, after]

    with caplog.at_level(logging.ERROR, logger="app.serve.engine"):
        bad, neighbour, other, after = run(scenario())
    assert isinstance(bad, BatchFailed)
    assert neighbour.images.shape[0] == 1 and other.images.shape[0] == 2 and after.images.shape[0] == 2
    calls = [labels for labels, _, _ in failing.calls]
    if policy == "whole":
        assert calls == [[1], [2, 2], [3, 3]]  # bad never got past the check
    else:  # bad failed its cohort after the first scale; each of its rows started again alone
        assert calls[:3] == [[9, 1], [9], [1]] and [3, 3] in calls
    record = next(r for r in caplog.records if bad.error_id in r.getMessage())
    assert record.exc_info is not None and "simulated failure" in str(record.exc_info[1])
    assert sum("retrying each image alone" in r.getMessage() for r in caplog.records) == 1


def test_only_accepted_requests_are_counted_in_request_images(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)
    metrics = ServeMetrics(["baseline"], 4, 16)

    async def scenario() -> None:
        e = engine({"baseline": gated}, queue_capacity=3, metrics=metrics)
        first = await block_worker(e, gated)
        waiting = asyncio.create_task(e.generate(request(1, (1, 2, 3))))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await e.generate(request(2, (4, 5)))
        gated.release.set()
        await asyncio.gather(first, waiting)
        await e.stop()

    run(scenario())
    count = metrics.registry.get_sample_value("var_request_images_count", {"variant": "baseline"})
    total = metrics.registry.get_sample_value("var_request_images_sum", {"variant": "baseline"})
    assert (count, total) == (2, 4)  # the blocking request (1 image) and the waiting one (3), not the refused one


def test_drain_refuses_new_requests_and_finishes_accepted_ones(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)

    async def scenario() -> int:
        e = engine({"baseline": gated})
        first = await block_worker(e, gated)
        accepted = asyncio.create_task(e.generate(request(1, (1, 2))))
        await asyncio.sleep(0)
        drain = asyncio.create_task(e.drain(grace_s=30))
        await asyncio.sleep(0)
        with pytest.raises(NotAccepting, match="draining"):
            await e.generate(request(2, (3,)))
        gated.release.set()
        results = await asyncio.gather(first, accepted)
        assert [r.images.shape[0] for r in results] == [1, 2]
        left = await drain
        await e.stop()
        return left

    assert run(scenario()) == 0


def test_drain_fails_what_is_left_after_the_grace_period(demo_pipeline: VARPipeline) -> None:
    gated = Gated(demo_pipeline)

    async def scenario() -> tuple[int, list[Any]]:
        e = engine({"baseline": gated})
        first = await block_worker(e, gated)
        queued = asyncio.create_task(e.generate(request(1, (1,))))
        await asyncio.sleep(0)
        left = await e.drain(grace_s=0.05)
        outcomes = await asyncio.gather(first, queued, return_exceptions=True)
        gated.release.set()
        await e.stop()
        return left, outcomes

    left, outcomes = run(scenario())
    assert left == 2
    assert all(isinstance(o, NotAccepting) for o in outcomes)
