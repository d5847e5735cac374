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

import torch

from app.model.config import PipelineConfig
from app.model.kv_cache import KVCache, KVLease, KVPool, ScaleStep, scale_steps
from app.model.rollout import LogitsObserver, Rollout, autocast_or_not
from app.model.sampling import NoiseSource, PerRowGenerators, SamplingParams, SharedGenerator
from app.model.timing import NULL_TIMER, Stage, StageTimer, scale_section
from app.model.var import VAR, Conditioning
from app.model.vqvae import VQVAE

# One scale of the transformer: (tokens, conditioning, cache, step) -> logits; `VAR.step` or a compiled form
StepFn = Callable[[torch.Tensor, Conditioning, KVCache, ScaleStep], torch.Tensor]
# The VQVAE decoder: latent after post_quant_conv -> image in [-1, 1]; `vqvae.decoder` or a compiled form
DecoderFn = Callable[[torch.Tensor], torch.Tensor]


GROUPED_SECTION = f"{Stage.TRANSFORMER}.grouped"  # the timer section of rollouts stepped together


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
        rollout = self.start(labels, params, seeds=seeds, shared_seed=shared_seed)
        while not rollout.done:
            self.step_all([rollout], timer, on_guided_logits)
        images = self.finish(rollout, timer)
        return Generation(images, rollout.tokens, rollout.f_hat, rollout.seeds, rollout.cache_bytes)

    @torch.inference_mode()
    def start(
        self,
        labels: Sequence[int] | torch.Tensor,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        seeds: Sequence[int] | None = None,
        shared_seed: int | None = None,
        lease: KVLease | None = None,
    ) -> Rollout:
        """A rollout of these rows before their first scale (arguments as `generate`). Its KV cache is `lease`,
        two rows per image from a pool (`new_pool`), or allocated for it (None)."""
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
        if lease is None:
            cache = self.var.new_cache(2 * B, self.device, self.cache_dtype)
        elif lease.rows != 2 * B:
            raise ValueError(f"a lease of {lease.rows} cache rows for {B} images (two rows each)")
        else:
            cache = lease.cache
        labels_B = torch.tensor(label_list, device=self.device)
        return Rollout(
            self.var, self.vqvae, self.steps, row_params, noise, row_seeds, cache, lease, self.autocast_dtype, labels_B
        )

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32

    def new_pool(self, images: int) -> KVPool:
        """A KV pool for `images` rows in flight (two cache rows each, for guidance)."""
        return KVPool(self.var.new_cache(2 * images, self.device, self.cache_dtype))

    @torch.inference_mode()
    def step_all(
        self,
        rollouts: Sequence[Rollout],
        timer: StageTimer = NULL_TIMER,
        on_guided_logits: LogitsObserver | None = None,
    ) -> None:
        """One scale of each rollout, each at its own scale. The eager step runs them together, its linear layers
        over all their tokens at once (`VAR.step_groups`); a compiled step (one graph per scale and batch size)
        runs them one by one."""
        inputs = [r.inputs() for r in rollouts]
        if len(rollouts) > 1 and self.step_fn == self.var.step:
            with timer.section(GROUPED_SECTION), self._autocast():
                logits = self.var.step_groups(
                    [i.x for i in inputs], [i.cond for i in inputs], [i.cache for i in inputs], [i.step for i in inputs]
                )
        else:
            logits = []
            for i in inputs:
                with timer.section(scale_section(i.step.si)), self._autocast():
                    logits.append(self.step_fn(i.x, i.cond, i.cache, i.step))
        for r, lg in zip(rollouts, logits, strict=True):
            r.take(lg, timer, on_guided_logits)

    @torch.inference_mode()
    def forced_step(self, rollout: Rollout, tokens_Bl: torch.Tensor) -> torch.Tensor:
        """One scale of `rollout`, teacher-forced: the guided logits (B, l, V) this pipeline samples that scale
        from (before top-k and top-p), and the rollout goes on with `tokens_Bl` as if it had sampled them. Scoring
        a pipeline's own tokens gives the logits it generated them from (its arithmetic is row-stable)."""
        i = rollout.inputs()
        with self._autocast():
            logits = self.step_fn(i.x, i.cond, i.cache, i.step)
        seen: list[torch.Tensor] = []
        rollout.take(logits, on_guided_logits=lambda _, guided: seen.append(guided), forced_Bl=tokens_Bl)
        return seen[0]

    @torch.inference_mode()
    def finish(self, rollout: Rollout, timer: StageTimer = NULL_TIMER) -> torch.Tensor:
        """The images of a rollout that has run every scale; its cache rows go back to the pool."""
        assert rollout.done, "the rollout has scales left"
        rollout.release()
        with timer.section(Stage.DECODE):
            return self.decode(rollout.f_hat)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> images in [0, 1] (float32). Autocast only for a decoder whose weights are not already in
        `decode_dtype` (a decoder stored in it runs in it end to end, without autocast's per-op casts)."""
        if self.decode_dtype in (None, self.vqvae.decoder.dtype):
            return self.vqvae.fhat_to_img(f_hat, self.decoder_fn).add_(1).mul_(0.5)
        with torch.autocast(self.device.type, dtype=self.decode_dtype):
            img = self.vqvae.fhat_to_img(f_hat, self.decoder_fn)
        return img.float().add_(1).mul_(0.5)

    def _autocast(self) -> torch.autocast | nullcontext[None]:
        return autocast_or_not(self.device, self.autocast_dtype)

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
