"""Named variants: a variant is a list of passes, each a function pipeline -> pipeline (in place).

Passes keep every `state_dict` key of the checkpoint (a quantized layer adds its `weight_scale`), so every
variant runs from the same checkpoint. Windowed attention comes first: when no window plan is saved beside
the checkpoint it calibrates one on the still unmodified model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from app.compress.attention_passes import cfg_attention_sharing, windowed_attention
from app.compress.compiled import autotuned_step, compiled_step
from app.compress.guidance import guidance_off_last
from app.compress.quantize import bf16_vqvae, quantize_linears
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


LITEVAR: list[Pass] = [
    device_default_precision,
    windowed_attention,
    cfg_attention_sharing,
    quantize_linears,
    bf16_vqvae,
]

VARIANTS: dict[str, list[Pass]] = {
    "baseline": [device_default_precision],
    "bf16": [autocast_bf16],
    # the paper's recipe: windows + sharing + W8A8 with fc2 in 16-bit weights; our sensitivity study and
    # memory target add: word_embed in float32, int4 AdaLN weights, bf16-stored VQVAE
    "litevar": LITEVAR,
    # each pass alone
    "windows": [device_default_precision, windowed_attention],
    "cfg-share": [device_default_precision, cfg_attention_sharing],
    "w8a8": [device_default_precision, quantize_linears],
    "vqvae-bf16": [device_default_precision, bf16_vqvae],
    "guidance-off": [device_default_precision, functools.partial(guidance_off_last, scales=1)],
    # the paper's attention passes together, weights unquantized: the attention share against quality
    "litevar-float": [device_default_precision, windowed_attention, cfg_attention_sharing],
    "compiled": [device_default_precision, compiled_step],
    # compiled with frozen weights and autotuned GEMMs: the fastest float32 pipeline on CPU, slow to warm up
    "autotuned": [device_default_precision, autotuned_step],
    # the passes that pay most on the demo model: LiteVAR's attention passes, guidance off for the last
    # scale, everything compiled; float weights, since fbgemm's int8 layers cannot be compiled (README)
    "fastest": [
        device_default_precision,
        windowed_attention,
        cfg_attention_sharing,
        functools.partial(guidance_off_last, scales=1),
        compiled_step,
    ],
    # the fast variant at a third of the weight bytes: LiteVAR plus guidance off for the last scale
    "fastest-int8": [*LITEVAR, functools.partial(guidance_off_last, scales=1)],
}


def apply_variant(name: str, pipe: VARPipeline) -> VARPipeline:
    """Apply the named variant's passes in order (in place; copy the pipeline first to keep the original)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    for p in VARIANTS[name]:
        pipe = p(pipe)
    return pipe
