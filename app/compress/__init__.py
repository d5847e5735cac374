"""Named variants as data: each a one-line purpose and its passes in order, every pass a function
pipeline -> pipeline (in place) registered with its typed options and summary in `PASSES`.

Passes keep every `state_dict` key of the checkpoint (a quantized layer adds its `weight_scale`), so every
variant runs from the same checkpoint. Windowed attention comes first, on the still unmodified transformer.
The window plan it takes and the sharing plan that scopes attention sharing across CFG are calibrated for the
checkpoint's weights: `apply_variant` takes them (`Plans`) from the caller, who gets them from `plans_for`
(plans.py), and no pass reads a file.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from app.compress.attention_passes import CfgSharing, WindowedAttention, cfg_attention_sharing, windowed_attention
from app.compress.compiled import autotuned_step, compiled_step, compiled_where_faster, compiles_where_faster
from app.compress.decoder import bf16_vqvae
from app.compress.guidance import GuidanceOff, guidance_off_last
from app.compress.hardware import bf16_native
from app.compress.int8_decoder import Int8Decoder, int8_vqvae
from app.compress.plans import NO_PLANS, Plans
from app.compress.quantize import MixedPrecision, quantize_linears
from app.compress.registry import (
    DeviceTest,
    PassFn,
    PassSpec,
    PlanKind,
    Step,
    VariantSpec,
    cuda_only,
    every_device,
    nowhere,
)
from app.model.pipeline import VARPipeline

log = logging.getLogger(__name__)


def autocast_bf16(pipe: VARPipeline) -> VARPipeline:
    """Transformer matmuls and the VQVAE decoder in bfloat16 autocast; logits and sampling stay float32.

    Where bfloat16 is not native (`BF16_NATIVE`: every CPU level below AVX-512 BF16) it still does what it says, as
    the precision yardstick it is, with a warning: there oneDNN emulates bfloat16 and the d16 shape ran 4x
    slower than float32 (docs/benchmarks.md, "d16 variants held to AVX2")."""
    if not bf16_native(pipe.device):
        log.warning("bfloat16 is not native on this %s: autocast emulates it, several times slower", pipe.device)
    pipe.autocast_dtype = torch.bfloat16
    pipe.decode_dtype = torch.bfloat16
    return pipe


def device_default_precision(pipe: VARPipeline) -> VARPipeline:
    """The baseline's precision: float32 on CPU, bfloat16 autocast on GPU (as the official demo uses)."""
    return autocast_bf16(pipe) if pipe.device.type == "cuda" else pipe


def _spec(
    function: PassFn,
    options_type: type[Any] | None,
    summary: str,
    plan: PlanKind | None = None,
    *,
    compiles_on: DeviceTest = nowhere,
) -> PassSpec:
    return PassSpec(function.__name__, function, options_type, summary, plan, compiles_on)


