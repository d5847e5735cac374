"""Warm-up: a variant's first calls, made before it serves, so that no request pays for them.

What a first call costs differs by variant. An eager one pays once for what any batch size then reuses (the
allocator's pools, the thread pool, the weights' pages, oneDNN's primitives of the one-image decoder): one
call at batch 1 is enough, and every further size would cost a whole generation for nothing (on a d16 model
on 2 cores, sizes 1 to 8 took 413 s). A compiled one compiles graphs on the first call of each batch size
that needs graphs of its own: those sizes are run, the others then reuse their graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.compress.compiled import graph_batch_sizes
from app.compress.registry import VariantSpec
from app.model.kv_cache import ScaleStep
from app.model.progress import Progress
from app.model.sampling import SamplingParams
from app.serve.engine.worker import BatchOutput, Pipeline, compute


def warmup_batch_sizes(
    spec: VariantSpec, device: torch.device, max_batch_size: int, steps: Sequence[ScaleStep]
) -> list[int]:
    """Eager: [1]. Compiled on the CPU: the sizes at which the compiled step of a pipeline of these `steps`
    gets graphs of its own (`graph_batch_sizes`). Compiled on another device: every size up to
    `max_batch_size`, since FlexAttention (windowed attention on the GPU) compiles a graph per shape, and a
    GPU runs a warm-up call in moments."""
    if not spec.compiled(device):
        return [1]
    if device.type == "cpu":
        return graph_batch_sizes(max_batch_size, steps)
    return list(range(1, max_batch_size + 1))


def warm_up(
    pipe: Pipeline, batch_sizes: Sequence[int], params: SamplingParams, progress: Progress
) -> list[BatchOutput]:
    """One batch per size, in order, each step of `progress` weighted by its images (what a call costs, about);
    returns each batch's output (for its memory). Runs in a thread of its own: the variant is not served yet."""
    progress.begin(batch_sizes)
    outputs = []
    for size in batch_sizes:
        outputs.append(compute(pipe, [0] * size, [params] * size, list(range(size))))
        progress.advance()
    progress.finish()
    return outputs
