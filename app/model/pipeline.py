"""VARPipeline: the classifier-free-guided next-scale sampling loop, tokens -> images in [0, 1]. No I/O.

Two randomness modes:
- per-image (default): every row has its own seed and generator, so an image does not depend on what
  else shares its batch;
- `shared_seed`: the official behaviour, one generator re-seeded once for the whole batch (this is
  what reproduces the official code's sampled outputs token for token).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from app.model.config import PipelineConfig
from app.model.kv_cache import KVCache, ScaleStep, scale_steps
from app.model.sampling import (
    NoiseSource,
    PerRowGenerators,
    RowSampling,
    SamplingParams,
    SharedGenerator,
    filter_top_k_top_p_,
    guide,
    gumbel_soft_codes,
    sample_tokens,
)
from app.model.timing import NULL_TIMER, Stage, StageTimer, scale_section
from app.model.var import VAR, Conditioning
from app.model.vqvae import VQVAE

LogitsObserver = Callable[[int, torch.Tensor], None]
# One scale of the transformer: (tokens, conditioning, cache, step) -> logits; `VAR.step` or a compiled form
StepFn = Callable[[torch.Tensor, Conditioning, KVCache, ScaleStep], torch.Tensor]
# The VQVAE decoder: latent after post_quant_conv -> image in [-1, 1]; `vqvae.decoder` or a compiled form
DecoderFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Generation:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]
    tokens: list[torch.Tensor]  # per scale (B, pn*pn) int64
    f_hat: torch.Tensor  # (B, Cvae, pn_last, pn_last), the latent handed to the decoder
    seeds: list[int] | None  # per image; None in shared-generator mode
    kv_cache_bytes: int = 0  # the KV cache this generation allocated (keys, values and the last scale's workspace)


class VARPipeline:
    def __init__(
        self,
        config: PipelineConfig,
        var: VAR,
        vqvae: VQVAE,
        *,
        autocast_dtype: torch.dtype | None = None,
        decode_dtype: torch.dtype | None = None,
    ):
        self.config = config
        self.var = var.eval()
        self.vqvae = vqvae.eval().use_channels_last()  # converts the decoder's weights in place
        self.autocast_dtype = autocast_dtype  # transformer matmuls (e.g. bf16); logits stay float32
        self.decode_dtype = decode_dtype  # VQVAE decoder weights/activations; None = float32
        self.source: Path | None = None  # the checkpoint folder, where files calibrated for it live
        self.guided_scales: int | None = None  # guidance on the first n scales only; None: every scale
        # what runs one scale and what decodes; a pass may replace them (compiled forms) and leaves the
        # modules untouched, so passes go after any deepcopy
        self.step_fn: StepFn = var.step
        self.decoder_fn: DecoderFn = self.vqvae.decoder

    @property
    def device(self) -> torch.device:
        return self.var.pos_1LC.device  # a plain parameter (a quantized layer's weight may be packed)

    @property
    def steps(self) -> list[ScaleStep]:
        """The scales in order, each marked with whether it runs the guidance branch."""
        n = self.guided_scales
        return [dataclasses.replace(s, guided=n is None or s.si < n) for s in scale_steps(self.config.var.patch_nums)]

    @property
    def num_classes(self) -> int:
        return self.config.var.num_classes

    def to(self, device: torch.device | str) -> VARPipeline:
        self.var.to(device)
        self.vqvae.to(device)
        return self

    # ---- public entry point ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        labels: Sequence[int] | torch.Tensor,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        seeds: Sequence[int] | None = None,
        shared_seed: int | None = None,
        timer: StageTimer = NULL_TIMER,
        on_guided_logits: LogitsObserver | None = None,
    ) -> Generation:
        """Generate one image per label. `params` is one SamplingParams for all rows, one per row, or None
        for the model's recommended settings (`config.default_sampling`).

        Randomness: `seeds` (one per row; random ones are drawn and returned when omitted), or
        `shared_seed` for the official one-generator-per-batch behaviour.
        """
        label_list = [int(x) for x in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        row_params = self._validate(
            label_list, self.config.default_sampling if params is None else params, seeds, shared_seed
        )
        B = len(label_list)
        noise: NoiseSource
        row_seeds: list[int] | None = None
        if shared_seed is not None:
            noise = SharedGenerator(torch.Generator(self.device).manual_seed(shared_seed))
        else:
            row_seeds = [int(s) for s in seeds] if seeds is not None else [secrets.randbits(63) for _ in range(B)]
            noise = PerRowGenerators.from_seeds(row_seeds, self.device)
        rows = RowSampling.from_params(row_params, self.device)
        labels_B = torch.tensor(label_list, device=self.device)
        tokens, f_hat, cache_bytes = self._sample_tokens(labels_B, rows, noise, timer, on_guided_logits)
        with timer.section(Stage.DECODE):
            images = self.decode(f_hat)
        return Generation(images, tokens, f_hat, row_seeds, cache_bytes)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> images in [0, 1] (float32). Autocast only for a decoder whose weights are not already in
        `decode_dtype` (a decoder stored in it runs in it end to end, without autocast's per-op casts)."""
        if self.decode_dtype in (None, self.vqvae.decoder.dtype):
            return self.vqvae.fhat_to_img(f_hat, self.decoder_fn).add_(1).mul_(0.5)
        with torch.autocast(self.device.type, dtype=self.decode_dtype):
            img = self.vqvae.fhat_to_img(f_hat, self.decoder_fn)
        return img.float().add_(1).mul_(0.5)

    # ---- the loop ----------------------------------------------------------------------------------
    def _sample_tokens(
        self,
        labels_B: torch.Tensor,
        rows: RowSampling,
        noise: NoiseSource,
        timer: StageTimer,
        on_guided_logits: LogitsObserver | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """Tokens per scale, the final latent f_hat, and the bytes of the KV cache allocated for them."""
        var, quant, steps = self.var, self.vqvae.quantize, self.steps
        B, K = labels_B.shape[0], len(steps)
        null = torch.full_like(labels_B, self.num_classes)
        with self._autocast():
            cond = var.condition(torch.cat((labels_B, null)))  # rows [0, B) conditional, [B, 2B) null class
            lvl_pos = var.level_pos()
            x = var.first_tokens(cond, lvl_pos)
        cache = var.new_cache(2 * B, self.device, self.autocast_dtype or torch.float32)
        cache_bytes = cache.nbytes()
        H = self.config.var.patch_nums[-1]
        f_hat = torch.zeros(B, self.config.var.z_channels, H, H, device=self.device)
        tokens = []
        for step in steps:
            ratio = step.si / max(K - 1, 1)
            if not step.guided and cond.cond_BD.shape[0] == 2 * B:  # guidance stops: drop the unconditional rows
                cond, cache = cond.first_rows(B), cache.first_rows(B)
            with timer.section(scale_section(step.si)), self._autocast():
                logits = self.step_fn(x, cond, cache, step)
            guided = guide(logits, rows.cfg, ratio) if step.guided else logits
            if on_guided_logits is not None:
                on_guided_logits(step.si, guided.clone())
            with timer.section(Stage.SAMPLING):
                idx_Bl, h_BlC = self._sample_scale(guided, rows, noise, ratio)
            tokens.append(idx_Bl)
            with timer.section(Stage.LATENT):
                pn = self.config.var.patch_nums[step.si]
                next_BChw = quant.next_input(step.si, f_hat, h_BlC.transpose(1, 2).reshape(B, -1, pn, pn))
            if not step.is_last:
                x = self._next_tokens(next_BChw, steps[step.si + 1], lvl_pos)
        return tokens, f_hat, cache_bytes

    def _sample_scale(
        self, guided_BlV: torch.Tensor, rows: RowSampling, noise: NoiseSource, ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, l) and the code vectors (B, l, Cvae) that enter f_hat."""
        masked = filter_top_k_top_p_(guided_BlV, rows.top_k_B, rows.top_p_B)
        idx_Bl = sample_tokens(masked.softmax(dim=-1), noise)
        codebook = self.vqvae.quantize.embedding.weight
        h_BlC = codebook[idx_Bl]
        if rows.smooth_rows:
            h_BlC[rows.smooth_rows] = gumbel_soft_codes(masked, codebook, ratio, rows.smooth_rows, noise)
        return idx_Bl, h_BlC

    def _next_tokens(self, next_BChw: torch.Tensor, step: ScaleStep, lvl_pos: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            x_BlC = self.var.embed_scale(next_BChw, step, lvl_pos)
        return x_BlC.repeat(2, 1, 1) if step.guided else x_BlC  # the guidance half sees the same tokens

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- input checks ------------------------------------------------------------------------------
    def _validate(
        self,
        labels: list[int],
        params: SamplingParams | Sequence[SamplingParams],
        seeds: Sequence[int] | None,
        shared_seed: int | None,
    ) -> list[SamplingParams]:
        B = len(labels)
        if B < 1:
            raise ValueError("batch size must be >= 1 (got no labels)")
        for x in labels:
            if not 0 <= x < self.num_classes:
                raise ValueError(f"class label must be in [0, {self.num_classes - 1}], got {x}")
        row_params = [params] * B if isinstance(params, SamplingParams) else list(params)
        if len(row_params) != B:
            raise ValueError(f"params must be one SamplingParams or one per label ({B}), got {len(row_params)}")
        for p in row_params:
            p.validate(self.config.var.vocab_size)
        if seeds is not None and shared_seed is not None:
            raise ValueError("give either seeds (one per image) or shared_seed, not both")
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"seeds must have one entry per label ({B}), got {len(seeds)}")
        if shared_seed is not None and len({p.more_smooth for p in row_params}) > 1:
            raise ValueError("more_smooth must be the same for every row with shared_seed")
        return row_params
