"""Named variants: a variant is a list of passes, each a function pipeline -> pipeline.

Passes keep `state_dict` keys, so every variant runs from the same checkpoint. Only precision passes
exist so far; the compression passes (windowed attention, CFG sharing, quantization) register here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.model.pipeline import VARPipeline

Pass = Callable[[VARPipeline], VARPipeline]


def autocast_bf16(pipe: VARPipeline) -> VARPipeline:
    """Transformer matmuls and the VQVAE decoder in bfloat16 autocast; logits and sampling stay float32."""
    pipe.autocast_dtype = torch.bfloat16
    pipe.decode_dtype = torch.bfloat16
    return pipe


def device_default_precision(pipe: VARPipeline) -> VARPipeline:
    """The baseline's precision: float32 on CPU, bfloat16 autocast on GPU (as the official demo uses)."""
    return autocast_bf16(pipe) if pipe.device.type == "cuda" else pipe


VARIANTS: dict[str, list[Pass]] = {
    "baseline": [device_default_precision],
    "bf16": [autocast_bf16],
}


def apply_variant(name: str, pipe: VARPipeline) -> VARPipeline:
    """Apply the named variant's passes in order (in place; copy the pipeline first to keep the original)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    for p in VARIANTS[name]:
        pipe = p(pipe)
    return pipe
