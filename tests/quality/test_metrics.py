"""FID and k-NN precision/recall against cases whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

from app.quality.metrics import fid, precision_recall


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
