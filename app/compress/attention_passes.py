"""Passes of the attention: multi-diagonal windowed attention and attention sharing across CFG.

Each needs a plan calibrated for the checkpoint's weights: the window plan, and the sharing plan (at which
layers and scales the unconditional rows may reuse the conditional rows' attention). Both are saved beside
the checkpoint (`python -m app.compress calibrate`); without one the pass refuses, and only a caller that
asks for it (`window_plan(..., calibrate_missing=True)`, likewise `sharing_plan`) calibrates one, which
takes a while and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from app.compress.attention import PlannedAttention, dense_flops, route_for
from app.compress.calibrate import calibrate, calibrate_plans, calibrate_sharing
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan, SharingSettings
from app.compress.windows import PLAN_FILE, WindowPlan, WindowSettings
from app.model.blocks import SelfAttention
from app.model.pipeline import VARPipeline

log = logging.getLogger(__name__)
Plan = TypeVar("Plan", WindowPlan, SharingPlan)
CALIBRATE = "python -m app.compress calibrate"  # the command that saves a plan beside a checkpoint


class PlanOrigin(StrEnum):
    """Where a variant's window or sharing plan came from (reported by the service)."""

    FILE = "file"
    CALIBRATED = "calibrated at load"


def _missing(needs: str, folder: Path | None, flags: str = "") -> str:
    where = f"beside the checkpoint {folder}" if folder is not None else "(the pipeline has no checkpoint folder)"
    command = f"{CALIBRATE} --model {folder if folder is not None else '<folder>'}{flags}"
    return f"{needs}: none {where}; calibrate one with `{command}`"


class MissingWindowPlan(ValueError):
    """No window plan is saved beside the checkpoint, and calibrating one now was not asked for."""

    def __init__(self, folder: Path | None):
        super().__init__(_missing("windowed attention needs a window plan", folder))


class MissingSharingPlan(ValueError):
    """No sharing plan is saved beside the checkpoint, and calibrating one now was not asked for."""

    def __init__(self, folder: Path | None):
        # --sharing-only: a window plan already beside the checkpoint stays as it is
        super().__init__(_missing("attention sharing across CFG needs a sharing plan", folder, " --sharing-only"))


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


def _saved_or_calibrated(
    pipe: VARPipeline,
    saved: Callable[[VARPipeline], Plan],
    calibrate_now: Callable[[VARPipeline], Plan],
    missing: type[ValueError],
    kind: str,
    calibrate_missing: bool,
) -> tuple[Plan, PlanOrigin]:
    """The plan `saved` finds beside the checkpoint, else, when `calibrate_missing`, one calibrated now on `pipe`
    (logged: it takes a while); `missing` raised otherwise."""
    try:
        return saved(pipe), PlanOrigin.FILE
    except missing:
        if not calibrate_missing:
            raise
    log.warning("no %s plan beside %s: calibrating one at load (`%s` saves it)", kind, pipe.source, CALIBRATE)
    return calibrate_now(pipe), PlanOrigin.CALIBRATED


def saved_window_plan(pipe: VARPipeline) -> WindowPlan:
    """The plan saved beside the checkpoint (`window_plan.safetensors`); MissingWindowPlan when there is none."""
    path = pipe.source / PLAN_FILE if pipe.source is not None else None
    if path is None or not path.is_file():
        raise MissingWindowPlan(pipe.source)
    cfg = pipe.config.var
    plan = WindowPlan.load(path)
    plan.check_fits(cfg.depth, cfg.num_heads, cfg.patch_nums)
    return plan


def window_plan(pipe: VARPipeline, *, calibrate_missing: bool = False) -> tuple[WindowPlan, PlanOrigin]:
    """The plan saved beside the checkpoint, else, when `calibrate_missing`, one calibrated now on `pipe`
    (which must be unmodified: calibration measures its dense attention); MissingWindowPlan otherwise."""
    return _saved_or_calibrated(pipe, saved_window_plan, calibrate, MissingWindowPlan, "window", calibrate_missing)


def windowed_attention(
    pipe: VARPipeline, *, plan: WindowPlan | None = None, min_skipped: float | None = None, min_queries: int = 128
) -> VARPipeline:
    """Multi-diagonal windowed attention: each head attends only to the (query, key) pairs its windows keep.

    A query scale of at least `min_queries` tokens runs the block-sparse kernel when at least `min_skipped`
    of its key blocks hold no kept pair (default 0.5 on CPU, 0.25 on GPU, measured break-evens); other
    windowed scales compute dense scores with -inf outside the windows (same result, no saving). Without a
    `plan`, the one saved beside the checkpoint; MissingWindowPlan when there is none."""
    plan = plan or saved_window_plan(pipe)
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


def saved_sharing_plan(pipe: VARPipeline) -> SharingPlan:
    """The plan saved beside the checkpoint (`sharing_plan.safetensors`); MissingSharingPlan when there is none."""
    path = pipe.source / SHARING_PLAN_FILE if pipe.source is not None else None
    if path is None or not path.is_file():
        raise MissingSharingPlan(pipe.source)
    plan = SharingPlan.load(path)
    plan.check_fits(pipe.config.var.depth, pipe.config.var.patch_nums)
    return plan


def sharing_plan(pipe: VARPipeline, *, calibrate_missing: bool = False) -> tuple[SharingPlan, PlanOrigin]:
    """The plan saved beside the checkpoint, else, when `calibrate_missing`, one calibrated now on `pipe`
    (which must be unmodified); MissingSharingPlan otherwise."""
    return _saved_or_calibrated(
        pipe, saved_sharing_plan, calibrate_sharing, MissingSharingPlan, "sharing", calibrate_missing
    )


def both_plans(
    pipe: VARPipeline, *, calibrate_missing: bool = False
) -> tuple[tuple[WindowPlan, PlanOrigin], tuple[SharingPlan, PlanOrigin]]:
    """`window_plan` and `sharing_plan` together; when neither is saved and `calibrate_missing`, both come from
    one run of the calibration batches (`calibrate_plans`), half the time of calibrating each alone."""
    if calibrate_missing and not _saved(pipe, PLAN_FILE) and not _saved(pipe, SHARING_PLAN_FILE):
        log.warning(
            "no window or sharing plan beside %s: calibrating both at load (`%s` saves them)", pipe.source, CALIBRATE
        )
        windows, sharing = calibrate_plans(pipe, WindowSettings(), SharingSettings())
        return (windows, PlanOrigin.CALIBRATED), (sharing, PlanOrigin.CALIBRATED)
    return window_plan(pipe, calibrate_missing=calibrate_missing), sharing_plan(
        pipe, calibrate_missing=calibrate_missing
    )


def _saved(pipe: VARPipeline, name: str) -> bool:
    return pipe.source is not None and (pipe.source / name).is_file()


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
    and nowhere else. Without a `plan`, the one saved beside the checkpoint; MissingSharingPlan when there is
    none. Explicit `scales` or `layers` set the scope instead (the one not given: all) and no plan is read."""
    if scales is None and layers is None:
        scope = _planned_scope(pipe, plan or saved_sharing_plan(pipe))
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
