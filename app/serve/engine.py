"""The engine: one per device. A bounded queue, dynamic batching, and one worker thread for the model.

Two batching policies (`policy`): `whole`, here, where a batch runs every scale of its images before the
next batch starts; `scale` (app/serve/scale_batching.py), where requests join the running generation at the
next scale boundary.

The event loop owns the queue and every future; the worker thread only runs `pipeline.generate`, so the
loop stays responsive while a batch computes. A batch's result or exception is set only on the futures
of its own requests. No web framework here: the API maps the exceptions of `batching` to HTTP.

Faults: a batch that raises is retried once image by image, so one poison image fails only its own request;
a batch that runs out of memory is split in halves and the batch limit is halved for a while; an image with
NaN or infinite pixels fails its request (never a 200 with undefined pixels); a row whose deadline passed is
never handed to a batch. `health()` is the watchdog: a batch running far past its expected time, or a dead
scheduler, makes the engine unhealthy (GET /healthz 503) so that the process gets restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from app.model.sampling import SamplingParams
from app.serve.batching import (
    BatchFailed,
    BatchLimit,
    BatchRow,
    DeadlineExceeded,
    GenerationRequest,
    GenerationResult,
    NonFiniteOutput,
    NotAccepting,
    Pending,
    QueueFull,
    Rejection,
    next_batch,
    queued_rows,
)
from app.serve.metrics import ServeMetrics
from app.serve.scale_batching import ScaleBatching
from app.serve.watchdog import Unhealthy, Watchdog
from app.serve.worker import BatchOutput, Pipeline, compute, finite_rows, free_memory, out_of_memory

log = logging.getLogger(__name__)
T = TypeVar("T")
# A test hook, None in service: called in the worker thread with each batch's rows and images after the
# pipeline; it may raise (a poison row, MemoryError), sleep or block (a slow or stuck batch), or return other
# images (NaN pixels).
Fault = Callable[[list[BatchRow], torch.Tensor], torch.Tensor]
WATCHDOG_S = 120.0  # the watchdog's floor (VAR_WATCHDOG_S)
OOM_BACKOFF_BATCHES = 100  # after running out of memory, batches computed at the lowered limit
UNHEALTHY_RETRY_AFTER_S = 30
POLICIES = ("whole", "scale")


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


class Engine:
    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_capacity: int,
        metrics: ServeMetrics | None = None,
        watchdog_s: float = WATCHDOG_S,
        oom_backoff_batches: int = OOM_BACKOFF_BATCHES,
        fault: Fault | None = None,
        policy: str = "whole",
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.pipelines = dict(pipelines)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_capacity = queue_capacity
        self.metrics = metrics
        self._fault = fault
        self._limit = BatchLimit(max_batch_size, oom_backoff_batches)
        self._queue: list[Pending] = []
        self._futures: dict[Pending, asyncio.Future[GenerationResult]] = {}  # accepted, not answered
        self._inflight: dict[str, int] = dict.fromkeys(self.pipelines, 0)
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="var-engine")
        self._scheduler: asyncio.Task[None] | None = None
        self._refusal: Refusal | None = NOT_STARTED  # None while accepting
        self.watchdog = Watchdog(watchdog_s)  # also the running mean of a batch's (a step's) seconds
        self._scale = ScaleBatching(self) if policy == "scale" else None
        if metrics:
            for name in self.pipelines:
                metrics.watch_queue(
                    name, functools.partial(self._queued, name), functools.partial(self._rows_in_flight, name)
                )
            metrics.batch_limit.set_function(lambda: self._limit.current)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def warm_up(self, batch_sizes: Sequence[int], params: SamplingParams) -> None:
        """Run every variant at every batch size in the worker thread: allocator, kernels, page-in.
        Stops early once the engine is drained (a shutdown during warm-up)."""
        loop = asyncio.get_running_loop()
        for name, pipe in self.pipelines.items():
            t0 = time.monotonic()
            for bs in batch_sizes:
                if self._refusal is not NOT_STARTED:
                    return
                out = await loop.run_in_executor(
                    self._executor, compute, pipe, [0] * bs, [params] * bs, list(range(bs))
                )
                if self.metrics:  # the memory a batch of each size needs is known before the first request
                    self.metrics.record_memory(name, out.kv_cache_bytes, out.peak_bytes)
            log.info("warmed up %s at batch sizes %s in %.1f s", name, list(batch_sizes), time.monotonic() - t0)

    def start(self) -> None:
        """Start taking requests; once only, and never after a drain or stop."""
        if self._refusal is not NOT_STARTED:
            raise RuntimeError(f"the engine is {self._refusal.state if self._refusal else 'started'}; it starts once")
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="var-engine-scheduler")
        self._scheduler.add_done_callback(self._scheduler_ended)
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
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a crash was logged when it happened
                await self._scheduler
        for p in list(self._futures):
            self._finish(p, NotAccepting(Rejection.DRAINING, "stopped", retry_after_s=1))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def queued_images(self) -> int:
        return queued_rows(self._queue)

    def _queued(self, variant: str) -> int:
        return queued_rows(self._queue, variant)

    def _rows_in_flight(self, variant: str) -> int:
        return self._scale.rows_in_flight(variant) if self._scale else self._inflight[variant]

    def _generation_s(self) -> float:
        """The running estimate of one generation's seconds: a batch's, or a step's times the scales."""
        if self._scale is None:
            return self.watchdog.batch_s
        return self.watchdog.batch_s * max(len(p.steps) for p in self.pipelines.values())

    @property
    def batch_limit(self) -> int:
        """The most images the next batch may hold (lowered for a while after running out of memory)."""
        return self._limit.current

    # ---- watchdog --------------------------------------------------------------------------------
    def health(self) -> Unhealthy | None:
        """None while the engine can answer; else why it cannot: its scheduler died, or a batch has run far past
        its expected time (the worker thread is stuck)."""
        return self.watchdog.check()

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        if self._refusal is STOPPED:
            return
        error = None if task.cancelled() else task.exception()
        error_id = uuid.uuid4().hex[:12]
        died = f"{type(error).__name__}: {error}" if error else "cancelled"
        self.watchdog.scheduler_died = f"{died} (error id {error_id})"
        log.error(
            "engine scheduler died (error id %s); failing %d accepted request(s)", error_id, len(self._futures),
            exc_info=error,
        )  # fmt: skip
        for p in list(self._futures):
            self._finish(p, BatchFailed(error_id, "the engine's scheduler failed"))

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
        if (problem := self.health()) is not None:
            raise NotAccepting(Rejection.NOT_READY, f"unhealthy: {problem.detail}", UNHEALTHY_RETRY_AFTER_S)
        if request.variant not in self.pipelines:
            raise ValueError(f"unknown variant {request.variant!r}; loaded: {', '.join(self.pipelines)}")
        queued = queued_rows(self._queue)
        if queued + request.num_images > self.queue_capacity:
            retry = math.ceil((queued / self._limit.current + 1) * self._generation_s())
            raise QueueFull(queued, self.queue_capacity, retry_after_s=max(1, retry))
        now = time.monotonic()
        pending = Pending(request, arrived=now, deadline=now + request.timeout_s)
        self._queue.append(pending)
        self._futures[pending] = asyncio.get_running_loop().create_future()
        self._wakeup.set()
        if self.metrics:  # accepted requests only: a refusal above is counted by its reason
            self.metrics.images_per_request.labels(request.variant).observe(request.num_images)
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
        if self._scale is not None:
            await self._scale.run()
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            self._expire_queued(now)
            decision = next_batch(self._queue, now, self._limit.current, self.max_wait_s)
            if decision.rows:
                self._queue = [p for p in self._queue if p.rows_waiting]
                await self._run(decision.rows, retry=True)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), decision.wait_s)

    def _expire_queued(self, now: float) -> None:
        for p in [p for p in self._queue if p.deadline <= now]:
            self._finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))

    async def _run(self, rows: list[BatchRow], *, retry: bool) -> None:
        """One batch. If it runs out of memory it is split in halves; if it raises otherwise, each of its
        images is retried once alone (retry), so that only the request of a poison image fails."""
        rows = self._admissible(rows)
        if not rows:
            return
        variant = rows[0].pending.variant
        try:
            out = await self._execute(variant, rows)
        except Exception as e:
            if out_of_memory(e):
                await self._after_out_of_memory(variant, len(rows), e)
                if len(rows) > 1:
                    half = len(rows) // 2
                    await self._run(rows[:half], retry=retry)
                    await self._run(rows[half:], retry=retry)
                    return
            if retry and len(rows) > 1:
                self._log_failure(variant, rows, e, "retrying each image alone")
                for r in rows:
                    await self._run([r], retry=False)
                return
            self._fail(variant, rows, e)
            return
        self._deliver(variant, rows, out)

    def _fail(self, variant: str, rows: list[BatchRow], error: Exception) -> None:
        """The requests of `rows` end with BatchFailed (the cause is logged under its error id)."""
        error_id = self._log_failure(variant, rows, error, "failing its requests")
        what = "out of memory" if out_of_memory(error) else "generation failed"
        for p in _requests_of(rows):
            self._finish(p, BatchFailed(error_id, what))

    def _admissible(self, rows: list[BatchRow]) -> list[BatchRow]:
        """The rows still awaited and within their deadline; a request past it ends now (504), uncomputed."""
        now = time.monotonic()
        for p in _requests_of(rows):
            if p in self._futures and p.deadline <= now:
                self._finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))
        return [r for r in rows if r.pending in self._futures]

    async def _execute(self, variant: str, rows: list[BatchRow]) -> BatchOutput:
        self._mark_started(_requests_of(rows))
        requests = [r.pending.request for r in rows]
        labels = [q.class_label for q in requests]
        params = [q.params for q in requests]
        seeds = [r.pending.request.seeds[r.row] for r in rows]
        self._inflight[variant] = len(rows)
        self.watchdog.batch_started(variant, len(rows))
        computed = False
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute_rows, variant, rows, labels, params, seeds
            )
            computed = True
        finally:
            self.watchdog.batch_ended(computed)
            self._inflight[variant] = 0
        self._limit.batch_done()
        if self.metrics:
            self.metrics.record_batch(variant, len(rows), out.stage_s)
            self.metrics.record_memory(variant, out.kv_cache_bytes, out.peak_bytes)
        return out

    def _compute_rows(
        self, variant: str, rows: list[BatchRow], labels: list[int], params: list[SamplingParams], seeds: list[int]
    ) -> BatchOutput:
        """Runs in the worker thread: the batch, the fault hook (tests only), which images are finite."""
        out = compute(self.pipelines[variant], labels, params, seeds)
        if self._fault is not None:
            out = dataclasses.replace(out, images=self._fault(rows, out.images))
        return dataclasses.replace(out, finite=finite_rows(out.images))

    async def _after_out_of_memory(self, variant: str, size: int, error: Exception) -> None:
        """Free what can be freed and lower the batch limit for a while."""
        self._limit.out_of_memory(size)
        log.warning(
            "out of memory in a batch of %d %s image(s) (%s); batch limit %d for the next %d batches",
            size, variant, error, self._limit.current, self._limit.backoff_batches,
        )  # fmt: skip
        if self.metrics:
            self.metrics.oom.labels(variant).inc()
        error.__traceback__ = None  # its frames hold the failed batch's tensors
        device = self.pipelines[variant].device
        await asyncio.get_running_loop().run_in_executor(self._executor, free_memory, device)

    def _mark_started(self, pendings: list[Pending]) -> None:
        now = time.monotonic()
        for p in pendings:
            if p.started is None:
                p.started = now
                if self.metrics:
                    self.metrics.queue_wait_seconds.labels(p.variant).observe(now - p.arrived)

    def _log_failure(self, variant: str, rows: list[BatchRow], error: Exception, then: str) -> str:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "batch failed: error id %s, variant %s, %d images; %s", error_id, variant, len(rows), then, exc_info=error
        )
        if self.metrics:
            self.metrics.batch_failures.labels(variant).inc()
        return error_id

    def _deliver(self, variant: str, rows: list[BatchRow], out: BatchOutput) -> None:
        corrupt = _requests_of([r for r, finite in zip(rows, out.finite, strict=True) if not finite])
        if corrupt:
            error_id = uuid.uuid4().hex[:12]
            n = out.finite.count(False)
            log.error("non-finite output: error id %s, variant %s, %d of %d images", error_id, variant, n, len(rows))
            if self.metrics:
                self.metrics.nonfinite_images.labels(variant).inc(n)
            for p in corrupt:
                self._finish(p, NonFiniteOutput(error_id))
        for i, r in enumerate(rows):
            r.pending.images[r.row] = out.images[i]
        for p in _requests_of(rows):
            if p not in self._futures:
                continue
            p.batch_sizes.append(len(rows))
            for k, v in out.stage_s.items():
                p.stage_s[k] = p.stage_s.get(k, 0.0) + v
            done = [im for im in p.images if im is not None]
            if len(done) == p.request.num_images:
                assert p.started is not None
                q = p.request
                result = GenerationResult(
                    torch.stack(done), q.seeds, p.variant, p.started - p.arrived, p.stage_s, p.batch_sizes,
                    timeout_s=q.timeout_s, deadline=p.deadline,
                )  # fmt: skip
                self._finish(p, result)


async def within_deadline(result: GenerationResult, work: Awaitable[T]) -> T:
    """Await what finishes the answer of `result` (the API's encoding) within the request's deadline, so that
    no answer arrives after timeout_s: DeadlineExceeded (504) when the deadline passes first."""
    left = result.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(work, timeout=None if math.isinf(left) else max(0.0, left))
    except TimeoutError:
        raise DeadlineExceeded(result.timeout_s, computed=True, encoding=True) from None


def _requests_of(rows: list[BatchRow]) -> list[Pending]:
    return list(dict.fromkeys(r.pending for r in rows))
