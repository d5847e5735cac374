"""Calibration of the attention passes on the unmodified model: where each head's attention goes (window
plans, windows.py) and how far the unconditional rows' attention is from the conditional rows' (sharing
plans, sharing.py). One run of the calibration batches can record both."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from app.compress.sharing import SharingPlan, SharingSettings, guidance_ramp, shared_fraction
from app.compress.windows import DROP, FULL, WindowPlan, WindowSettings, candidates, window
from app.model.blocks import DenseAttention
from app.model.kv_cache import ScaleStep, scale_steps
from app.model.pipeline import VARPipeline
from app.model.progress import Progress

log = logging.getLogger(__name__)


class AttentionMass:
    """Attention mass per (layer, query scale, key scale, head), in total and inside each candidate band."""

    def __init__(self, depth: int, heads: int, patch_nums: tuple[int, ...], settings: WindowSettings):
        S = len(patch_nums)
        self.patch_nums, self.settings = tuple(patch_nums), settings
        self.steps = scale_steps(patch_nums)
        self.total = torch.zeros(depth, S, heads, dtype=torch.float64)
        self.block = torch.zeros(depth, S, S, heads, dtype=torch.float64)
        self.widths = {b: candidates(settings.shape, pn) for b, pn in enumerate(patch_nums)}
        self.in_band: dict[tuple[int, int], torch.Tensor] = {}  # (s, b) -> (depth, heads, candidates)
        self._bands: dict[tuple[int, int], torch.Tensor] = {}

    def bands(self, s: int, b: int) -> torch.Tensor:
        """(candidates, N_s, N_b) float64 masks, built once per scale pair."""
        key = (s, b)
        if key not in self._bands:
            pn_q, pn_k = self.patch_nums[s], self.patch_nums[b]
            shape = self.settings.shape
            self._bands[key] = torch.stack([window(shape, pn_q, pn_k, w) for w in self.widths[b]]).double()
        return self._bands[key]

    def add(self, layer: int, step: ScaleStep, probs: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """probs: (rows, heads, N_s, P_s) softmax output of one layer at one scale (all rows, CFG included);
        `values` are not needed. Scales of the dense prefix are not windowed, so not measured."""
        if step.si < self.settings.dense_scales:
            return
        p = probs.double()
        p = p.masked_fill(p < self.settings.prob_floor, 0.0).sum(0)  # (heads, N_s, P_s)
        s = step.si
        self.total[layer, s] += p.sum((1, 2))
        for kb in self.steps[self.settings.dense_scales : s + 1]:
            Y = p[:, :, kb.begin : kb.end]
            self.block[layer, s, kb.si] += Y.sum((1, 2))
            key = (s, kb.si)
            inside = torch.einsum("hqk,cqk->hc", Y, self.bands(s, kb.si))
            if key not in self.in_band:
                self.in_band[key] = torch.zeros(self.total.shape[0], *inside.shape, dtype=torch.float64)
            self.in_band[key][layer] += inside

    def plan(self) -> WindowPlan:
        depth, _, heads = self.total.shape
        plan = WindowPlan.full(depth, heads, self.patch_nums, self.settings)
        for (s, b), inside in self.in_band.items():
            share = self.block[:, s, b] / self.total[:, s].clamp_min(1e-30)  # (depth, heads)
            kept = inside / self.block[:, s, b].unsqueeze(-1).clamp_min(1e-30)  # (depth, heads, candidates)
            for layer in range(depth):
                for h in range(heads):
                    plan.windows[layer, s, b, h] = self._choose(share[layer, h].item(), kept[layer, h], b)
        return plan

    def _choose(self, share: float, kept: torch.Tensor, b: int) -> int:
        if share < self.settings.drop_mass:
            return DROP
        enough = (kept >= self.settings.tau).nonzero()
        return self.widths[b][int(enough[0])] if len(enough) else FULL


class CfgAttentionError:
    """Per (layer, query scale), summed over the calibration batches: the squared change of the unconditional
    rows' attention output when they use the conditional rows' probabilities, and its squared norm."""

    def __init__(self, depth: int, patch_nums: tuple[int, ...]):
        self.patch_nums = tuple(patch_nums)
        self.moved = torch.zeros(depth, len(patch_nums), dtype=torch.float64)
        self.norm = torch.zeros(depth, len(patch_nums), dtype=torch.float64)

    def add(self, layer: int, step: ScaleStep, probs: torch.Tensor, values: torch.Tensor) -> None:
        """probs: (2B, heads, N_s, P_s), values: (2B, heads, P_s, head_dim); rows [B, 2B) unconditional."""
        if not step.guided:  # no unconditional rows
            return
        B = probs.shape[0] // 2
        v = values[B:].double()
        own = probs[B:].double() @ v
        shared = probs[:B].double() @ v
        self.moved[layer, step.si] += (shared - own).square().sum()
        self.norm[layer, step.si] += own.square().sum()

    def plan(self, settings: SharingSettings) -> SharingPlan:
        """Distances: the relative error times the scale's guidance ramp; inf where nothing was measured."""
        measured = self.norm > 0
        error = (self.moved / self.norm.clamp_min(1e-300)).sqrt()
        distances = torch.where(measured, error * guidance_ramp(self.patch_nums), torch.inf)
        return SharingPlan(self.patch_nums, distances, settings)


class Recorder(Protocol):
    def add(self, layer: int, step: ScaleStep, probs: torch.Tensor, values: torch.Tensor) -> None: ...


