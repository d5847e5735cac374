"""FID, KID and k-NN precision/recall against cases whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

from app.quality.metrics import Gaussian, fid, kid, mmd2_unbiased, precision_recall


def test_fid_is_zero_for_the_same_set_and_symmetric() -> None:
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randn(500, 8, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-9)


def test_fid_matches_the_gaussian_closed_form() -> None:
    """N(0, I) vs N(m, s^2 I) in d dims: |m|^2 + d (1 - s)^2."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 200_000
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g) * 2.0 + torch.tensor([1.0, 0.0, -1.0, 0.0])
    assert fid(a, b) == pytest.approx(2.0 + d * 1.0, rel=0.02)


def test_precision_recall_separate_fidelity_from_coverage() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(300, 2, generator=g) * 0.1 + c for c in (-5.0, 5.0)])  # two modes
    same = torch.cat([torch.randn(300, 2, generator=g) * 0.1 + c for c in (-5.0, 5.0)])
    one_mode = torch.randn(600, 2, generator=g) * 0.1 + 5.0
    far = torch.randn(600, 2, generator=g) * 0.1 + 50.0
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    p, r = precision_recall(real, one_mode)
    assert p > 0.9 and 0.4 < r < 0.6  # faithful, but covers half the data
    assert precision_recall(real, far) == (0.0, 0.0)


def test_gaussian_of_the_reference_gives_the_same_fid_as_the_pairwise_function() -> None:
    g = torch.Generator().manual_seed(0)
    reference, feats = torch.randn(400, 6, generator=g), torch.randn(300, 6, generator=g) * 1.2 + 0.4
    assert Gaussian.of(reference).fid(feats) == pytest.approx(fid(feats, reference), rel=1e-9)


def test_unbiased_mmd_leaves_out_each_samples_kernel_with_itself() -> None:
    """Against the definition written pair by pair: means over i != j within a set, over all (i, j) across."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(4, 3, generator=g).double() + 0.5

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a @ b / 3 + 1) ** 3)

    def within(s: torch.Tensor) -> float:
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if i != j]
        return sum(k(s[i], s[j]) for i, j in pairs) / len(pairs)

    across = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    assert mmd2_unbiased(x, y) == pytest.approx(within(x) + within(y) - 2 * across, rel=1e-12)


def test_kid_is_about_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same, same_se = kid(a, b, subsets=50, subset_size=200)
    assert same_se > 0
    assert abs(same) < 0.02  # unbiased: centred on 0, so it can be slightly negative
    small, small_se = kid(a, b + 0.3, subsets=50, subset_size=200)
    large, _ = kid(a, b + 1.0, subsets=50, subset_size=200)
    assert small > same + 5 * small_se and large > 5 * small


def test_kid_of_a_set_generated_class_by_class_is_about_zero_once_classes_are_weighted() -> None:
    """20 samples of each of 10 well-separated classes against independent draws from the same mixture: the
    plain within-set mean has too few same-class pairs and reads low; weighting class pairs equally does not."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 8, generator=g) * 1.5
    per_class = torch.arange(10).repeat_interleave(20)

    def draw(labels: torch.Tensor) -> torch.Tensor:
        return centres[labels] + torch.randn(len(labels), 8, generator=g)

    plain, grouped = [], []
    for _ in range(30):  # the set's own sampling noise dwarfs one run's bias: average runs
        x, y = draw(per_class), draw(torch.randint(0, 10, (3000,), generator=g))
        plain.append(kid(x, y, subsets=10)[0])
        grouped.append(kid(x, y, subsets=10, groups_a=per_class)[0])
    se = float(torch.tensor(grouped).std()) / 30**0.5
    assert abs(sum(grouped) / 30) < 3 * se
    assert sum(plain) / 30 < -5 * se


def test_kid_needs_two_subsets_for_its_standard_error() -> None:
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at least 2 subsets"):
        kid(x, x, subsets=1)
