"""The `scale` batching policy: requests join the running generation at the next scale, not after it.

A generation is one step per scale. Under `whole` a batch runs all its scales before the next batch starts,
so a request that arrives just after a batch began waits a whole generation. Under `scale` the engine steps
every generation in flight one scale at a time, and at each step boundary it admits waiting rows (up to the
batch limit, in rows in flight) and retires the finished ones:

- the rows admitted at one boundary form a cohort: one `Rollout`, whose rows stay at one scale together (each
  step advances every cohort one scale), with its KV cache leased from the variant's preallocated `KVPool`
  and returned when its images are decoded;
- each step runs, per variant, one `step_all` over its cohorts: their linear layers over the tokens of all of
  them at once, attention per cohort over its own cache (grouping by scale: the cohorts are the groups);
- a row whose request is no longer awaited (its deadline passed, its client left, another of its rows failed)
  leaves its cohort at the next boundary, and its cache rows go back to the pool;
- a cohort that raises fails no one at first: its rows start again, each alone and stepped alone, and only a
  row that fails alone fails its request (the `whole` policy's retry, per row);
- images are decoded in the step in which their cohort finishes, or (`overlap_decode`) in a thread of their
  own while the next step runs: the cohort's cache rows return to the pool at once, and the decode runs on a
  core that torch's threads leave free (where one is: the server's default on the CPU leaves one).

Every row computes exactly what it computes alone (the model's batch invariance, tested through the API), so
the policy changes when an image is ready, never which image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field

from app.model.kv_cache import KVLease, KVPool
from app.model.memory import peak_above_start
from app.model.rollout import Rollout
from app.model.timing import Stage, StageTimer
from app.serve.engine.core import EngineCore
from app.serve.engine.requests import BatchRow, row_inputs
from app.serve.engine.threads import in_own_thread
from app.serve.engine.watchdog import Unhealthy, Watchdog
from app.serve.engine.worker import BatchOutput, Pipeline, out_of_memory


@dataclass(eq=False)
class Cohort:
    """Rows admitted at one step boundary: one rollout, at one scale, until its images are decoded."""

    variant: str
    rows: list[BatchRow]
    retry: bool  # on failure its rows start again alone; False: they are that retry, stepped alone
    lease: KVLease | None = None  # its cache rows, until its rollout starts (then the rollout's)
    rollout: Rollout | None = None
    stage_s: dict[Stage, float] = field(default_factory=dict)


@dataclass
class StepPlan:
    """What one step does, decided on the event loop: rows leaving, cohorts joining."""

    leaving: list[tuple[Cohort, list[int]]]  # the rows (indices) each cohort keeps; none: it leaves whole
    joining: list[Cohort]


@dataclass
class StepOutcome:
    finished: list[tuple[Cohort, BatchOutput]] = field(default_factory=list)
    to_decode: list[Cohort] = field(default_factory=list)  # with overlap_decode: finished, not yet decoded
    failed: list[tuple[Cohort, Exception]] = field(default_factory=list)
    seconds: float = 0.0
    peak_bytes: int | None = None  # `peak_above_start` of the step


class ScaleBatching:
    """The engine's scheduler under the `scale` policy (a `BatchingPolicy`); state on the event loop, tensors in
    the worker."""

    def __init__(self, core: EngineCore, overlap_decode: bool = False):
        self.core = core
        self.overlap_decode = overlap_decode
        # one decode at a time, each in a thread of its own that ends with it (`threads.in_own_thread`): a
        # decode thread that lived on would keep a second OpenMP team, which throttles the worker's
        self._decode_turn = asyncio.Lock()
        self.decode_watchdog = Watchdog(core.watchdog.floor_s)  # a decode stuck in its thread is unhealthy too
        self._decoding: set[asyncio.Task[None]] = set()
        self.pools: dict[str, KVPool] = {
            name: pipe.new_pool(core.max_batch_size) for name, pipe in core.pipelines.items()
        }
        self.flight: list[Cohort] = []
        self.retries: list[BatchRow] = []  # rows of failed cohorts, to start again alone
        for name, pool in self.pools.items():
            core.metrics.record_memory(name, pool.nbytes(), None)

    def generation_s(self) -> float:
        """The running estimate of one generation's seconds (for Retry-After): a step's times the scales."""
        return self.core.watchdog.batch_s * max(len(p.steps) for p in self.core.pipelines.values())

    def health(self) -> Unhealthy | None:
        return self.decode_watchdog.check()

    async def add_variant(self, name: str, pipeline: Pipeline) -> None:
        """Its KV pool, allocated off the event loop (hundreds of MiB for a large model)."""
        pool = await in_own_thread(pipeline.new_pool, self.core.max_batch_size)
        self.pools[name] = pool
        self.core.metrics.record_memory(name, pool.nbytes(), None)

    def close(self) -> None:
        for task in self._decoding:  # waiting for its turn, or for its thread (which ends by itself)
            task.cancel()

    def rows_in_flight(self, variant: str | None = None) -> int:
        return sum(len(c.rows) for c in self.flight if variant is None or c.variant == variant)

    # ---- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        requests = self.core.requests
        while True:
            now = time.monotonic()
            requests.expire(now)
            plan = StepPlan(self._leaving(), self._admit(now))
            if not self.flight and not plan.leaving:  # idle: until a request arrives or the oldest is due
                await requests.wait_for_work(requests.due_in(now, self.core.max_wait_s))
                continue
            outcome = await self._step(plan)
            await self._settle(outcome)

    def _leaving(self) -> list[tuple[Cohort, list[int]]]:
        """Cohorts with rows no longer awaited: those rows leave (the whole cohort when none is left)."""
        leaving = []
        for c in list(self.flight):
            keep = [i for i, r in enumerate(c.rows) if self.core.requests.awaited(r.pending)]
            if len(keep) == len(c.rows):
                continue
            c.rows = [c.rows[i] for i in keep]
            if not keep:
                self.flight.remove(c)
            leaving.append((c, keep))
        return leaving

    def _admit(self, now: float) -> list[Cohort]:
        """Retries first, each alone; then the queue's due rows, one cohort per variant and pool run, while
        rows in flight stay within the batch limit. Cache rows are leased here (the worker is idle between
        steps); a cohort's rollout starts in the worker."""
        e = self.core
        joining: list[Cohort] = []
        while self.retries and self.rows_in_flight() < e.limit.current:
            row = self.retries[0]
            alone = Cohort(row.pending.variant, [row], retry=False)
            if e.requests.awaited(row.pending) and not self._join(alone, joining):
                break  # no room in the pool: it waits for a cohort to finish
            self.retries.pop(0)
        while (room := e.limit.current - self.rows_in_flight()) > 0:
            rows = e.requests.next_batch(now, room, e.max_wait_s).rows
            if not rows:
                break
            variant = rows[0].pending.variant
            fits = self.pools[variant].largest_free() // 2
            e.requests.put_back(rows[fits:])  # beyond the longest free run of the pool: they wait
            if not fits or not self._join(Cohort(variant, rows[:fits], retry=True), joining):
                break
        return joining

    def _join(self, cohort: Cohort, joining: list[Cohort]) -> bool:
        lease = self.pools[cohort.variant].lease(2 * len(cohort.rows))
        if lease is None:
            return False
        cohort.lease = lease
        self.core.mark_started([r.pending for r in cohort.rows])
        self.flight.append(cohort)
        joining.append(cohort)
        return True

    # ---- one step, in the worker thread -------------------------------------------------------------
    async def _step(self, plan: StepPlan) -> StepOutcome:
        e = self.core
        outcome = await e.watched("step", self.rows_in_flight(), self._measured, plan)
        for variant in {c.variant for c in self.flight} | {c.variant for c, _ in outcome.finished}:
            e.metrics.record_memory(variant, self.pools[variant].nbytes(), outcome.peak_bytes)
        e.metrics.record_step(outcome.seconds, sum(len(c.rows) for c in plan.joining), self._by_scale())
        return outcome

    def _measured(self, plan: StepPlan) -> StepOutcome:
        with peak_above_start(self.core.device) as peak:
            outcome = self._compute(plan)
        outcome.peak_bytes = peak.bytes
        return outcome

    def _compute(self, plan: StepPlan) -> StepOutcome:
        t0 = time.perf_counter()
        outcome = StepOutcome()
        for cohort, keep in plan.leaving:
            if not keep:
                _rollout(cohort).release()
                continue
            try:
                _rollout(cohort).keep_rows(keep)
            except Exception as error:  # e.g. out of memory compacting: its remaining rows start again alone
                outcome.failed.append((cohort, error))
        for cohort in plan.joining:
            try:
                self._start(cohort)
            except Exception as error:
                outcome.failed.append((cohort, error))
        timer = StageTimer(self.core.device)
        failed_early = {c for c, _ in outcome.failed}
        for variant in dict.fromkeys(c.variant for c in self.flight):
            cohorts = [c for c in self.flight if c.variant == variant and c not in failed_early]
            groups = [[c for c in cohorts if c.retry]] + [[c] for c in cohorts if not c.retry]  # retries alone
            for group in filter(None, groups):
                try:
                    self.core.pipelines[variant].step_all([_rollout(c) for c in group], timer)
                except Exception as error:
                    outcome.failed += [(c, error) for c in group]
        failed = {c for c, _ in outcome.failed}
        for c in self.flight:
            if c in failed or not _rollout(c).done:
                continue
            if self.overlap_decode:
                _rollout(c).release()  # the decode needs only the latent
                outcome.to_decode.append(c)
            else:
                try:
                    outcome.finished.append((c, self._images(c, timer)))
                except Exception as error:
                    outcome.failed.append((c, error))
        for c, _ in outcome.failed:
            if c.rollout is not None:
                c.rollout.release()
            elif c.lease is not None:
                c.lease.release()
        step_s = timer.stage_seconds()
        for c in self.flight:
            for k, v in step_s.items():
                c.stage_s[k] = c.stage_s.get(k, 0.0) + v
        outcome.seconds = time.perf_counter() - t0
        return outcome

    def _start(self, cohort: Cohort) -> None:
        labels, params, seeds = row_inputs(cohort.rows)
        cohort.rollout = self.core.pipelines[cohort.variant].start(labels, params, seeds=seeds, lease=cohort.lease)
        cohort.lease = None  # the rollout's now

    def _watched_images(self, cohort: Cohort, timer: StageTimer) -> BatchOutput:
        """`_images` in the decode thread, under the decode watchdog."""
        self.decode_watchdog.batch_started(f"{cohort.variant} decode", len(cohort.rows))
        done = False
        try:
            out = self._images(cohort, timer)
            done = True
            return out
        finally:
            self.decode_watchdog.batch_ended(done)

    def _images(self, cohort: Cohort, timer: StageTimer) -> BatchOutput:
        rollout = _rollout(cohort)
        images = self.core.pipelines[cohort.variant].finish(rollout, timer).float().cpu()
        images, finite = self.core.checked(cohort.rows, images)
        return BatchOutput(images, {}, rollout.cache_bytes, None, finite, rollout.tokens)

    # ---- after the step, on the event loop ----------------------------------------------------------
    async def _settle(self, outcome: StepOutcome) -> None:
        for cohort, out in outcome.finished:
            self.flight.remove(cohort)
            self._deliver(cohort, out)
        for cohort in outcome.to_decode:
            self.flight.remove(cohort)
            task = asyncio.get_running_loop().create_task(self._decode(cohort))
            self._decoding.add(task)
            task.add_done_callback(self._decoding.discard)
        for cohort, error in outcome.failed:
            self.flight.remove(cohort)
            await self._failed(cohort, error)

    async def _decode(self, cohort: Cohort) -> None:
        """A finished cohort's images, decoded in a thread of its own while the next step runs."""
        timer = StageTimer(self.core.pipelines[cohort.variant].device)
        try:
            async with self._decode_turn:
                out = await in_own_thread(self._watched_images, cohort, timer)
        except Exception as error:
            await self._failed(cohort, error)
            return
        for k, v in timer.stage_seconds().items():
            cohort.stage_s[k] = cohort.stage_s.get(k, 0.0) + v
        self._deliver(cohort, out)

    def _deliver(self, cohort: Cohort, out: BatchOutput) -> None:
        self.core.deliver(cohort.variant, cohort.rows, dataclasses.replace(out, stage_s=cohort.stage_s))

    async def _failed(self, cohort: Cohort, error: Exception) -> None:
        e = self.core
        if out_of_memory(error):
            await e.after_out_of_memory(cohort.variant, self.rows_in_flight() + len(cohort.rows), error)
        if cohort.retry:
            e.log_failure(cohort.variant, cohort.rows, error, "retrying each image alone")
            self.retries += cohort.rows
            e.requests.notify()  # a retry may be all there is to do
        else:
            e.fail(cohort.variant, cohort.rows, error)

    def _by_scale(self) -> dict[tuple[str, int], int]:
        """Images in flight per (variant, scale they run next), zeros included (no gaps in a dashboard)."""
        counts = {(v, si): 0 for v, pipe in self.core.pipelines.items() for si in range(len(pipe.steps))}
        for c in self.flight:
            if c.rollout is not None and not c.rollout.done:  # None: its start failed this step
                counts[(c.variant, c.rollout.si)] += len(c.rows)
        return counts


def _rollout(cohort: Cohort) -> Rollout:
    assert cohort.rollout is not None, "a cohort in flight has its rollout"
    return cohort.rollout