class RecordingAttention(DenseAttention):
    """Dense attention that reports every scale's probabilities and values to the recorders. Its output is
    the dense kernel's own, so what the recorders see does not depend on which of them are listening."""

    def __init__(self, layer: int, recorders: Sequence[Recorder]):
        super().__init__()
        self.layer, self.recorders = layer, recorders

    def forward(self, q, k, v, *, scale: float, attn_bias, step: ScaleStep | None) -> torch.Tensor:
        if step is not None:
            probs = (q @ k.transpose(-1, -2)).mul_(scale).softmax(-1)
            for r in self.recorders:
                r.add(self.layer, step, probs, v)
        return super().forward(q, k, v, scale=scale, attn_bias=attn_bias, step=step)


class StepCounter:
    """A recorder that only counts: the run's steps are its (batch, scale) pairs, each begun when layer 0
    computes that scale, each weighted by the scale's tokens (what its cost grows with)."""

    def __init__(self, progress: Progress, patch_nums: Sequence[int], batches: int):
        self.progress, self.scales = progress, len(patch_nums)
        self.batch = -1
        progress.begin([pn * pn for pn in patch_nums] * batches)

    def add(self, layer: int, step: ScaleStep, probs: torch.Tensor, values: torch.Tensor) -> None:
        if layer:
            return
        if step.si == 0:
            self.batch += 1
        self.progress.advance(to=self.batch * self.scales + step.si)


def calibration_batches(num_classes: int, batches: int, batch_size: int) -> list[list[int]]:
    """`batches` batches that together cycle through the classes, so different batches see different classes."""
    n = batch_size
    return [[(i * n + j) % num_classes for j in range(n)] for i in range(batches)]


def record(
    pipe: VARPipeline,
    recorders: Sequence[Recorder],
    settings: WindowSettings | SharingSettings,
    progress: Progress | None = None,
) -> None:
    """Run the unmodified model on the settings' calibration batches, every layer reporting to `recorders`;
    each (batch, scale) step advances `progress`, whose `cancel` stops the run at the next step."""
    if progress is not None:
        recorders = [*recorders, StepCounter(progress, pipe.config.var.patch_nums, settings.batches)]
    blocks = pipe.var.block_list
    saved = [blk.attn.kernel for blk in blocks]
    t0 = time.perf_counter()
    try:
        for layer, blk in enumerate(blocks):
            blk.attn.kernel = RecordingAttention(layer, recorders)
        for i, labels in enumerate(calibration_batches(pipe.num_classes, settings.batches, settings.batch_size)):
            seeds = [settings.seed + 1000 * i + j for j in range(len(labels))]
            pipe.generate(labels, seeds=seeds)
    finally:
        for blk, kernel in zip(blocks, saved, strict=True):
            blk.attn.kernel = kernel
    if progress is not None:
        progress.finish()
    log.info("ran %d calibration batches in %.1f s", settings.batches, time.perf_counter() - t0)


def _attention_mass(pipe: VARPipeline, settings: WindowSettings) -> AttentionMass:
    if settings.dense_scales < 1:
        raise ValueError("dense_scales must be >= 1: the first scale (the class token) is always kept")
    cfg = pipe.config.var
    return AttentionMass(cfg.depth, cfg.num_heads, cfg.patch_nums, settings)


def _cfg_error(pipe: VARPipeline) -> CfgAttentionError:
    return CfgAttentionError(pipe.config.var.depth, pipe.config.var.patch_nums)


def _log_windows(plan: WindowPlan) -> WindowPlan:
    log.info("window plan: %.1f%% of (query, key) pairs kept", 100 * plan.kept_fraction())
    return plan


def _log_sharing(plan: SharingPlan) -> SharingPlan:
    log.info("sharing plan: %.1f%% of (layer, scale) pairs shared", 100 * shared_fraction(plan))
    return plan


def calibrate(
    pipe: VARPipeline, settings: WindowSettings | None = None, progress: Progress | None = None
) -> WindowPlan:
    """Run the unmodified model on the calibration batches and turn its attention mass into a window plan."""
    settings = settings or WindowSettings()
    mass = _attention_mass(pipe, settings)
    record(pipe, [mass], settings, progress)
    return _log_windows(mass.plan())


def calibrate_sharing(
    pipe: VARPipeline, settings: SharingSettings | None = None, progress: Progress | None = None
) -> SharingPlan:
    """Run the unmodified model on the calibration batches and measure, per (layer, scale), how far the
    unconditional rows' attention is from the conditional rows' (sharing.py)."""
    settings = settings or SharingSettings()
    error = _cfg_error(pipe)
    record(pipe, [error], settings, progress)
    return _log_sharing(error.plan(settings))


def calibrate_plans(
    pipe: VARPipeline, windows: WindowSettings, sharing: SharingSettings, progress: Progress | None = None
) -> tuple[WindowPlan, SharingPlan]:
    """Both plans from one run of the calibration batches, which both settings must name alike; the same
    plans as `calibrate` and `calibrate_sharing` give."""
    if _batches(windows) != _batches(sharing):
        raise ValueError(f"one calibration run: batches, batch size and seed must agree, got {windows} and {sharing}")
    mass, error = _attention_mass(pipe, windows), _cfg_error(pipe)
    record(pipe, [mass, error], windows, progress)
    return _log_windows(mass.plan()), _log_sharing(error.plan(sharing))


def _batches(settings: WindowSettings | SharingSettings) -> tuple[int, int, int]:
    return settings.batches, settings.batch_size, settings.seed