DEVICE_DEFAULT_PRECISION = _spec(
    device_default_precision,
    None,
    "The baseline's precision: float32 on CPU, bfloat16 autocast on GPU (as the official demo uses).",
)
AUTOCAST_BF16 = _spec(
    autocast_bf16,
    None,
    "Transformer matmuls and the VQVAE decoder in bfloat16 autocast; logits and sampling stay float32.",
)
WINDOWED_ATTENTION = _spec(
    windowed_attention,
    WindowedAttention,
    "Multi-diagonal windowed attention: each head attends only to the (query, key) pairs its windows keep.",
    PlanKind.WINDOWS,
    compiles_on=cuda_only,  # its GPU kernel is FlexAttention, compiled per shape (attention.py)
)
CFG_ATTENTION_SHARING = _spec(
    cfg_attention_sharing,
    CfgSharing,
    "Attention sharing across CFG: the unconditional rows reuse the conditional rows' attention where the "
    "checkpoint's sharing plan allows it.",
    PlanKind.SHARING,
)
QUANTIZE_LINEARS = _spec(
    quantize_linears,
    MixedPrecision,
    "LiteVAR mixed precision: W8A8 int8, bfloat16-stored and int4 weights by layer type.",
)
BF16_VQVAE = _spec(
    bf16_vqvae,
    None,
    "VQVAE convolution weights stored in bfloat16; where bfloat16 is native the decoder runs in it end to end "
    "(oneDNN convolutions pre-packed on CPU), elsewhere in float32.",
)
INT8_VQVAE = _spec(
    int8_vqvae,
    Int8Decoder,
    "bf16_vqvae, then where int8 is native (VNNI, AMX) the decoder's large residual and upsampling convolutions "
    "as static int8 convolutions on oneDNN, calibrated on the pipeline's own latents.",
)
GUIDANCE_OFF_LAST = _spec(
    guidance_off_last,
    GuidanceOff,
    "The last `scales` scales run the conditional rows alone and sample from their logits unguided.",
)
COMPILED_STEP = _spec(
    compiled_step,
    None,
    "The per-scale step and the VQVAE decoder under torch.compile (Inductor), weights unchanged.",
    compiles_on=every_device,
)
COMPILED_WHERE_FASTER = _spec(
    compiled_where_faster,
    None,
    "compiled_step where the hardware table says a step with int8 layers runs faster compiled (VNNI, AMX, "
    "CUDA) and the machine can build compiled code; eager elsewhere (AVX2, where the int8 kernel is fbgemm's).",
    compiles_on=compiles_where_faster,
)
AUTOTUNED_STEP = _spec(
    autotuned_step,
    None,
    "The step compiled with frozen weights and autotuned GEMMs; the decoder as in compiled_step.",
    compiles_on=every_device,
)
PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        DEVICE_DEFAULT_PRECISION,
        AUTOCAST_BF16,
        WINDOWED_ATTENTION,
        CFG_ATTENTION_SHARING,
        QUANTIZE_LINEARS,
        BF16_VQVAE,
        INT8_VQVAE,
        GUIDANCE_OFF_LAST,
        COMPILED_STEP,
        COMPILED_WHERE_FASTER,
        AUTOTUNED_STEP,
    )
}

DEVICE_PRECISION = Step(DEVICE_DEFAULT_PRECISION)
LAST_SCALE_UNGUIDED = Step(GUIDANCE_OFF_LAST, GuidanceOff(scales=1))
# the paper's recipe: windows + sharing + W8A8 with fc2 in 16-bit weights; our sensitivity study and memory
# target add: word_embed in float32, int4 AdaLN weights, bf16-stored VQVAE, its decoder in int8 where int8 is
# native (within the baseline's seed-to-seed spread in both feature spaces: docs/evaluation.md); eager here,
# compiled where that is faster in `litevar` itself
LITEVAR_EAGER = (
    DEVICE_PRECISION,
    Step(WINDOWED_ATTENTION),
    Step(CFG_ATTENTION_SHARING),
    Step(QUANTIZE_LINEARS),
    Step(INT8_VQVAE),
)

