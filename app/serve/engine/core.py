"""What the engine's two batching policies share: the pipelines, the queue and the futures of accepted
requests, the batch limit, the worker thread, the watchdog and the metrics; and how a request ends (its
images delivered, or an error on its future only). Event-loop side, except `checked`, which the worker thread
runs after the pipeline; no policy here."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from app.serve.batching import (
    BatchFailed,
    BatchLimit,
    BatchRow,
    DeadlineExceeded,
    GenerationResult,
    NonFiniteOutput,
    Pending,
)
from app.serve.metrics import ServeMetrics
from app.serve.watchdog import Watchdog
from app.serve.worker import BatchOutput, Pipeline, finite_rows, free_memory, out_of_memory

log = logging.getLogger("app.serve.engine")  # one logger for the engine, whichever module logs
# A test hook, None in service: called in the worker thread with each batch's rows and images after the
# pipeline; it may raise (a poison row, MemoryError), sleep or block (a slow or stuck batch), or return other
# images (NaN pixels).
Fault = Callable[[list[BatchRow], torch.Tensor], torch.Tensor]


class EngineCore:
    def __init__(
        self,
        pipelines: Mapping[str, Pipeline],
        *,
        max_batch_size: int,
        max_wait_s: float,
        metrics: ServeMetrics | None,
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
        self.queue: list[Pending] = []
        self.futures: dict[Pending, asyncio.Future[GenerationResult]] = {}  # accepted, not answered
        self.wakeup = asyncio.Event()  # set when there is something new to schedule
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="var-engine")
        self.watchdog = Watchdog(watchdog_s)  # also the running mean of a batch's (a step's) seconds

    def checked(self, rows: list[BatchRow], images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """In the worker thread, after the pipeline: the fault hook (tests only), then which images are finite."""
        if self.fault is not None:
            images = self.fault(rows, images)
        return images, finite_rows(images)

    def finish(self, pending: Pending, outcome: GenerationResult | Exception) -> None:
        future = self.futures.pop(pending, None)
        if pending in self.queue:
            self.queue.remove(pending)
        pending.next_row = pending.request.num_images
        if future is None or future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def expire_queued(self, now: float) -> None:
        for p in [p for p in self.queue if p.deadline <= now]:
            self.finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))

    def mark_started(self, pendings: list[Pending]) -> None:
        now = time.monotonic()
        for p in pendings:
            if p.started is None:
                p.started = now
                if self.metrics:
                    self.metrics.queue_wait_seconds.labels(p.variant).observe(now - p.arrived)

    async def after_out_of_memory(self, variant: str, size: int, error: Exception) -> None:
        """Free what can be freed and lower the batch limit for a while."""
        self.limit.out_of_memory(size)
        log.warning(
            "out of memory in a batch of %d %s image(s) (%s); batch limit %d for the next %d batches",
            size, variant, error, self.limit.current, self.limit.backoff_batches,
        )  # fmt: skip
        if self.metrics:
            self.metrics.oom.labels(variant).inc()
        error.__traceback__ = None  # its frames hold the failed batch's tensors
        device = self.pipelines[variant].device
        await asyncio.get_running_loop().run_in_executor(self.executor, free_memory, device)

    def log_failure(self, variant: str, rows: list[BatchRow], error: Exception, then: str) -> str:
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "batch failed: error id %s, variant %s, %d images; %s", error_id, variant, len(rows), then, exc_info=error
        )
        if self.metrics:
            self.metrics.batch_failures.labels(variant).inc()
        return error_id

    def fail(self, variant: str, rows: list[BatchRow], error: Exception) -> None:
        """The requests of `rows` end with BatchFailed (the cause is logged under its error id)."""
        error_id = self.log_failure(variant, rows, error, "failing its requests")
        what = "out of memory" if out_of_memory(error) else "generation failed"
        for p in requests_of(rows):
            self.finish(p, BatchFailed(error_id, what))

    def deliver(self, variant: str, rows: list[BatchRow], out: BatchOutput) -> None:
        corrupt = requests_of([r for r, finite in zip(rows, out.finite, strict=True) if not finite])
        if corrupt:
            error_id = uuid.uuid4().hex[:12]
            n = out.finite.count(False)
            log.error("non-finite output: error id %s, variant %s, %d of %d images", error_id, variant, n, len(rows))
            if self.metrics:
                self.metrics.nonfinite_images.labels(variant).inc(n)
            for p in corrupt:
                self.finish(p, NonFiniteOutput(error_id))
        for i, r in enumerate(rows):
            r.pending.images[r.row] = out.images[i]
        for p in requests_of(rows):
            if p not in self.futures:
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
                self.finish(p, result)


def requests_of(rows: list[BatchRow]) -> list[Pending]:
    return list(dict.fromkeys(r.pending for r in rows))
