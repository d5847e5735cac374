"""Batch-invariant CPU kernels: a row's result must not depend on how many rows share the call.

Linear: CPU BLAS (MKL) computes GEMMs with fewer than 12 rows with other kernels, in another summation order,
than larger ones (measured: M in {1,2,3,5,6,7,9,10,11} differ in the last bits from the same rows in a
bigger call). A request computed alone (2 rows with guidance) would then differ from the same request
inside a batch, enough to flip a sampled token now and then. Padding small calls to `MIN_ROWS` rows keeps
every call on the same kernel, so an image depends only on its own request. The cost is nil: such calls
are bound by reading the weights, not by arithmetic.

Convolutions (oneDNN) also pick algorithms by batch size; the few convolutions on the sampling path (phi,
the decoder) run one image at a time on CPU, which costs nothing measurable at these spatial sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16


def row_stable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows >= MIN_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, MIN_ROWS - rows))
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computed with `row_stable_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_stable_linear(x, self.weight, self.bias)


def per_sample(fn: Callable[[torch.Tensor], torch.Tensor], x_B: torch.Tensor) -> torch.Tensor:
    """fn applied to one batch item at a time on CPU (batch-invariant), to the whole batch elsewhere.

    Training (autograd on) takes the batched path: batch invariance is a promise of sampling, not of training.
    """
    if x_B.device.type != "cpu" or x_B.shape[0] == 1 or torch.is_grad_enabled():
        return fn(x_B)
    return torch.cat([fn(x_B[i : i + 1]) for i in range(x_B.shape[0])])
