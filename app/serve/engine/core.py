"""What the engine's two batching policies share: the pipelines, the accepted requests, the batch limit, the
worker thread, the watchdog and the metrics; and how a request ends (its images delivered, or an error on its
future only). Event-loop side, except `checked`, which the worker thread runs after the pipeline. No policy
here: a policy asks for rows (`requests.next_batch`), runs work in the worker (`in_worker`), and hands back
what came out (`deliver`, `fail`, `after_out_of_memory`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

from app.serve.engine.batch_limit import BatchLimit
from app.serve.engine.errors import BatchFailed, NonFiniteOutput
from app.serve.engine.queue import RequestQueue
from app.serve.engine.requests import BatchRow, GenerationResult, Pending, requests_of
from app.serve.engine.watchdog import Watchdog
from app.serve.engine.worker import BatchOutput, Pipeline, finite_rows, free_memory, out_of_memory
from app.serve.metrics import ServeMetrics

log = logging.getLogger("app.serve.engine")  # one logger for the engine, whichever module logs
P = ParamSpec("P")
T = TypeVar("T")
# A test hook, None in service: called in the worker thread with each batch's rows and images after the
# pipeline; it may raise (a poison row, MemoryError), sleep or block (a slow or stuck batch), or return other
# images (NaN pixels).
Fault = Callable[[list[BatchRow], torch.Tensor], torch.Tensor]
# Told of every delivered batch after its requests have their images (shadow fidelity samples from them)
DeliveryObserver = Callable[[str, list[BatchRow], BatchOutput], None]


class EngineCore:
    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        *,
        max_batch_size: int,
        max_wait_s: float,
        metrics: ServeMetrics,
        watchdog_s: float,
        oom_backoff_batches: int,
        fault: Fault | None,
    ):
        self.pipelines = dict(pipelines)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.fault = fault
        self.limit = BatchLimit(max_batch_size, oom_backoff_batches)
        self.requests = RequestQueue()
        self.watchdog = Watchdog(watchdog_s)  # also the running mean of a batch's (a step's) seconds
        self.on_delivered: DeliveryObserver | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="var-engine")

    @property
    def device(self) -> torch.device:
        return next(iter(self.pipelines.values())).device

    async def in_worker(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run fn in the worker thread (the only thread that computes), the event loop free meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def watched(self, what: str, size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`in_worker` under the watchdog: a batch (a step) of `size` images that runs far past its expected
        time makes the engine unhealthy; one that returns updates the expected time."""
        self.watchdog.batch_started(what, size)
        done = False
        try:
            out = await self.in_worker(fn, *args, **kwargs)
            done = True
            return out
        finally:
            self.watchdog.batch_ended(done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def checked(self, rows: list[BatchRow], images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """In the worker thread, after the pipeline: the fault hook (tests only), then which images are finite."""
        if self.fault is not None:
            images = self.fault(rows, images)
        return images, finite_rows(images)

    def mark_started(self, pendings: list[Pending]) -> None:
        now = time.monotonic()
        for p in pendings:
            if p.started is None:
                p.started = now
                self.metrics.queue_wait_seconds.labels(p.variant).observe(now - p.arrived)

    async def after_out_of_memory(self, variant: str, size: int, error: Exception) -> None:
        """Free what can be freed and lower the batch limit for a while."""
        self.limit.out_of_memory(size)
        log.warning(
            "out of memory in a batch of %d %s image(s) (%s); batch limit %d for the next %d batches",
            size, variant, error, self.limit.current, self.limit.backoff_batches,
        )  # fmt: skip
        self.metrics.oom.labels(variant).inc()
        error.__traceback__ = None  # its frames hold the failed batch's tensors
        await self.in_worker(free_memory, self.pipelines[variant].device)

    def log_failure(self, variant: str, rows: list[BatchRow], error: Exception, then: str) -> str:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "batch failed: error id %s, variant %s, %d images; %s", error_id, variant, len(rows), then, exc_info=error
        )
        self.metrics.batch_failures.labels(variant).inc()
        return error_id

    def fail(self, variant: str, rows: list[BatchRow], error: Exception) -> None:
        """The requests of `rows` end with BatchFailed (the cause is logged under its error id)."""
        error_id = self.log_failure(variant, rows, error, "failing its requests")
        what = "out of memory" if out_of_memory(error) else "generation failed"
        for p in requests_of(rows):
            self.requests.finish(p, BatchFailed(error_id, what))

    def deliver(self, variant: str, rows: list[BatchRow], out: BatchOutput) -> None:
        """A computed batch: requests with a non-finite image fail; the others get their images, and those now
        complete their answer."""
        self.limit.batch_done()
        self.metrics.record_batch(variant, len(rows), out.stage_s)
        corrupt = requests_of([r for r, finite in zip(rows, out.finite, strict=True) if not finite])
        if corrupt:
            error_id = uuid.uuid4().hex[:12]
            n = out.finite.count(False)
            log.error("non-finite output: error id %s, variant %s, %d of %d images", error_id, variant, n, len(rows))
            self.metrics.nonfinite_images.labels(variant).inc(n)
            for p in corrupt:
                self.requests.finish(p, NonFiniteOutput(error_id))
        for i, r in enumerate(rows):
            r.pending.images[r.row] = out.images[i]
        for p in requests_of(rows):
            if self.requests.awaited(p):
                p.batch_sizes.append(len(rows))
                for k, v in out.stage_s.items():
                    p.stage_s[k] = p.stage_s.get(k, 0.0) + v
                if all(im is not None for im in p.images):
                    self.requests.finish(p, result_of(p))
        if self.on_delivered is not None:
            self.on_delivered(variant, rows, out)


def result_of(p: Pending) -> GenerationResult:
    """The answer of a request whose every image is computed."""
    assert p.started is not None
    images = torch.stack([im for im in p.images if im is not None])
    q = p.request
    return GenerationResult(
        images, q.seeds, p.variant, p.started - p.arrived, p.stage_s, p.batch_sizes,
        timeout_s=q.timeout_s, deadline=p.deadline,
    )  # fmt: skip
