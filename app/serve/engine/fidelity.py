"""Shadow fidelity: how closely a compressed variant follows its reference on the traffic it serves.

A share (`rate`) of the requests answered by a variant other than the reference is sampled when its first
image is delivered: that image's class, sampling settings and tokens join a bounded backlog. The scorer, a
task on the event loop, takes samples from it only while the engine is idle, and runs each teacher-forced
(`app.quality.fidelity`): the variant and the reference score the same tokens, and the KL of the variant's
next-token distributions from the reference's and their top-1 agreement go to /metrics.

Idle means that no request has been accepted for QUIET_S. The scorer runs in the engine's worker thread one
half-step at a time (one scale of one image of one model, `ForcedComparison.advance`) and looks again between
half-steps, so a request that arrives meanwhile waits for that half-step only; the scorer then waits until
the engine is idle again, holding the comparison where it stopped. Samples that find the backlog full are
dropped and counted, so that under load the scorer falls behind by a bounded amount and never queues work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from app.model.sampling import SamplingParams
from app.quality.fidelity import Fidelity, ForcedComparison
from app.serve.engine.core import EngineCore
from app.serve.engine.requests import BatchRow
from app.serve.engine.worker import BatchOutput
from app.serve.metrics import FidelityDrop

log = logging.getLogger("app.serve.engine")
T = TypeVar("T")
BACKLOG = 4  # samples waiting to be scored; a sample that finds it full is dropped (and counted)
# Idle means no request accepted for this long: a client that sends its next request as soon as it has its
# answer leaves gaps of a few milliseconds (encoding, loopback), which the scorer leaves to it
QUIET_S = 0.02
IDLE_POLL_S = 0.01  # how often the scorer looks whether the engine is idle while a sample waits


@dataclass(frozen=True)
class Sample:
    variant: str
    label: int
    params: SamplingParams
    tokens_L: torch.Tensor  # one image's tokens over every scale, on the pipeline's device


class ShadowFidelity:
    """The sampler (`offer`, on delivery) and the scorer (`run`, a task of the engine) of one engine."""

    def __init__(
        self,
        core: EngineCore,
        *,
        reference: str,
        rate: float,
        backlog: int = BACKLOG,
        chance: Callable[[], float] = random.random,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the fidelity rate is a share of requests in [0, 1], got {rate}")
        self.core, self.reference, self.rate = core, reference, rate
        self.metrics = core.metrics
        self.backlog: deque[Sample] = deque()
        self.capacity = backlog
        self.chance = chance
        self._arrived = asyncio.Event()

    def offer(self, variant: str, rows: list[BatchRow], out: BatchOutput) -> None:
        """After a batch is delivered: sample the requests whose first image it holds, finite, each with
        probability `rate`, unless they are the reference's own."""
        if self.rate == 0.0 or variant == self.reference or not out.tokens:
            return
        for i, (r, finite) in enumerate(zip(rows, out.finite, strict=True)):
            if r.row == 0 and finite and self.chance() < self.rate:
                q = r.pending.request
                tokens_L = torch.cat([t[i] for t in out.tokens])  # only a sampled image's are gathered
                self._add(Sample(variant, q.class_label, q.params, tokens_L))

    def _add(self, sample: Sample) -> None:
        if self.reference not in self.core.pipelines:
            self.metrics.fidelity_dropped.labels(sample.variant, FidelityDrop.NO_REFERENCE).inc()
        elif len(self.backlog) >= self.capacity:
            self.metrics.fidelity_dropped.labels(sample.variant, FidelityDrop.BACKLOG_FULL).inc()
        else:
            self.backlog.append(sample)
            self._arrived.set()

    def idle(self) -> bool:
        """No request accepted for QUIET_S: nothing a client waits for would queue behind the scorer, and no
        client is in the middle of a run of requests."""
        return self.core.requests.idle_for(time.monotonic()) >= QUIET_S

    async def run(self) -> None:
        """Forever: score the samples of the backlog, one half-step at a time while the engine is idle."""
        while True:
            while not self.backlog:
                self._arrived.clear()
                await self._arrived.wait()
            sample = self.backlog.popleft()
            try:
                fidelity = await self._score(sample)
            except Exception:
                log.exception("scoring a %s sample against %s failed", sample.variant, self.reference)
                self.metrics.fidelity_dropped.labels(sample.variant, FidelityDrop.FAILED).inc()
                continue
            self.metrics.record_fidelity(sample.variant, self.reference, fidelity)

    async def _score(self, sample: Sample) -> Fidelity:
        pipes = self.core.pipelines
        candidate, reference = pipes[sample.variant], pipes[self.reference]
        comparison = await self._when_idle(
            ForcedComparison, candidate, reference, sample.label, sample.params, sample.tokens_L
        )
        while not comparison.done:
            await self._when_idle(comparison.advance)
        return await self._when_idle(comparison.result)

    async def _when_idle(self, fn: Callable[..., T], *args: object) -> T:
        while not self.idle():
            await asyncio.sleep(IDLE_POLL_S)
        return await self.core.in_worker(fn, *args)
