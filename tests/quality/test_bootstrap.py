"""Bootstrap intervals of class accuracy and FID over the generated images."""

from __future__ import annotations

import functools

import pytest
import torch

from app.quality.bootstrap import bias_moved_interval, resample_indices
from app.quality.evaluation import Uncertainty, bootstrap_metrics
from app.quality.metrics import Gaussian

REFERENCE = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0))


def generated(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images' features (a shifted, wider Gaussian than the reference) and whether each was classified right
    (80% are)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 0.8).double(), torch.randn(n, 8, generator=g) * 1.1 + 0.2


@functools.cache  # each size's intervals serve several tests
def intervals(n: int) -> tuple[float, float, dict[str, list[float] | None]]:
    correct, feats = generated(n, seed=n)
    reference = Gaussian.of(REFERENCE)
    fid = reference.fid(feats)
    return float(correct.mean()), fid, bootstrap_metrics(correct, feats, reference, fid, Uncertainty(resamples=200))


@pytest.mark.parametrize("n", [200, 2000])
def test_intervals_contain_the_figure_on_all_images(n: int) -> None:
    accuracy, fid, ci = intervals(n)
    assert ci["class_accuracy_ci"] is not None and ci["fid_ci"] is not None
    low, high = ci["class_accuracy_ci"]
    assert low < accuracy < high
    low, high = ci["fid_ci"]
    assert low < fid < high


def test_intervals_narrow_with_more_images() -> None:
    """About as 1 / sqrt(n): ten times the images, about a third of the width."""
    _, _, few = intervals(200)
    _, _, many = intervals(2000)
    for key in ("class_accuracy_ci", "fid_ci"):
        width_few, width_many = (ci[key][1] - ci[key][0] for ci in (few, many))  # type: ignore[index]
        assert 0.15 * width_few < width_many < 0.6 * width_few


def test_resampled_fid_is_biased_up_and_the_interval_moves_back() -> None:
    """In tens of dimensions, as feature spaces have, repeated images raise a resample's FID above the figure by
    more than the spread: the plain percentile interval lies wholly above it."""
    g = torch.Generator().manual_seed(1)
    reference = Gaussian.of(torch.randn(5000, 64, generator=g))
    feats = torch.randn(1000, 64, generator=g) * 1.05 + 0.05
    fid = reference.fid(feats)
    values = torch.tensor([reference.fid(feats[r]) for r in resample_indices(1000, 50)])
    assert torch.quantile(values, 0.025) > fid
    low, high = bias_moved_interval(values, fid)
    assert low < fid < high and high - low == pytest.approx(float(values.quantile(0.975) - values.quantile(0.025)))


def test_no_resamples_no_intervals() -> None:
    correct, feats = generated(50, seed=2)
    reference = Gaussian.of(REFERENCE)
    ci = bootstrap_metrics(correct, feats, reference, reference.fid(feats), Uncertainty(resamples=0))
    assert ci == {"class_accuracy_ci": None, "fid_ci": None}
