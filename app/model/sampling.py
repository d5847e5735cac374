"""Token sampling on guided logits, with per-row parameters and per-row random streams. Pure functions.

The official sampler calls `torch.multinomial(probs, 1, generator=g)` once per scale, which PyTorch
implements as `argmax(probs / q)` with `q` one `exponential_` draw shaped like `probs`. We implement that
identity directly, so the only difference between the official shared-generator behaviour and our
per-image generators is where the exponential noise comes from (`NoiseSource`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one image is sampled. top_k = 0 and top_p = 0 switch those filters off (official convention)."""

    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False

    def overridden(
        self, cfg: float | None = None, top_k: int | None = None, top_p: float | None = None
    ) -> SamplingParams:
        """These settings with the given (non-None) ones replaced."""
        return dataclasses.replace(
            self,
            cfg=self.cfg if cfg is None else cfg,
            top_k=self.top_k if top_k is None else top_k,
            top_p=self.top_p if top_p is None else top_p,
        )

    def validate(self, vocab_size: int) -> None:
        if not self.cfg >= 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling parameters as tensors (B,) on the sampling device."""

    cfg: list[float]
    top_k_B: torch.Tensor
    top_p_B: torch.Tensor
    smooth_rows: list[int]

    @staticmethod
    def from_params(params: Sequence[SamplingParams], device: torch.device) -> RowSampling:
        return RowSampling(
            cfg=[p.cfg for p in params],
            top_k_B=torch.tensor([p.top_k for p in params], device=device),
            top_p_B=torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device),
            smooth_rows=[i for i, p in enumerate(params) if p.more_smooth],
        )


class NoiseSource(Protocol):
    def exponential(self, rows: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Exp(1) noise of shape (len(rows), *shape) for the given batch rows."""
        ...


class SharedGenerator:
    """The official behaviour: one generator for the whole batch, so a row's stream depends on its batch."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def exponential(self, rows: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.empty((len(rows), *shape), device=device).exponential_(generator=self.generator)


class PerRowGenerators:
    """One generator per image: an image's stream depends only on its own seed."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @staticmethod
    def from_seeds(seeds: Sequence[int], device: torch.device) -> PerRowGenerators:
        return PerRowGenerators([torch.Generator(device).manual_seed(int(s)) for s in seeds])

    def exponential(self, rows: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        draws = [torch.empty(shape, device=device).exponential_(generator=self.generators[r]) for r in rows]
        return torch.stack(draws)


def guide(logits_2BlV: torch.Tensor, cfg_B: Sequence[float], ratio: float) -> torch.Tensor:
    """Classifier-free guidance with the linear ramp t = cfg * si / (K - 1): (1 + t) * cond - t * uncond.

    Coefficients are formed in float64 then rounded once, as the official scalar arithmetic does.
    """
    B = len(cfg_B)
    t = [c * ratio for c in cfg_B]
    dev = logits_2BlV.device
    a = torch.tensor([1 + x for x in t], dtype=torch.float32, device=dev).view(B, 1, 1)
    b = torch.tensor(t, dtype=torch.float32, device=dev).view(B, 1, 1)
    return a * logits_2BlV[:B] - b * logits_2BlV[B:]


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k (ties at the threshold kept), then outside its top-p
    nucleus (smallest set whose mass reaches top_p; the best token always survives). In place."""
    B, l, _ = logits_BlV.shape
    k_max = int(top_k_B.max())
    if k_max > 0:
        top_vals = logits_BlV.topk(k_max, dim=-1, sorted=True).values
        kth = top_vals.gather(-1, (top_k_B.clamp(min=1) - 1).view(B, 1, 1).expand(B, l, 1))
        kth = torch.where(top_k_B.view(B, 1, 1) > 0, kth, -torch.inf)
        logits_BlV.masked_fill_(logits_BlV < kth, -torch.inf)
    top_p_on = top_p_B > 0
    if bool(top_p_on.any()):
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
        limit = (1 - top_p_B).to(torch.float32).view(B, 1, 1)
        remove_sorted = (cum <= limit) & top_p_on.view(B, 1, 1)
        remove_sorted[..., -1:] = False
        logits_BlV.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -torch.inf)
    return logits_BlV


def sample_tokens(probs_BlV: torch.Tensor, noise: NoiseSource) -> torch.Tensor:
    """One token per position, distributed as probs: argmax(p / q), q ~ Exp(1) (= torch.multinomial)."""
    B, l, V = probs_BlV.shape
    q = noise.exponential(range(B), (l, V), probs_BlV.device)
    return (probs_BlV / q).argmax(dim=-1)


def gumbel_soft_codes(
    masked_logits_BlV: torch.Tensor, codebook_VC: torch.Tensor, ratio: float, rows: Sequence[int], noise: NoiseSource
) -> torch.Tensor:
    """`more_smooth`: a Gumbel-softmax mixture of code vectors for the given rows, (len(rows), l, Cvae).

    Logits sharpened by (1 + ratio), temperature max(0.27 * (1 - 0.95 * ratio), 0.005).
    """
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    logits = masked_logits_BlV[list(rows)].mul(1 + ratio)
    gumbels = -noise.exponential(rows, tuple(logits.shape[1:]), logits.device).log()
    return ((logits + gumbels) / tau).softmax(dim=-1) @ codebook_VC.unsqueeze(0)
