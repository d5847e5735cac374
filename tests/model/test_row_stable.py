"""The kernels behind batch invariance, at the shapes of the released models (d16: width 1024)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.model.row_stable import per_sample, row_stable_linear


@pytest.mark.parametrize("K, N", [(1024, 3072), (1024, 4096), (4096, 1024), (32, 1024), (1024, 6144)])
def test_a_row_alone_equals_the_same_row_in_any_batch(K: int, N: int) -> None:
    g = torch.Generator().manual_seed(K + N)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    for tokens in (1, 4, 9):
        x = torch.randn(16, tokens, K, generator=g)
        alone = [row_stable_linear(x[i : i + 1], w, b) for i in range(16)]
        for rows in (2, 4, 8, 16):
            together = row_stable_linear(x[:rows], w, b)
            for i in range(rows):
                assert torch.equal(together[i], alone[i][0]), (K, N, tokens, rows, i)


def test_padding_changes_nothing_but_the_summation_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(64, 32, generator=g), torch.randn(64, generator=g), torch.randn(3, 32, generator=g)
    torch.testing.assert_close(row_stable_linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert row_stable_linear(x, w, None).shape == (3, 64)


def test_per_sample_convolution_is_batch_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(6, 32, 16, 16, generator=g)
    with torch.inference_mode():  # as sampling runs
        together = per_sample(conv, x)
        for i in range(6):
            assert torch.equal(together[i], conv(x[i : i + 1])[0])


def test_per_sample_takes_the_batched_path_when_training() -> None:
    calls: list[int] = []
    x = torch.randn(4, 2, requires_grad=True)
    per_sample(lambda t: calls.append(t.shape[0]) or t * 2, x).sum().backward()
    assert calls == [4] and x.grad is not None
