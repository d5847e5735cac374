"""Teacher-forced fidelity on the trained demo model: the floor of a model against itself, what each variant's
passes cost, and that a damaged variant stands out."""

from __future__ import annotations

import math

import pytest
import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.quality.fidelity import Fidelity, compare, score, split_scales
from tests.conftest import load_variant
from tests.perturbed import perturbed_weights

PARAMS = SamplingParams(cfg=3.0, top_k=0, top_p=0.0)  # the demo model's own settings
IMAGES = 6


@pytest.fixture(scope="module")
def baseline() -> VARPipeline:
    return load_variant("baseline")


def tokens_of(pipe: VARPipeline, labels: list[int], seeds: list[int]) -> torch.Tensor:
    """(B, L): each image's tokens over every scale, as the engine hands them over."""
    return torch.cat(pipe.generate(labels, PARAMS, seeds=seeds).tokens, dim=1)


def mean_fidelity(candidate: VARPipeline, reference: VARPipeline) -> tuple[float, float, list[Fidelity]]:
    """Mean KL and agreement over IMAGES images the candidate generates, scored against the reference."""
    labels, seeds = list(range(IMAGES)), [100 + i for i in range(IMAGES)]
    tokens = tokens_of(candidate, labels, seeds)
    scored = [score(candidate, reference, label, PARAMS, t) for label, t in zip(labels, tokens, strict=True)]
    return sum(f.kl for f in scored) / IMAGES, sum(f.top1_agreement for f in scored) / IMAGES, scored


def test_kl_is_of_the_candidate_from_the_reference() -> None:
    c = torch.tensor([[[math.log(0.5), math.log(0.5)]]])
    r = torch.tensor([[[math.log(0.9), math.log(0.1)]]])
    kl, agree = compare(c, r)
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(c || r); KL(r || c) is 0.368
    assert kl.item() == pytest.approx(expected, rel=1e-6)  # inputs in float32
    assert agree.tolist() == [[True]]  # a tie's argmax is the first token, as the reference's


def test_forced_scoring_gives_the_logits_the_tokens_were_sampled_from(baseline: VARPipeline) -> None:
    """Tokens generated in a batch of three, scored alone: every scale's guided logits are those of the
    generation (row-stable arithmetic), so a model against itself scores KL 0 and agreement 1 exactly."""
    seen: dict[int, torch.Tensor] = {}
    gen = baseline.generate([1, 4, 7], PARAMS, seeds=[5, 6, 7], on_guided_logits=seen.__setitem__)
    tokens = torch.cat(gen.tokens, dim=1)
    rollout = baseline.start([4], [PARAMS], seeds=[0])
    for si, t in enumerate(split_scales(tokens[1], baseline.steps)):
        assert torch.equal(baseline.forced_step(rollout, t), seen[si][1:2]), f"scale {si}"
    itself = score(baseline, baseline, 4, PARAMS, tokens[1])
    assert itself.kl == 0.0 and itself.top1_agreement == 1.0
    assert itself.positions == tokens.shape[1]


def test_a_token_sequence_of_the_wrong_length_is_refused(baseline: VARPipeline) -> None:
    tokens = tokens_of(baseline, [0], [1])[0]
    with pytest.raises(ValueError, match=f"{tokens.numel() - 1} tokens"):
        score(baseline, baseline, 0, PARAMS, tokens[:-1])


def test_each_pipeline_runs_its_own_passes(baseline: VARPipeline) -> None:
    """guidance-off differs from the baseline only where it stops guiding (the last scale): every earlier
    scale scores KL 0; the last one is far from it."""
    _, _, scored = mean_fidelity(load_variant("guidance-off"), baseline)
    for f in scored:
        assert all(s.kl == 0.0 for s in f.scales[:-1])
        assert f.scales[-1].kl > 0.05


def test_a_damaged_variant_scores_far_worse_than_litevar(baseline: VARPipeline) -> None:
    """The issue's target: the damaged variant's mean KL at least 10x litevar's, litevar's above the floor (0,
    a model against itself); agreement in the opposite order."""
    litevar_kl, litevar_agree, _ = mean_fidelity(load_variant("litevar-eager"), baseline)
    damaged_kl, damaged_agree, _ = mean_fidelity(perturbed_weights(load_variant("baseline")), baseline)
    assert litevar_kl > 0.0 and damaged_kl >= 10 * litevar_kl
    assert damaged_agree < litevar_agree < 1.0
