"""What runs in the engine's worker thread: one batch through a pipeline with its images back on the CPU,
which images are finite, and freeing memory after running out of it. No asyncio, no web."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from app.model.kv_cache import KVLease, KVPool, ScaleStep
from app.model.memory import peak_above_start
from app.model.pipeline import Generation
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams
from app.model.timing import Stage, StageTimer


class Pipeline(Protocol):
    """What the engine needs of a pipeline (`VARPipeline`): `generate` for the `whole` policy; `new_pool`,
    `start`, `step_all` and `finish` for the `scale` policy; `start` and `forced_step` for shadow fidelity."""

    @property
    def device(self) -> torch.device: ...

    @property
    def steps(self) -> list[ScaleStep]: ...

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation: ...

    def new_pool(self, images: int) -> KVPool: ...

    def start(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], lease: KVLease | None
    ) -> Rollout: ...

    def step_all(self, rollouts: Sequence[Rollout], timer: StageTimer) -> None: ...

    def finish(self, rollout: Rollout, timer: StageTimer) -> torch.Tensor: ...

    def forced_step(self, rollout: Rollout, tokens_Bl: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BatchOutput:
    images: torch.Tensor  # on the CPU
    stage_s: dict[Stage, float]
    kv_cache_bytes: int  # allocated by the pipeline for this batch
    peak_bytes: int | None  # `peak_above_start` of the batch; None where not measurable
    finite: list[bool] = dataclasses.field(default_factory=list)  # per image: every pixel finite
    tokens: list[torch.Tensor] = dataclasses.field(default_factory=list)  # per scale (B, l), as the pipeline made them


def compute(pipe: Pipeline, labels: list[int], params: list[SamplingParams], seeds: list[int]) -> BatchOutput:
    """One batch through the pipeline, images back on the CPU."""
    timer = StageTimer(pipe.device)
    with peak_above_start(pipe.device) as peak:
        gen = pipe.generate(labels, params, seeds=seeds, timer=timer)
    return BatchOutput(
        gen.images.float().cpu(), timer.stage_seconds(), gen.kv_cache_bytes, peak.bytes, tokens=gen.tokens
    )


def finite_rows(images_BCHW: torch.Tensor) -> list[bool]:
    """Per image: True when no pixel is NaN or infinite (such pixels would become undefined bytes)."""
    return torch.isfinite(images_BCHW.flatten(1)).all(dim=1).tolist()


def out_of_memory(error: Exception) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError naming the allocation it failed
    return isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def free_memory(device: torch.device) -> None:
    """After running out of memory: collect garbage (tensors of the failed batch), return cached CUDA blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
