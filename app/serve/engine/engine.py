"""The engine: one per device. A bounded queue, dynamic batching, and one worker thread for the model.

Here: the lifecycle (warm-up, start, drain, stop), admission (backpressure with Retry-After, deadlines,
cancellation) and health. What the policies share, and how a request ends: `engine_core.py`. When waiting
images start (`policy`): `whole` (whole_batching.py), a batch runs every scale of its images before the next
starts; `scale` (scale_batching.py), requests join the running generations at the next scale boundary.

The event loop owns the queue and every future; the worker thread only runs the pipeline, so the loop stays
responsive while it computes. A batch's result or exception is set only on the futures of its own requests.
No web framework here: the API maps the exceptions of `batching` to HTTP.

Faults (each policy's module says how it retries): one poison image fails only its own request; running out
of memory halves the batch limit for a while; an image with NaN or infinite pixels fails its request (never a
200 with undefined pixels); a row whose deadline passed is never started. `health()` is the watchdog: a batch
(a step, a decode) running far past its expected time, or a dead scheduler, makes the engine unhealthy
(GET /healthz 503) so that the process gets restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from app.model.sampling import SamplingParams
from app.serve.batching import (
    BatchFailed,
    DeadlineExceeded,
    GenerationRequest,
    GenerationResult,
    NotAccepting,
    Pending,
    QueueFull,
    Rejection,
    queued_rows,
)
from app.serve.engine_core import EngineCore, Fault
from app.serve.metrics import ServeMetrics
from app.serve.scale_batching import ScaleBatching
from app.serve.watchdog import Unhealthy, Watchdog
from app.serve.whole_batching import WholeBatching
from app.serve.worker import Pipeline, compute

log = logging.getLogger(__name__)
T = TypeVar("T")
WATCHDOG_S = 120.0  # the watchdog's floor (VAR_WATCHDOG_S)
OOM_BACKOFF_BATCHES = 100  # after running out of memory, batches computed at the lowered limit
UNHEALTHY_RETRY_AFTER_S = 30
POLICIES = ("whole", "scale")
# `auto` picks `scale` for a transformer at least this wide (the released d16..d36 are 1024..2304): measured,
# at d16 on CPU, scale with the decode overlapped has 0.47x whole's p99 at 90% load; at the demo model's 256,
# where a step is too small for its per-group work to vanish beside its matmuls, 1.7x (docs/benchmarks.md)
SCALE_FROM_EMBED_DIM = 1024


def auto_policy(embed_dim: int) -> str:
    """The batching policy measured better for a transformer of this width (`SCALE_FROM_EMBED_DIM`)."""
    return "scale" if embed_dim >= SCALE_FROM_EMBED_DIM else "whole"


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
        overlap_decode: bool = False,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.queue_capacity = queue_capacity
        self.core = core = EngineCore(
            pipelines, max_batch_size=max_batch_size, max_wait_s=max_wait_s, metrics=metrics, watchdog_s=watchdog_s,
            oom_backoff_batches=oom_backoff_batches, fault=fault,
        )  # fmt: skip
        self.batching: WholeBatching | ScaleBatching = (
            ScaleBatching(core, overlap_decode) if policy == "scale" else WholeBatching(core)
        )
        self._scheduler: asyncio.Task[None] | None = None
        self._refusal: Refusal | None = NOT_STARTED  # None while accepting
        if metrics:
            for name in core.pipelines:
                metrics.watch_queue(
                    name,
                    functools.partial(self._queued, name),
                    functools.partial(self.batching.rows_in_flight, name),
                )
            metrics.batch_limit.set_function(lambda: core.limit.current)

    @property
    def pipelines(self) -> dict[str, Pipeline]:
        return self.core.pipelines

    @property
    def metrics(self) -> ServeMetrics | None:
        return self.core.metrics

    @property
    def watchdog(self) -> Watchdog:
        return self.core.watchdog

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
                    self.core.executor, compute, pipe, [0] * bs, [params] * bs, list(range(bs))
                )
                if self.metrics:  # the memory a batch of each size needs is known before the first request
                    self.metrics.record_memory(name, out.kv_cache_bytes, out.peak_bytes)
            log.info("warmed up %s at batch sizes %s in %.1f s", name, list(batch_sizes), time.monotonic() - t0)

    def start(self) -> None:
        """Start taking requests; once only, and never after a drain or stop."""
        if self._refusal is not NOT_STARTED:
            raise RuntimeError(f"the engine is {self._refusal.state if self._refusal else 'started'}; it starts once")
        self._scheduler = asyncio.get_running_loop().create_task(self.batching.run(), name="var-engine-scheduler")
        self._scheduler.add_done_callback(self._scheduler_ended)
        self._refusal = None

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests, give accepted ones grace_s to finish; fail what is left. Returns how many."""
        self._refusal = DRAINING
        if self.core.futures:
            await asyncio.wait(list(self.core.futures.values()), timeout=grace_s)
        left = list(self.core.futures)
        for p in left:
            self.core.finish(p, NotAccepting(Rejection.DRAINING, "shut down before it was computed", retry_after_s=1))
        return len(left)

    async def stop(self) -> None:
        self._refusal = STOPPED
        if self._scheduler:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a crash was logged when it happened
                await self._scheduler
        for p in list(self.core.futures):
            self.core.finish(p, NotAccepting(Rejection.DRAINING, "stopped", retry_after_s=1))
        self.core.executor.shutdown(wait=False, cancel_futures=True)
        self.batching.close()

    def queued_images(self) -> int:
        return queued_rows(self.core.queue)

    def _queued(self, variant: str) -> int:
        return queued_rows(self.core.queue, variant)

    @property
    def batch_limit(self) -> int:
        """The most images the next batch may hold (lowered for a while after running out of memory)."""
        return self.core.limit.current

    # ---- watchdog --------------------------------------------------------------------------------
    def health(self) -> Unhealthy | None:
        """None while the engine can answer; else why it cannot: its scheduler died, or a batch has run far past
        its expected time (the worker thread is stuck)."""
        problem = self.watchdog.check()
        if problem is None and isinstance(self.batching, ScaleBatching):
            problem = self.batching.decode_watchdog.check()
        return problem

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        if self._refusal is STOPPED:
            return
        error = None if task.cancelled() else task.exception()
        error_id = uuid.uuid4().hex[:12]
        died = f"{type(error).__name__}: {error}" if error else "cancelled"
        self.watchdog.scheduler_died = f"{died} (error id {error_id})"
        log.error(
            "engine scheduler died (error id %s); failing %d accepted request(s)", error_id, len(self.core.futures),
            exc_info=error,
        )  # fmt: skip
        for p in list(self.core.futures):
            self.core.finish(p, BatchFailed(error_id, "the engine's scheduler failed"))

    # ---- requests --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Queue the request and wait for its images. Raises the errors of `app.serve.batching`;
        cancelling the caller (a client gone) withdraws the request's rows not yet computed."""
        pending = self._admit(request)
        future = self.core.futures[pending]
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
        queued = queued_rows(self.core.queue)
        if queued + request.num_images > self.queue_capacity:
            retry = math.ceil((queued / self.core.limit.current + 1) * self.batching.generation_s())
            raise QueueFull(queued, self.queue_capacity, retry_after_s=max(1, retry))
        now = time.monotonic()
        pending = Pending(request, arrived=now, deadline=now + request.timeout_s)
        self.core.queue.append(pending)
        self.core.futures[pending] = asyncio.get_running_loop().create_future()
        self.core.wakeup.set()
        if self.metrics:  # accepted requests only: a refusal above is counted by its reason
            self.metrics.images_per_request.labels(request.variant).observe(request.num_images)
        return pending

    def _withdraw(self, pending: Pending) -> None:
        """Drop the request's rows not yet handed to a batch; its answer is no longer awaited."""
        pending.next_row = pending.request.num_images
        with contextlib.suppress(ValueError):
            self.core.queue.remove(pending)
        future = self.core.futures.pop(pending, None)
        if future and not future.done():
            future.cancel()


async def within_deadline(result: GenerationResult, work: Awaitable[T]) -> T:
    """Await what finishes the answer of `result` (the API's encoding) within the request's deadline, so that
    no answer arrives after timeout_s: DeadlineExceeded (504) when the deadline passes first."""
    left = result.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(work, timeout=None if math.isinf(left) else max(0.0, left))
    except TimeoutError:
        raise DeadlineExceeded(result.timeout_s, computed=True, encoding=True) from None
