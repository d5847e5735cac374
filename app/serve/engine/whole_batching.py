"""The `whole` batching policy: a batch runs every scale of its images before the next batch starts.

A variant's waiting images start as one batch when it has `max_batch_size` of them or its oldest has waited
`max_wait_s` (`batching.next_batch`); the worker thread runs `pipeline.generate` on them. Faults: a batch that
raises is retried once image by image, so one poison image fails only its own request; a batch that runs out
of memory is split in halves and the batch limit is halved for a while; a row whose deadline passed is never
handed to a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

from app.model.sampling import SamplingParams
from app.serve.batching import BatchRow, DeadlineExceeded, next_batch, row_inputs
from app.serve.engine_core import EngineCore, requests_of
from app.serve.worker import BatchOutput, compute, out_of_memory


class WholeBatching:
    """The engine's scheduler under the `whole` policy."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.inflight: dict[str, int] = dict.fromkeys(core.pipelines, 0)  # images of the batch computing

    def rows_in_flight(self, variant: str) -> int:
        return self.inflight[variant]

    def generation_s(self) -> float:
        """The running estimate of one generation's seconds (for Retry-After)."""
        return self.core.watchdog.batch_s

    def close(self) -> None:
        pass

    async def run(self) -> None:
        core = self.core
        while True:
            core.wakeup.clear()
            now = time.monotonic()
            core.expire_queued(now)
            decision = next_batch(core.queue, now, core.limit.current, core.max_wait_s)
            if decision.rows:
                core.queue = [p for p in core.queue if p.rows_waiting]
                await self._run(decision.rows, retry=True)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(core.wakeup.wait(), decision.wait_s)

    async def _run(self, rows: list[BatchRow], *, retry: bool) -> None:
        """One batch. If it runs out of memory it is split in halves; if it raises otherwise, each of its
        images is retried once alone (retry), so that only the request of a poison image fails."""
        core = self.core
        rows = self._admissible(rows)
        if not rows:
            return
        variant = rows[0].pending.variant
        try:
            out = await self._execute(variant, rows)
        except Exception as e:
            if out_of_memory(e):
                await core.after_out_of_memory(variant, len(rows), e)
                if len(rows) > 1:
                    half = len(rows) // 2
                    await self._run(rows[:half], retry=retry)
                    await self._run(rows[half:], retry=retry)
                    return
            if retry and len(rows) > 1:
                core.log_failure(variant, rows, e, "retrying each image alone")
                for r in rows:
                    await self._run([r], retry=False)
                return
            core.fail(variant, rows, e)
            return
        core.deliver(variant, rows, out)

    def _admissible(self, rows: list[BatchRow]) -> list[BatchRow]:
        """The rows still awaited and within their deadline; a request past it ends now (504), uncomputed."""
        core = self.core
        now = time.monotonic()
        for p in requests_of(rows):
            if p in core.futures and p.deadline <= now:
                core.finish(p, DeadlineExceeded(p.request.timeout_s, computed=p.started is not None))
        return [r for r in rows if r.pending in core.futures]

    async def _execute(self, variant: str, rows: list[BatchRow]) -> BatchOutput:
        core = self.core
        core.mark_started(requests_of(rows))
        labels, params, seeds = row_inputs(rows)
        self.inflight[variant] = len(rows)
        core.watchdog.batch_started(variant, len(rows))
        computed = False
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                core.executor, self._compute_rows, variant, rows, labels, params, seeds
            )
            computed = True
        finally:
            core.watchdog.batch_ended(computed)
            self.inflight[variant] = 0
        core.limit.batch_done()
        if core.metrics:
            core.metrics.record_batch(variant, len(rows), out.stage_s)
            core.metrics.record_memory(variant, out.kv_cache_bytes, out.peak_bytes)
        return out

    def _compute_rows(
        self, variant: str, rows: list[BatchRow], labels: list[int], params: list[SamplingParams], seeds: list[int]
    ) -> BatchOutput:
        """Runs in the worker thread: the batch, the fault hook (tests only), which images are finite."""
        core = self.core
        out = compute(core.pipelines[variant], labels, params, seeds)
        images, finite = core.checked(rows, out.images)
        return dataclasses.replace(out, images=images, finite=finite)
