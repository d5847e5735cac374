"""`compiled_step`: the per-scale transformer step and the VQVAE decoder under torch.compile (Inductor).

What it buys: Inductor fuses the element-wise work between the GEMMs (LayerNorm and AdaLN modulation,
GELU, residual adds, the L2-normalised q/k; GroupNorm and SiLU in the decoder) into a few generated
kernels and removes most per-operator dispatch, which dominates a small model at batch 1. GEMMs,
convolutions and attention stay the same library kernels, so tokens match the eager pipeline (tested).

Cost: each scale is its own graph (its sequence length and cache slice differ). The first batch size
compiles one graph per scale; the second one more per scale with the batch dimension symbolic, which then
serves later batch sizes. On 2 CPU cores that is seconds per graph cold, and much less from Inductor's
on-disk cache (`TORCHINDUCTOR_CACHE_DIR`). The server's warm-up pays it before the service reports ready.

Guards stay on: Dynamo keeps one cache per code object, shared by every pipeline in the process, and
without the guards on modules a second pipeline (another variant) reuses the first one's graphs.

fbgemm's packed int8 weights are opaque to the compiler: every int8 linear splits the graph (measured
0.65x of eager on the demo model), so the pass refuses a pipeline that holds them.
"""

from __future__ import annotations

import torch

from app.compress.quantize import Int8Linear
from app.model.pipeline import VARPipeline

GRAPHS_PER_SCALE = 4  # first batch size, symbolic batch, and the row-padding branch of small GEMMs


def compiled_step(pipe: VARPipeline) -> VARPipeline:
    packed = [n for n, m in pipe.var.named_modules() if isinstance(m, Int8Linear) and m.packed_bytes]
    if packed:
        raise ValueError(f"compiled_step cannot trace fbgemm's packed int8 layers ({len(packed)}, e.g. {packed[0]})")
    # the limit counts graphs per code object, i.e. over every compiled pipeline of the process
    torch._dynamo.config.recompile_limit += GRAPHS_PER_SCALE * len(pipe.config.var.patch_nums)
    pipe.step_fn = torch.compile(pipe.var.step)
    pipe.vqvae.decoder.compile()
    return pipe
