"""The `whole` batching policy: a batch runs every scale of its images before the next batch starts.

A variant's waiting images start as one batch when it has `max_batch_size` of them or its oldest has waited
`max_wait_s` (`queue.next_batch`); the worker thread runs `pipeline.generate` on them. Faults: a batch that
raises is retried once image by image, so one poison image fails only its own request; a batch that runs out
of memory is split in halves and the batch limit is halved for a while; a row whose deadline passed is never
handed to a batch.
"""

from __future__ import annotations

import dataclasses
import time

from app.model.sampling import SamplingParams
from app.serve.engine.core import EngineCore
from app.serve.engine.requests import BatchRow, requests_of, row_inputs
from app.serve.engine.watchdog import Unhealthy
from app.serve.engine.worker import BatchOutput, Pipeline, compute, out_of_memory


class WholeBatching:
    """The engine's scheduler under the `whole` policy (a `BatchingPolicy`)."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.inflight: dict[str, int] = dict.fromkeys(core.pipelines, 0)  # images of the batch computing

    def rows_in_flight(self, variant: str | None = None) -> int:
        return sum(n for v, n in self.inflight.items() if variant is None or v == variant)

    def generation_s(self) -> float:
        return self.core.watchdog.batch_s

    def health(self) -> Unhealthy | None:
        return None  # its one thread is the core's worker, under the core's watchdog

    async def add_variant(self, name: str, pipeline: Pipeline) -> None:
        self.inflight[name] = 0

    def close(self) -> None:
        pass  # it holds nothing beyond the core

    async def run(self) -> None:
        core = self.core
        while True:
            now = time.monotonic()
            core.requests.expire(now)
            decision = core.requests.next_batch(now, core.limit.current, core.max_wait_s)
            if decision.rows:
                await self._run(decision.rows, retry=True)
            else:
                await core.requests.wait_for_work(decision.wait_s)

    async def _run(self, rows: list[BatchRow], *, retry: bool) -> None:
        """One batch. If it runs out of memory it is split in halves; if it raises otherwise, each of its
        images is retried once alone (retry), so that only the request of a poison image fails."""
        core = self.core
        core.requests.expire(time.monotonic(), among=requests_of(rows))  # a request past its deadline: 504 now
        rows = [r for r in rows if core.requests.awaited(r.pending)]
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

    async def _execute(self, variant: str, rows: list[BatchRow]) -> BatchOutput:
        core = self.core
        core.mark_started(requests_of(rows))
        labels, params, seeds = row_inputs(rows)
        self.inflight[variant] = len(rows)
        try:
            out = await core.watched(variant, len(rows), self._compute_rows, variant, rows, labels, params, seeds)
        finally:
            self.inflight[variant] = 0
        core.metrics.record_memory(variant, out.kv_cache_bytes, out.peak_bytes)
        return out

    def _compute_rows(
        self, variant: str, rows: list[BatchRow], labels: list[int], params: list[SamplingParams], seeds: list[int]
    ) -> BatchOutput:
        """Runs in the worker thread: the batch, the fault hook (tests only), which images are finite."""
        out = compute(self.core.pipelines[variant], labels, params, seeds)
        images, finite = self.core.checked(rows, out.images)
        return dataclasses.replace(out, images=images, finite=finite)
