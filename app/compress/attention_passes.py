"""Passes of the attention: multi-diagonal windowed attention and attention sharing across CFG.

Each takes a plan calibrated for the checkpoint's weights as its `plan` argument: the window plan, and the
sharing plan (at which layers and scales the unconditional rows may reuse the conditional rows' attention).
The passes read no file: plans.py finds, loads or calibrates the plans of a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.compress.attention import PlannedAttention, dense_flops, route_for
from app.compress.sharing import SharingPlan
from app.compress.windows import WindowPlan
from app.model.blocks import SelfAttention
from app.model.pipeline import VARPipeline


@dataclass(frozen=True)
class WindowedAttention:
    """Options of `windowed_attention` (its plan comes from the checkpoint, not from the variant)."""

    min_skipped: float | None = None  # None: 0.5 on CPU, 0.25 on GPU
    min_queries: int = 128


@dataclass(frozen=True)
class CfgSharing:
    """Options of `cfg_attention_sharing`."""

    scales: tuple[int, ...] | None = None  # None with layers None: the sharing plan's scope; else every scale
    layers: tuple[int, ...] | None = None  # None with scales None: the sharing plan's scope; else every layer
    outputs: bool = False  # share attention outputs rather than probabilities


def _planned(attn: SelfAttention) -> PlannedAttention:
    """The layer's PlannedAttention, installed in place of the dense kernel on first use."""
    if not isinstance(attn.kernel, PlannedAttention):
        attn.kernel = PlannedAttention()
    return attn.kernel


def windowed_attention(
    pipe: VARPipeline, *, plan: WindowPlan, min_skipped: float | None = None, min_queries: int = 128
) -> VARPipeline:
    """Multi-diagonal windowed attention: each head attends only to the (query, key) pairs its windows keep.

    A query scale of at least `min_queries` tokens runs the block-sparse kernel when at least `min_skipped`
    of its key blocks hold no kept pair (default 0.5 on CPU, 0.25 on GPU, measured break-evens); other
    windowed scales compute dense scores with -inf outside the windows (same result, no saving). `plan` must
    fit the model's shape (ValueError otherwise)."""
    cfg = pipe.config.var
    plan.check_fits(cfg.depth, cfg.num_heads, cfg.patch_nums)
    if min_skipped is None:
        min_skipped = 0.25 if pipe.device.type == "cuda" else 0.5
    windowed_steps = [step for step in pipe.steps if plan.windowed(step.si)]
    for layer, blk in enumerate(pipe.var.block_list):
        kernel = _planned(blk.attn)
        for step in windowed_steps:
            kept = plan.kept(layer, step).to(pipe.device)
            skip = min_skipped if step.num_tokens >= min_queries else 2.0  # 2.0: never sparse
            kernel.routes[step.si] = route_for(kept, skip)
    return pipe


def cfg_attention_sharing(
    pipe: VARPipeline,
    *,
    plan: SharingPlan | None = None,
    scales: tuple[int, ...] | None = None,
    layers: tuple[int, ...] | None = None,
    outputs: bool = False,
) -> VARPipeline:
    """Attention sharing across CFG: the unconditional rows reuse the conditional rows' attention
    probabilities (or, with `outputs`, attention outputs) at the (layer, scale) pairs the sharing plan marks,
    and nowhere else. Explicit `scales` or `layers` set the scope instead (the one not given: all) and no
    plan is needed. A ValueError when there is neither a plan nor an explicit scope."""
    if scales is None and layers is None:
        if plan is None:
            raise ValueError("cfg_attention_sharing takes a sharing plan, or explicit scales or layers")
        scope = _planned_scope(pipe, plan)
    else:
        scope = _explicit_scope(pipe, scales, layers)
    for blk, shared in zip(pipe.var.block_list, scope, strict=True):
        kernel = _planned(blk.attn)
        kernel.share_scales, kernel.share_outputs = shared, outputs
    return pipe


def _planned_scope(pipe: VARPipeline, plan: SharingPlan) -> list[frozenset[int]]:
    """Per layer, the scales the plan shares."""
    plan.check_fits(pipe.config.var.depth, pipe.config.var.patch_nums)
    return [plan.scales(layer) for layer in range(plan.depth)]


def _explicit_scope(
    pipe: VARPipeline, scales: tuple[int, ...] | None, layers: tuple[int, ...] | None
) -> list[frozenset[int]]:
    """Per layer, the given scales (None: all) in the given layers (None: all), none elsewhere."""
    shared = frozenset(range(len(pipe.config.var.patch_nums)) if scales is None else scales)
    return [shared if layers is None or layer in layers else frozenset() for layer in range(pipe.config.var.depth)]


def attention_flops(pipe: VARPipeline, batch_size: int) -> int:
    """FLOPs of QK^T and PV one generation of `batch_size` images computes, from the kernels installed."""
    cfg = pipe.config.var
    heads, head_dim = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    total = 0
    for step in pipe.steps:
        rows = 2 * batch_size if step.guided else batch_size
        for blk in pipe.var.block_list:
            k = blk.attn.kernel
            if isinstance(k, PlannedAttention):
                total += k.flops(step, rows, heads, head_dim)
            else:
                total += dense_flops(step, rows, heads, head_dim)
    return total
