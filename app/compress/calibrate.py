"""Window calibration: measure where each head's attention goes, then choose its windows (see windows.py)."""

from __future__ import annotations

import logging
import time

import torch

from app.compress.windows import DROP, FULL, WindowPlan, WindowSettings, candidates, window
from app.model.blocks import DenseAttention
from app.model.kv_cache import ScaleStep, scale_steps
from app.model.pipeline import VARPipeline

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

    def add(self, layer: int, step: ScaleStep, probs: torch.Tensor) -> None:
        """probs: (rows, heads, N_s, P_s) softmax output of one layer at one scale (all rows, CFG included)."""
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


class RecordingAttention(DenseAttention):
    """Dense attention that reports its probabilities at windowed query scales."""

    def __init__(self, layer: int, mass: AttentionMass):
        super().__init__()
        self.layer, self.mass = layer, mass

    def forward(self, q, k, v, *, scale: float, attn_bias, step: ScaleStep | None) -> torch.Tensor:
        if step is None or step.si < self.mass.settings.dense_scales:
            return super().forward(q, k, v, scale=scale, attn_bias=attn_bias, step=step)
        probs = (q @ k.transpose(-1, -2)).mul_(scale).softmax(-1)
        self.mass.add(self.layer, step, probs)
        return probs @ v


def calibration_batches(num_classes: int, settings: WindowSettings) -> list[list[int]]:
    """`batches` batches that together cycle through the classes, so different batches see different classes."""
    n = settings.batch_size
    return [[(i * n + j) % num_classes for j in range(n)] for i in range(settings.batches)]


def calibrate(pipe: VARPipeline, settings: WindowSettings | None = None) -> WindowPlan:
    """Run the unmodified model on the calibration batches and turn its attention mass into a window plan."""
    settings = settings or WindowSettings()
    if settings.dense_scales < 1:
        raise ValueError("dense_scales must be >= 1: the first scale (the class token) is always kept")
    cfg = pipe.config.var
    mass = AttentionMass(cfg.depth, cfg.num_heads, cfg.patch_nums, settings)
    blocks = pipe.var.block_list
    saved = [blk.attn.kernel for blk in blocks]
    t0 = time.perf_counter()
    try:
        for layer, blk in enumerate(blocks):
            blk.attn.kernel = RecordingAttention(layer, mass)
        for i, labels in enumerate(calibration_batches(pipe.num_classes, settings)):
            seeds = [settings.seed + 1000 * i + j for j in range(len(labels))]
            pipe.generate(labels, seeds=seeds)
    finally:
        for blk, kernel in zip(blocks, saved, strict=True):
            blk.attn.kernel = kernel
    plan = mass.plan()
    log.info("calibrated windows in %.1f s: %.1f%% of pairs kept", time.perf_counter() - t0, 100 * plan.kept_fraction())
    return plan
