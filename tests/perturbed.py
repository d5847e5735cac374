"""A variant damaged on purpose, for tests only: shadow fidelity must tell it from a good compressed variant."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.compress import DEVICE_DEFAULT_PRECISION
from app.compress.registry import PassSpec, Step, VariantSpec
from app.model.pipeline import VARPipeline


@dataclass(frozen=True)
class Perturbation:
    relative_noise: float = 0.5
    seed: int = 0


def perturbed_weights(pipe: VARPipeline, *, relative_noise: float = 0.5, seed: int = 0) -> VARPipeline:
    """Every linear weight of the transformer plus Gaussian noise of `relative_noise` times its own spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pipe.var.modules():
            if isinstance(m, nn.Linear):
                noise = torch.randn(m.weight.shape, generator=g) * m.weight.std() * relative_noise
                m.weight.add_(noise.to(m.weight))
    return pipe


PERTURB = PassSpec("perturbed_weights", perturbed_weights, Perturbation, "Noise on every linear weight (tests only).")
PERTURBED = VariantSpec(
    "tests only: the transformer's weights damaged", (Step(DEVICE_DEFAULT_PRECISION), Step(PERTURB))
)
