"""Passes of the attention: multi-diagonal windowed attention and attention sharing across CFG."""

from __future__ import annotations

import logging

from app.compress.attention import PlannedAttention, dense_flops, route_for
from app.compress.calibrate import calibrate
from app.compress.windows import PLAN_FILE, WindowPlan, WindowSettings
from app.model.blocks import SelfAttention
from app.model.pipeline import VARPipeline

log = logging.getLogger(__name__)


def _planned(attn: SelfAttention) -> PlannedAttention:
    """The layer's PlannedAttention, installed in place of the dense kernel on first use."""
    if not isinstance(attn.kernel, PlannedAttention):
        attn.kernel = PlannedAttention()
    return attn.kernel


def window_plan(pipe: VARPipeline, settings: WindowSettings | None = None) -> WindowPlan:
    """The plan saved beside the checkpoint (`window_plan.safetensors`), else one calibrated now."""
    cfg = pipe.config.var
    path = pipe.source / PLAN_FILE if pipe.source is not None else None
    if path is not None and path.is_file() and settings is None:
        plan = WindowPlan.load(path)
        plan.check_fits(cfg.depth, cfg.num_heads, cfg.patch_nums)
        return plan
    if settings is None:
        log.warning("no window plan at %s: calibrating one (python -m app.compress calibrate saves it)", path)
    return calibrate(pipe, settings)


def windowed_attention(
    pipe: VARPipeline, *, plan: WindowPlan | None = None, min_skipped: float | None = None, min_queries: int = 128
) -> VARPipeline:
    """Multi-diagonal windowed attention: each head attends only to the (query, key) pairs its windows keep.

    A query scale of at least `min_queries` tokens runs the block-sparse kernel when at least `min_skipped`
    of its key blocks hold no kept pair (default 0.5 on CPU, 0.25 on GPU, measured break-evens); other
    windowed scales compute dense scores with -inf outside the windows (same result, no saving)."""
    plan = plan or window_plan(pipe)
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
    scales: tuple[int, ...] | None = None,
    layers: tuple[int, ...] | None = None,
    outputs: bool = False,
) -> VARPipeline:
    """Attention sharing across CFG: the unconditional rows reuse the conditional rows' attention
    probabilities (or, with `outputs`, attention outputs) at the given scales and layers (None: all)."""
    all_scales = range(len(pipe.config.var.patch_nums))
    share = frozenset(all_scales if scales is None else scales)
    for layer, blk in enumerate(pipe.var.block_list):
        if layers is None or layer in layers:
            kernel = _planned(blk.attn)
            kernel.share_scales, kernel.share_outputs = share, outputs
    return pipe


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
