"""Random VAR weights larger than the near-identity official initialisation, so tests have teeth."""

from __future__ import annotations

import math

import torch

from app.model.pipeline import VARPipeline


def spread_weights(pipe: VARPipeline, seed: int) -> VARPipeline:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.var.named_parameters():
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim == 2 and "emb" not in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return pipe
