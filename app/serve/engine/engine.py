"""The engine: one per device. A bounded queue, dynamic batching, and one worker thread for the model.

Here: the lifecycle (start, variants added while serving, drain, stop), admission (backpressure with
Retry-After, deadlines, cancellation, variants not ready yet) and health. What the policies share, and how a
request ends: `core.py`; when waiting images start: the `BatchingPolicy` (`policy.py`).

The event loop owns the queue and every future; the worker thread only runs the pipeline, so the loop stays
responsive while it computes. A batch's result or exception is set only on the futures of its own requests.
No web framework here: the HTTP layer maps the errors of `errors.py` to answers.

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
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from app.serve.engine.core import EngineCore, Fault
from app.serve.engine.errors import BatchFailed, DeadlineExceeded, Draining, NotReady, QueueFull, UnknownVariant
from app.serve.engine.fidelity import ShadowFidelity
from app.serve.engine.lifecycle import DRAINING_RETRY_AFTER_S, Lifecycle, Phase
from app.serve.engine.policy import make_policy
from app.serve.engine.requests import GenerationRequest, GenerationResult, Pending
from app.serve.engine.variants import VariantStatus
from app.serve.engine.watchdog import Unhealthy
from app.serve.engine.worker import Pipeline
from app.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
WATCHDOG_S = 120.0  # the watchdog's floor (VAR_WATCHDOG_S)
OOM_BACKOFF_BATCHES = 100  # after running out of memory, batches computed at the lowered limit


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
        lifecycle: Lifecycle | None = None,
        variants: Mapping[str, VariantStatus] | None = None,
        fidelity_rate: float = 0.0,
        fidelity_reference: str = "baseline",
    ):
        self.policy = policy
        # every configured variant, those still starting or failed included (their requests are refused
        # naming why); None: just the pipelines given
        self.variants = variants or {}
        self.queue_capacity = queue_capacity
        self.lifecycle = lifecycle or Lifecycle()  # the service's, when it has one
        metrics = metrics or ServeMetrics(list(pipelines), max_batch_size, queue_capacity)
        self.core = core = EngineCore(
            pipelines, max_batch_size=max_batch_size, max_wait_s=max_wait_s, metrics=metrics, watchdog_s=watchdog_s,
            oom_backoff_batches=oom_backoff_batches, fault=fault,
        )  # fmt: skip
        self.batching = make_policy(policy, core, overlap_decode)
        self._scheduler: asyncio.Task[None] | None = None
        # shadow fidelity (fidelity.py): off at rate 0
        self.fidelity = ShadowFidelity(core, reference=fidelity_reference, rate=fidelity_rate)
        self._scorer: asyncio.Task[None] | None = None
        if fidelity_rate > 0:
            core.on_delivered = self.fidelity.offer
            metrics.watch_fidelity(fidelity_reference, len(next(iter(core.pipelines.values())).steps))
        for name in core.pipelines:
            self._watch(name)
        metrics.batch_limit.set_function(lambda: core.limit.current)

    def _watch(self, name: str) -> None:
        self.metrics.watch_queue(
            name,
            functools.partial(self.core.requests.rows_waiting, name),
            functools.partial(self.batching.rows_in_flight, name),
        )

    @property
    def pipelines(self) -> dict[str, Pipeline]:
        return self.core.pipelines

    @property
    def metrics(self) -> ServeMetrics:
        return self.core.metrics

    @property
    def batch_limit(self) -> int:
        """The most images the next batch may hold (lowered for a while after running out of memory)."""
        return self.core.limit.current

    def queued_images(self) -> int:
        return self.core.requests.rows_waiting()

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start taking requests; once only, and never after a drain or stop."""
        if self.lifecycle.phase is not Phase.LOADING:
            raise RuntimeError(f"the engine is {self.lifecycle.phase}; it starts once")
        self._scheduler = asyncio.get_running_loop().create_task(self.batching.run(), name="var-engine-scheduler")
        self._scheduler.add_done_callback(self._scheduler_ended)
        if self.fidelity.rate > 0:
            self._scorer = asyncio.get_running_loop().create_task(self.fidelity.run(), name="var-fidelity-scorer")
        self.lifecycle.move(Phase.READY)

    async def add_variant(self, name: str, pipeline: Pipeline) -> None:
        """Serve `name` from now on: a variant that finished starting while the engine serves others (its
        warm-up done). What the policy holds for it (the scale policy's KV pool) exists before its first
        request is admitted."""
        if name in self.pipelines:
            raise ValueError(f"variant {name} is already served")
        await self.batching.add_variant(name, pipeline)
        self.core.pipelines[name] = pipeline
        self._watch(name)

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests, give accepted ones grace_s to finish; fail what is left. Returns how many."""
        self.lifecycle.drain()
        await self.core.requests.settled(grace_s)
        return self._refuse_accepted("shut down before it was computed")

    async def stop(self) -> None:
        self.lifecycle.stop()
        for task in filter(None, (self._scorer, self._scheduler)):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a crash was logged when it happened
                await task
        self._refuse_accepted("stopped")
        self.core.close()
        self.batching.close()

    def _refuse_accepted(self, why: str) -> int:
        left = self.core.requests.accepted()
        for p in left:
            self.core.requests.finish(p, Draining(why, DRAINING_RETRY_AFTER_S))
        return len(left)

    # ---- watchdog --------------------------------------------------------------------------------
    def health(self) -> Unhealthy | None:
        """None while the engine can answer; else why it cannot: its scheduler died, or a batch (a step, a
        decode) has run far past its expected time (a worker thread is stuck)."""
        return self.core.watchdog.check() or self.batching.health()

    def _scheduler_ended(self, task: asyncio.Task[None]) -> None:
        if self.lifecycle.phase is Phase.STOPPED:
            return
        error = None if task.cancelled() else task.exception()
        error_id = uuid.uuid4().hex[:12]
        died = f"{type(error).__name__}: {error}" if error else "cancelled"
        self.core.watchdog.scheduler_died = f"{died} (error id {error_id})"
        accepted = self.core.requests.accepted()
        log.error(
            "engine scheduler died (error id %s); failing %d accepted request(s)", error_id, len(accepted),
            exc_info=error,
        )  # fmt: skip
        for p in accepted:
            self.core.requests.finish(p, BatchFailed(error_id, "the engine's scheduler failed"))

    # ---- requests --------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Queue the request and wait for its images. Raises the errors of `errors.py`; cancelling the caller
        (a client gone) withdraws the request's rows not yet computed."""
        pending, future = self._admit(request)
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, pending.deadline - time.monotonic()))
        except TimeoutError:
            self.core.requests.withdraw(pending)
            raise DeadlineExceeded(request.timeout_s, computed=pending.started is not None) from None
        except asyncio.CancelledError:
            self.core.requests.withdraw(pending)
            raise

    def _admit(self, request: GenerationRequest) -> tuple[Pending, asyncio.Future[GenerationResult]]:
        problem = self.health()
        if (refusal := self.lifecycle.refusal(problem.detail if problem else None)) is not None:
            raise refusal
        if request.variant not in self.pipelines:
            raise self._not_served(request.variant)
        queued = self.queued_images()
        if queued + request.num_images > self.queue_capacity:
            raise self._queue_full(queued)
        now = time.monotonic()
        pending = Pending(request, arrived=now, deadline=now + request.timeout_s)
        # accepted requests only: a refusal above is counted by its reason
        self.metrics.images_per_request.labels(request.variant).observe(request.num_images)
        return pending, self.core.requests.add(pending)

    def full(self) -> QueueFull | None:
        """The refusal of any request while the queue has no free row and the engine accepts requests (else
        None): what the HTTP layer answers before it parses a request (`http/middleware.py`, ShedWhenFull)."""
        queued = self.queued_images()
        if queued < self.queue_capacity:
            return None
        problem = self.health()
        if self.lifecycle.refusal(problem.detail if problem else None) is not None:
            return None  # the request's own path answers why the engine does not accept it
        return self._queue_full(queued)

    def _queue_full(self, queued: int) -> QueueFull:
        retry = math.ceil((queued / self.core.limit.current + 1) * self.batching.generation_s())
        return QueueFull(queued, self.queue_capacity, retry_after_s=max(1, retry))

    def _not_served(self, variant: str) -> NotReady | UnknownVariant:
        """Why a request for `variant` cannot be queued: it is still starting or failed, or it is no variant."""
        status = self.variants.get(variant)
        refusal = status.refusal() if status is not None else None
        return refusal if refusal is not None else UnknownVariant(variant, list(self.pipelines))


async def within_deadline(result: GenerationResult, work: Awaitable[T]) -> T:
    """Await what finishes the answer of `result` (the API's encoding) within the request's deadline, so that
    no answer arrives after timeout_s: DeadlineExceeded (504) when the deadline passes first."""
    left = result.deadline - time.monotonic()
    try:
        return await asyncio.wait_for(work, timeout=None if math.isinf(left) else max(0.0, left))
    except TimeoutError:
        raise DeadlineExceeded(result.timeout_s, computed=True, encoding=True) from None
