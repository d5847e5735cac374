"""Rollout: rows that go through the scales together, one scale per step, until their latent is complete.

`VARPipeline.generate` runs one rollout from its first scale to its last. A scheduler may instead hold
several rollouts at different scales and step them in turns (scale-level batching): a rollout keeps
everything one generation needs between scales (conditioning, KV cache, latent, next input tokens, random
streams), and may lose rows on the way (`keep_rows`: a request that gave up), which frees their cache rows.

A step is split around the transformer so that a caller can run the transformer of several rollouts in one
call (`VARPipeline.step_all`): `inputs()` gives the next scale's tokens, conditioning, cache and step,
`take(logits)` samples that scale from the logits and prepares the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from app.model.kv_cache import KVCache, KVLease, ScaleStep
from app.model.sampling import (
    NoiseSource,
    PerRowGenerators,
    RowSampling,
    SamplingParams,
    filter_top_k_top_p_,
    guide,
    gumbel_soft_codes,
    sample_tokens,
)
from app.model.timing import NULL_TIMER, Stage, StageTimer
from app.model.var import VAR, Conditioning
from app.model.vqvae import VQVAE

LogitsObserver = Callable[[int, torch.Tensor], None]


@dataclass
class StepInputs:
    """What the transformer needs for one scale of one rollout."""

    x: torch.Tensor  # (rows, l, C), rows = 2B while guided, else B
    cond: Conditioning
    cache: KVCache
    step: ScaleStep


class Rollout:
    """B rows (2B with guidance) between scales. Made by `VARPipeline.start`."""

    def __init__(
        self,
        var: VAR,
        vqvae: VQVAE,
        steps: list[ScaleStep],
        params: list[SamplingParams],
        noise: NoiseSource,
        seeds: list[int] | None,
        cache: KVCache,
        lease: KVLease | None,
        autocast_dtype: torch.dtype | None,
        labels_B: torch.Tensor,
    ):
        self.var, self.vqvae, self.steps = var, vqvae, steps
        self.params, self.noise, self.seeds = params, noise, seeds
        self.autocast_dtype = autocast_dtype
        self.device = labels_B.device
        self.sampling = RowSampling.from_params(params, self.device)
        self.cache, self.lease = cache, lease
        self.cache_bytes = cache.nbytes()
        self.si = 0  # the next scale
        self.tokens: list[torch.Tensor] = []
        B = labels_B.shape[0]
        null = torch.full_like(labels_B, var.num_classes)
        with self.autocast():
            self.cond = var.condition(torch.cat((labels_B, null)))  # rows [0, B) conditional, [B, 2B) null class
            self.lvl_pos = var.level_pos()
            self.x = var.first_tokens(self.cond, self.lvl_pos)
        H = var.cfg.patch_nums[-1]
        self.f_hat = torch.zeros(B, var.cfg.z_channels, H, H, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.f_hat.shape[0]

    @property
    def done(self) -> bool:
        return self.si == len(self.steps)

    @property
    def step(self) -> ScaleStep:
        return self.steps[self.si]

    @property
    def num_tokens(self) -> int:
        """Tokens the transformer computes at the next scale (both halves while guided)."""
        return self.x.shape[0] * self.x.shape[1]

    def autocast(self) -> torch.autocast | nullcontext[None]:
        return autocast_or_not(self.device, self.autocast_dtype)

    # ---- one scale ----------------------------------------------------------------------------------
    def inputs(self) -> StepInputs:
        """The next scale's transformer inputs. Where guidance stops, the unconditional rows leave first
        (and their cache rows go back to the pool)."""
        assert not self.done, "the rollout has run every scale"
        B, step = self.batch_size, self.step
        if not step.guided and self.cond.cond_BD.shape[0] == 2 * B:
            self.cond, self.cache = self.cond.first_rows(B), self.cache.first_rows(B)
            if self.lease is not None:
                self.lease.shrink(B)
        return StepInputs(self.x, self.cond, self.cache, step)

    def take(
        self,
        logits_BlV: torch.Tensor,
        timer: StageTimer = NULL_TIMER,
        on_guided_logits: LogitsObserver | None = None,
        forced_Bl: torch.Tensor | None = None,
    ) -> None:
        """Sample the scale whose logits these are, add it to the latent, prepare the next scale's tokens.
        `forced_Bl` (teacher forcing): go on with these tokens instead of sampling, their hard codes (a row with
        more_smooth samples soft codes; forced, it takes the tokens' own)."""
        step, B, K = self.step, self.batch_size, len(self.steps)
        ratio = step.si / max(K - 1, 1)
        guided = guide(logits_BlV, self.sampling.cfg, ratio) if step.guided else logits_BlV
        if on_guided_logits is not None:
            on_guided_logits(step.si, guided.clone())
        with timer.section(Stage.SAMPLING):
            if forced_Bl is None:
                idx_Bl, h_BlC = self._sample(guided, ratio)
            else:
                idx_Bl, h_BlC = forced_Bl, self.vqvae.quantize.embedding.weight[forced_Bl]
        self.tokens.append(idx_Bl)
        with timer.section(Stage.LATENT):
            pn = self.var.cfg.patch_nums[step.si]
            h_BChw = h_BlC.transpose(1, 2).reshape(B, -1, pn, pn)
            next_BChw = self.vqvae.quantize.next_input(step.si, self.f_hat, h_BChw)
        self.si += 1
        if not self.done:
            self.x = self._next_tokens(next_BChw, self.step)

    def _sample(self, guided_BlV: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, l) and the code vectors (B, l, Cvae) that enter f_hat."""
        rows = self.sampling
        masked = filter_top_k_top_p_(guided_BlV, rows.top_k_B, rows.top_p_B)
        idx_Bl = sample_tokens(masked.softmax(dim=-1), self.noise)
        codebook = self.vqvae.quantize.embedding.weight
        h_BlC = codebook[idx_Bl]
        if rows.smooth_rows:
            h_BlC[rows.smooth_rows] = gumbel_soft_codes(masked, codebook, ratio, rows.smooth_rows, self.noise)
        return idx_Bl, h_BlC

    def _next_tokens(self, next_BChw: torch.Tensor, step: ScaleStep) -> torch.Tensor:
        with self.autocast():
            x_BlC = self.var.embed_scale(next_BChw, step, self.lvl_pos)
        return x_BlC.repeat(2, 1, 1) if step.guided else x_BlC  # the guidance half sees the same tokens

    # ---- rows leaving -------------------------------------------------------------------------------
    @torch.inference_mode()
    def keep_rows(self, keep: list[int]) -> None:
        """Only rows `keep` (indices in [0, B), in order) go on; the others' cache rows are freed. The kept rows
        compute exactly what they would have: every row's arithmetic is its own (batch invariance)."""
        B = self.batch_size
        assert keep and all(0 <= i < B for i in keep), f"rows to keep must be in [0, {B}), got {keep}"
        assert isinstance(self.noise, PerRowGenerators), "rows leave only rollouts with one generator per row"
        guided = self.cond.cond_BD.shape[0] == 2 * B
        both = keep + [B + i for i in keep] if guided else keep
        self.cond = _rows_of(self.cond, both)
        self.cache = self.cache.keep_rows(both)
        if self.lease is not None:
            self.lease.shrink(len(both))
        if not self.done:
            self.x = self.x[both] if self.x.shape[0] == 2 * B else self.x[keep]
        self.f_hat = self.f_hat[keep]
        self.tokens = [t[keep] for t in self.tokens]
        self.params = [self.params[i] for i in keep]
        self.sampling = RowSampling.from_params(self.params, self.device)
        self.noise = PerRowGenerators([self.noise.generators[i] for i in keep])
        if self.seeds is not None:
            self.seeds = [self.seeds[i] for i in keep]

    def release(self) -> None:
        """Return the cache rows to the pool (after decoding, or when the rollout is given up)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def autocast_or_not(device: torch.device, dtype: torch.dtype | None) -> torch.autocast | nullcontext[None]:
    """Autocast to `dtype` on `device`; no autocast for None."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _rows_of(cond: Conditioning, rows: list[int]) -> Conditioning:
    return Conditioning(cond.cond_BD[rows], [m[rows] for m in cond.block_mods], cond.head_mod[rows])
