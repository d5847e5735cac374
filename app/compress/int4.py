"""4-bit weights where they pay: layers that run once per generation, where only their bytes matter.

The AdaLN linears (`ada_lin.1`, 6C x C per block, a third of a block's weights) map the class embedding to
the block's modulation once per generation, so their matmul time is nil and their storage is what counts.
Weights are symmetric int4 per group of 64 inputs (bfloat16 scales), two to a byte; the forward unpacks
them to float32. State dicts keep `weight` (packed uint8) and `bias`, plus `weight_scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from app.model.row_stable import row_stable_linear

GROUP = 64


def pack_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K/2) uint8 of two 4-bit codes (value + 8) and (N, K/group) bfloat16 scales."""
    N, K = weight.shape
    if K % group:
        raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group}")
    w = weight.detach().float().view(N, K // group, group)
    scale = (w.abs().amax(-1) / 7).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    codes = (torch.round(w / scale.float().unsqueeze(-1)).clamp_(-8, 7) + 8).to(torch.uint8).view(N, K)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).view(N, 2 * half).float().sub_(8)
    return (codes.view(N, scale.shape[1], -1) * scale.float().unsqueeze(-1)).view(N, 2 * half)


class Int4WeightLinear(nn.Module):
    """Linear with int4 weights (per group of 64 inputs), float32 bias and output; `forward(x, bias)`."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed, scale = pack_int4(weight)
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4WeightLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias
        return row_stable_linear(x.float(), unpack_int4(self.weight, self.weight_scale), b)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Loads a packed state dict (`weight`, `weight_scale`) or a float one (`weight`, packed here)."""
        w = state_dict.get(prefix + "weight")
        if w is not None and w.is_floating_point():
            state_dict = dict(state_dict)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = pack_int4(w)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


class Int4SharedAdaLin(Int4WeightLinear):
    """SharedAdaLin with int4 weights: output viewed as (B, 1, 6, C)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, bias).view(-1, 1, 6, self.out_features // 6)
