"""The engine: one per device. A bounded queue, dynamic batching, and one worker thread for the model.

The event loop owns the queue and every future; the worker thread only runs `pipeline.generate`, so the
loop stays responsive while a batch computes. A batch's result or exception is set only on the futures
of its own requests. No web framework here: the API maps the exceptions of `batching` to HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from app.model.memory import peak_above_start
from app.model.pipeline import Generation
from app.model.sampling import SamplingParams
from app.model.timing import Stage, StageTimer
from app.serve.batching import (
    BatchFailed,
    BatchRow,
    DeadlineExceeded,
    GenerationRequest,
    GenerationResult,
    NotAccepting,
    Pending,
    QueueFull,
    Rejection,
    next_batch,
    queued_rows,
)
from app.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """Why the engine takes no request now, as its NotAccepting answer says it."""

    rejection: Rejection
    state: str
    retry_after_s: int

    def error(self) -> NotAccepting:
        return NotAccepting(self.rejection, self.state, self.retry_after_s)


NOT_STARTED = Refusal(Rejection.NOT_READY, "not started", 5)
DRAINING = Refusal(Rejection.DRAINING, "draining", 1)
STOPPED = Refusal(Rejection.DRAINING, "stopped", 5)


class Pipeline(Protocol):
    @property
    def device(self) -> torch.device: ...

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation: ...


class Engine:
    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_capacity: int,
        metrics: ServeMetrics | None = None,
    ):
        self.pipelines = dict(pipelines)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_capacity = queue_capacity
        self.metrics = metrics
        self._queue: list[Pending] = []
        self._futures: dict[Pending, asyncio.Future[GenerationResult]] = {}  # accepted, not answered
        self._inflight: dict[str, int] = dict.fromkeys(self.pipelines, 0)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="var-engine")
        self._scheduler: asyncio.Task[None] | None = None
        self._refusal: Refusal | None = NOT_STARTED  # None while accepting
        self._batch_s = 0.1  # running estimate of one batch's seconds, for Retry-After
        if metrics:
            for name in self.pipelines:
                metrics.watch_queue(
                    name, functools.partial(self._queued, name), functools.partial(self._inflight.__getitem__, name)
                )

    # ---- lifecycle -------------------------------------------------------------------------------
    async def warm_up(self, batch_sizes: Sequence[int], params: SamplingParams) -> None:
        """Run every variant at every batch size in the worker thread: allocator, kernels, page-in."""
        loop = asyncio.get_running_loop()
        for name, pipe in self.pipelines.items():
            t0 = time.monotonic()
            for bs in batch_sizes:
                out = await loop.run_in_executor(
                    self._executor, _compute, pipe, [0] * bs, [params] * bs, list(range(bs))
                )
                if self.metrics:  # the memory a batch of each size needs is known before the first request
                    self.metrics.record_memory(name, out.kv_cache_bytes, out.peak_bytes)
            log.info("warmed up %s at batch sizes %s in %.1f s", name, list(batch_sizes), time.monotonic() - t0)

    def start(self) -> None:
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="var-engine-scheduler")
        self._refusal = None

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests, give accepted ones grace_s to finish; fail what is left. Returns how many."""
        self._refusal = DRAINING
        if self._futures:
            await asyncio.wait(list(self._futures.values()), timeout=grace_s)
        left = list(self._futures)
        for p in left:
            self._finish(p, NotAccepting(Rejection.DRAINING, "shut down before it was computed", retry_after_s=1))
        return len(left)

    async def stop(self) -> None:
        self._refusal = STOPPED
        if self._scheduler:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for p in list(self._futures):
            self._finish(p, NotAccepting(Rejection.DRAINING, "stopped", retry_after_s=1))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def queued_images(self) -> int:
        return queued_rows(self._queue)

    def _queued(self, variant: str) -> int:
        return queued_rows(self._queue, variant)

    # ---- requests --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Queue the request and wait for its images. Raises the errors of `app.serve.batching`;
        cancelling the caller (a client gone) withdraws the request's rows not yet computed."""
        pending = self._admit(request)
        future = self._futures[pending]
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, pending.deadline - time.monotonic()))
        except TimeoutError:
            self._withdraw(pending)
            raise DeadlineExceeded(request.timeout_s, computed=pending.started is not None) from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _admit(self, request: GenerationRequest) -> Pending:
        if self._refusal is not None:
            raise self._refusal.error()
        if request.variant not in self.pipelines:
            raise ValueError(f"unknown variant {request.variant!r}; loaded: {', '.join(self.pipelines)}")
        queued = queued_rows(self._queue)
        if queued + request.num_images > self.queue_capacity:
            retry = math.ceil((queued / self.max_batch_size + 1) * self._batch_s)
            raise QueueFull(queued, self.queue_capacity, retry_after_s=max(1, retry))
        now = time.monotonic()
        pending = Pending(request, arrived=now, deadline=now + request.timeout_s)
        self._queue.append(pending)
        self._futures[pending] = asyncio.get_running_loop().create_future()
        self._wakeup.set()
        return pending

    def _withdraw(self, pending: Pending) -> None:
        """Drop the request's rows not yet handed to a batch; its answer is no longer awaited."""
        pending.next_row = pending.request.num_images
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
        future = self._futures.pop(pending, None)
        if future and not future.done():
            future.cancel()

    def _finish(self, pending: Pending, outcome: GenerationResult | Exception) -> None:
        future = self._futures.pop(pending, None)
        if pending in self._queue:
            self._queue.remove(pending)
        pending.next_row = pending.request.num_images
        if future is None or future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    # ---- scheduling ------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            for p in [p for p in self._queue if p.deadline <= now]:
                self._finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))
            decision = next_batch(self._queue, now, self.max_batch_size, self.max_wait_s)
            if decision.rows:
                self._queue = [p for p in self._queue if p.rows_waiting]
                await self._run_batch(decision.rows)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), decision.wait_s)

    async def _run_batch(self, rows: list[BatchRow]) -> None:
        variant = rows[0].pending.variant
        pendings = list(dict.fromkeys(r.pending for r in rows))
        self._mark_started(pendings)
        requests = [r.pending.request for r in rows]
        labels = [q.class_label for q in requests]
        params = [q.params for q in requests]
        seeds = [r.pending.request.seeds[r.row] for r in rows]
        self._inflight[variant] = len(rows)
        t0 = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(self._executor, _compute, self.pipelines[variant], labels, params, seeds)
            self._inflight[variant] = 0
            self._batch_s = 0.8 * self._batch_s + 0.2 * (time.monotonic() - t0)
            if self.metrics:
                self.metrics.record_batch(variant, len(rows), out.stage_s)
                self.metrics.record_memory(variant, out.kv_cache_bytes, out.peak_bytes)
            self._deliver(rows, pendings, out.images, out.stage_s)
        except Exception:  # only this batch's requests fail; the scheduler goes on
            self._inflight[variant] = 0
            self._fail_batch(variant, pendings, rows)

    def _mark_started(self, pendings: list[Pending]) -> None:
        now = time.monotonic()
        for p in pendings:
            if p.started is None:
                p.started = now
                if self.metrics:
                    self.metrics.queue_wait_seconds.labels(p.variant).observe(now - p.arrived)

    def _fail_batch(self, variant: str, pendings: list[Pending], rows: list[BatchRow]) -> None:
        error_id = uuid.uuid4().hex[:12]
        log.exception("batch failed: error id %s, variant %s, %d images", error_id, variant, len(rows))
        if self.metrics:
            self.metrics.batch_failures.labels(variant).inc()
        for p in pendings:
            self._finish(p, BatchFailed(error_id))

    def _deliver(
        self, rows: list[BatchRow], pendings: list[Pending], images: torch.Tensor, stage_s: dict[Stage, float]
    ) -> None:
        for i, r in enumerate(rows):
            r.pending.images[r.row] = images[i]
        for p in pendings:
            p.batch_sizes.append(len(rows))
            for k, v in stage_s.items():
                p.stage_s[k] = p.stage_s.get(k, 0.0) + v
            done = [im for im in p.images if im is not None]
            if len(done) == p.request.num_images:
                assert p.started is not None
                result = GenerationResult(
                    torch.stack(done), p.request.seeds, p.variant, p.started - p.arrived, p.stage_s, p.batch_sizes
                )
                self._finish(p, result)


@dataclass(frozen=True)
class BatchOutput:
    images: torch.Tensor  # on the CPU
    stage_s: dict[Stage, float]
    kv_cache_bytes: int  # allocated by the pipeline for this batch
    peak_bytes: int | None  # `peak_above_start` of the batch; None where not measurable


def _compute(pipe: Pipeline, labels: list[int], params: list[SamplingParams], seeds: list[int]) -> BatchOutput:
    """Runs in the worker thread: one batch through the pipeline, images back on the CPU."""
    timer = StageTimer(pipe.device)
    with peak_above_start(pipe.device) as peak:
        gen = pipe.generate(labels, params, seeds=seeds, timer=timer)
    return BatchOutput(gen.images.float().cpu(), timer.stage_seconds(), gen.kv_cache_bytes, peak.bytes)
