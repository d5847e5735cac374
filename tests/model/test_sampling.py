"""Sampling semantics of the official sampler, with per-row parameters."""

from __future__ import annotations

import math

import torch

from app.model.sampling import SharedGenerator, filter_top_k_top_p_, guide, sample_tokens
from app.model.vector_quantizer import phi_indices


def _filter(logits: list[list[float]], top_k: list[int], top_p: list[float]) -> torch.Tensor:
    x = torch.tensor(logits).unsqueeze(1)  # (B, 1, V)
    return filter_top_k_top_p_(x, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64))[:, 0]


def test_top_k_keeps_ties_at_the_threshold() -> None:
    out = _filter([[3.0, 2.0, 2.0, 1.0]], [2], [0.0])
    assert out.isfinite().tolist() == [[True, True, True, False]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    out = _filter([[math.log(p) for p in probs]], [0], [0.7])
    assert out.isfinite().tolist() == [[True, True, False, False]]


def test_top_p_always_keeps_the_best_token() -> None:
    out = _filter([[5.0, 0.0, 0.0, 0.0]], [0], [1e-6])
    assert out.isfinite().tolist() == [[True, False, False, False]]


def test_zero_top_k_and_top_p_filter_nothing() -> None:
    out = _filter([[1.0, 2.0, 3.0, 4.0]], [0], [0.0])
    assert bool(out.isfinite().all())


def test_rows_with_different_parameters_equal_each_row_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 50)
    top_k, top_p = [0, 5, 50, 1], [0.9, 0.0, 0.5, 0.3]
    together = filter_top_k_top_p_(logits.clone(), torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64))
    for i in range(4):
        alone = filter_top_k_top_p_(
            logits[i : i + 1].clone(),
            torch.tensor(top_k[i : i + 1]),
            torch.tensor(top_p[i : i + 1], dtype=torch.float64),
        )
        assert torch.equal(together[i], alone[0])


def test_shared_generator_sampling_equals_torch_multinomial() -> None:
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(3, 20, 100) * 3, dim=-1)
    ours = sample_tokens(probs, SharedGenerator(torch.Generator().manual_seed(42)))
    ref = torch.multinomial(probs.view(-1, 100), 1, replacement=True, generator=torch.Generator().manual_seed(42))
    assert torch.equal(ours, ref.view(3, 20))


def test_guidance_ramp_matches_the_official_scalar_formula() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 5, 10)
    ratio = 3 / 9
    out = guide(logits, [1.5, 4.0], ratio)
    for i, cfg in enumerate([1.5, 4.0]):
        t = cfg * ratio
        assert torch.equal(out[i], (1 + t) * logits[i] - t * logits[2 + i])


def test_phi_selection_uses_float64_ties_like_the_official_code() -> None:
    assert phi_indices(4, 10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_indices(1, 10) == [0] * 10
