"""Random VAR weights larger than the near-identity official initialisation, so tests have teeth."""

from __future__ import annotations

import math

import torch

from app.model.checkpoint import random_pipeline
from app.model.config import PipelineConfig, VARConfig, VQVAEConfig
from app.model.pipeline import VARPipeline


def spread_weights(pipe: VARPipeline, seed: int) -> VARPipeline:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.var.named_parameters():
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim == 2 and "emb" not in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return pipe


def small_pipeline(depth: int, embed_dim: int, seed: int) -> VARPipeline:
    """Scales (1, 2, 4), 4 heads, a 16x16 decoder, random weights from `seed`, spread with `seed + 1`: a
    pipeline that compiles in seconds on 2 cores."""
    pn = (1, 2, 4)
    var = VARConfig(
        depth=depth, embed_dim=embed_dim, num_heads=4, num_classes=10, vocab_size=64, z_channels=8, patch_nums=pn
    )
    vqvae = VQVAEConfig(
        vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, patch_nums=pn
    )
    return spread_weights(random_pipeline(PipelineConfig("small", var, vqvae), seed=seed), seed=seed + 1)
