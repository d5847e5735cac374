"""Fidelity of a compressed variant to its reference on one image, teacher-forced.

Two images sampled independently differ even from a perfect copy of the model, so they are never compared.
Instead both pipelines score the same token sequence (the one the candidate generated): each runs its own
scales over those tokens (`VARPipeline.forced_step`) and gives, at every position, the guided distribution it
would sample the token from. Per position:

- KL(candidate || reference) in nats, over the whole vocabulary (the distributions before top-k and top-p:
  the filters cut different supports, where KL would be infinite);
- top-1 agreement: whether both distributions' most likely token is the same.

Each pipeline runs its own passes: windowed attention, attention sharing, quantized weights, guidance
stopped early (the candidate's unguided scale is compared with the reference's guided one, so that
guidance-off's cost shows). A pipeline scored against itself gives KL 0 and agreement 1 exactly: its
arithmetic is row-stable, so the logits do not depend on the batch they were computed in.

`ForcedComparison` runs one model's one scale per `advance()` call, so that a caller can give the machine
back to other work between calls (the service scores only while it is idle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from app.model.kv_cache import KVLease, ScaleStep
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams

FORCED_SEED = 0  # a rollout wants seeds; forced, it draws no random number


class ForcedPipeline(Protocol):
    """What scoring needs of a pipeline (`VARPipeline`)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def steps(self) -> list[ScaleStep]: ...

    def start(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], lease: KVLease | None
    ) -> Rollout: ...

    def forced_step(self, rollout: Rollout, tokens_Bl: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ScaleFidelity:
    scale: int
    kl: float  # mean over the scale's positions of KL(candidate || reference), nats
    top1_agreement: float  # share of the scale's positions whose most likely tokens agree
    positions: int


@dataclass(frozen=True)
class Fidelity:
    """One image's fidelity: over its whole token sequence (every position weighs the same) and by scale."""

    scales: tuple[ScaleFidelity, ...]

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.scales)

    @property
    def kl(self) -> float:
        return sum(s.kl * s.positions for s in self.scales) / self.positions

    @property
    def top1_agreement(self) -> float:
        return sum(s.top1_agreement * s.positions for s in self.scales) / self.positions


def compare(candidate_BlV: torch.Tensor, reference_BlV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (B, l): KL(candidate || reference) in nats (float64), and whether the top tokens agree."""
    log_c = F.log_softmax(candidate_BlV.double(), dim=-1)
    log_r = F.log_softmax(reference_BlV.double(), dim=-1)
    kl = (log_c.exp() * (log_c - log_r)).sum(-1)
    return kl, candidate_BlV.argmax(-1) == reference_BlV.argmax(-1)


def split_scales(tokens_L: torch.Tensor, steps: Sequence[ScaleStep]) -> list[torch.Tensor]:
    """One image's token sequence (L,) -> its token maps, (1, pn * pn) per scale."""
    sizes = [s.num_tokens for s in steps]
    if tokens_L.numel() != sum(sizes):
        raise ValueError(f"{tokens_L.numel()} tokens for scales of {sizes} tokens, {sum(sizes)} in all")
    return [t.view(1, -1) for t in torch.split(tokens_L, sizes)]


class ForcedComparison:
    """Candidate and reference scoring one image's tokens, one model's one scale per `advance()`."""

    def __init__(
        self,
        candidate: ForcedPipeline,
        reference: ForcedPipeline,
        label: int,
        params: SamplingParams,
        tokens_L: torch.Tensor,
    ):
        self.pipes = (candidate, reference)
        self.tokens = split_scales(tokens_L, reference.steps)
        self.rollouts = tuple(p.start([label], [params], seeds=[FORCED_SEED], lease=None) for p in self.pipes)
        self.scales: list[ScaleFidelity] = []
        self._candidate_logits: torch.Tensor | None = None  # of the scale whose reference half is next

    @property
    def done(self) -> bool:
        return len(self.scales) == len(self.tokens)

    def advance(self) -> None:
        """The next half-scale: the candidate's logits of the next scale, or the reference's and the comparison."""
        assert not self.done, "every scale is scored"
        si = len(self.scales)
        turn = 0 if self._candidate_logits is None else 1
        pipe, rollout = self.pipes[turn], self.rollouts[turn]
        logits = pipe.forced_step(rollout, self.tokens[si].to(pipe.device))
        if turn == 0:
            self._candidate_logits = logits
            return
        assert self._candidate_logits is not None
        kl, agree = compare(self._candidate_logits, logits.to(self._candidate_logits.device))
        self._candidate_logits = None
        self.scales.append(ScaleFidelity(si, kl.mean().item(), agree.double().mean().item(), kl.numel()))

    def result(self) -> Fidelity:
        assert self.done, "scales are left to score"
        for r in self.rollouts:
            r.release()
        return Fidelity(tuple(self.scales))


def score(
    candidate: ForcedPipeline,
    reference: ForcedPipeline,
    label: int,
    params: SamplingParams,
    tokens_L: torch.Tensor,
) -> Fidelity:
    """The whole comparison at once (offline tools and tests)."""
    comparison = ForcedComparison(candidate, reference, label, params, tokens_L)
    while not comparison.done:
        comparison.advance()
    return comparison.result()