VARIANTS: dict[str, VariantSpec] = {
    "baseline": VariantSpec("the checkpoint as released, at the device's default precision", (DEVICE_PRECISION,)),
    "bf16": VariantSpec("bfloat16 autocast on every device", (Step(AUTOCAST_BF16),)),
    "litevar": VariantSpec(
        "LiteVAR: windowed and shared attention, mixed-precision weights; its step compiled where that is faster",
        (*LITEVAR_EAGER, Step(COMPILED_WHERE_FASTER)),
    ),
    # for a start without compiling (seconds instead of minutes), and to measure what compiling gains
    "litevar-eager": VariantSpec("LiteVAR's passes, never compiled", LITEVAR_EAGER),
    # each pass alone
    "windows": VariantSpec("windowed attention alone", (DEVICE_PRECISION, Step(WINDOWED_ATTENTION))),
    "cfg-share": VariantSpec("attention sharing across CFG alone", (DEVICE_PRECISION, Step(CFG_ATTENTION_SHARING))),
    "w8a8": VariantSpec("LiteVAR's mixed-precision weights alone", (DEVICE_PRECISION, Step(QUANTIZE_LINEARS))),
    "vqvae-bf16": VariantSpec("the bfloat16-stored VQVAE alone", (DEVICE_PRECISION, Step(BF16_VQVAE))),
    # every convolution the pass can convert, even where int8 does not pay (the demo model): its quality
    "vqvae-int8": VariantSpec(
        "the int8 VQVAE decoder alone, every residual and upsampling convolution converted",
        (DEVICE_PRECISION, Step(INT8_VQVAE, Int8Decoder(min_macs=0))),
    ),
    "guidance-off": VariantSpec("guidance off for the last scale alone", (DEVICE_PRECISION, LAST_SCALE_UNGUIDED)),
    "litevar-float": VariantSpec(
        "LiteVAR's attention passes, weights unquantized: the attention share against quality",
        (DEVICE_PRECISION, Step(WINDOWED_ATTENTION), Step(CFG_ATTENTION_SHARING)),
    ),
    "compiled": VariantSpec("the step and the decoder compiled", (DEVICE_PRECISION, Step(COMPILED_STEP))),
    "autotuned": VariantSpec(
        "compiled with frozen weights and autotuned GEMMs: the fastest float32 pipeline on CPU, slow to warm up",
        (DEVICE_PRECISION, Step(AUTOTUNED_STEP)),
    ),
    # int8 and bf16 weights only where the hardware table's kernels for them trace and beat float32 (VNNI, AMX,
    # CUDA; bf16 where native); on AVX2 every layer stays float32, as fbgemm's int8 layers cannot be compiled.
    # AdaLN stays float32: int4 unpacks its weights at every generation, slower than the float32 GEMV (figures:
    # docs/benchmarks.md, "AdaLN in int4").
    "fastest": VariantSpec(
        "the passes that pay most: LiteVAR's attention passes, int8 and bf16 weights where this hardware "
        "computes them fast under compile, the int8 decoder, guidance off for the last scale, the rest compiled",
        (
            DEVICE_PRECISION,
            Step(WINDOWED_ATTENTION),
            Step(CFG_ATTENTION_SHARING),
            Step(QUANTIZE_LINEARS, MixedPrecision(int4=(), compilable=True)),
            Step(INT8_VQVAE),
            LAST_SCALE_UNGUIDED,
            Step(COMPILED_STEP),
        ),
    ),
    # eager: each int8 layer on the hardware table's kernel (fbgemm on AVX2), LiteVAR's weights in full
    "fastest-int8": VariantSpec(
        "the fast variant with int8 weights, eager: LiteVAR plus guidance off for the last scale",
        (*LITEVAR_EAGER, LAST_SCALE_UNGUIDED),
    ),
}


def variant_spec(name: str) -> VariantSpec:
    """The named variant; a ValueError listing the known ones otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def apply_variant(name: str, pipe: VARPipeline, *, plans: Plans = NO_PLANS) -> VARPipeline:
    """Apply the named variant's passes in order (in place; copy the pipeline first to keep the original).

    `plans`: the checkpoint's plans its passes take (`plans_for` finds, loads or calibrates them); a pass
    whose plan is not among them raises PlanNotGiven naming the plan."""
    spec, needed_by = variant_spec(name), f"variant {name!r}"
    for kind in spec.plans():  # all checked before any pass runs: a refusal leaves `pipe` as it was
        plans.require(kind, needed_by)
    for step in spec.steps:
        takes = step.spec.plan
        pipe = step.run(pipe) if takes is None else step.run(pipe, plan=plans.require(takes, needed_by))
    return pipe


def describe() -> dict[str, dict[str, Any]]:
    """Every variant as plain data: its purpose and its passes (name, options, summary), for docs and tools."""
    return {name: {"purpose": v.purpose, "passes": v.describe()} for name, v in VARIANTS.items()}
