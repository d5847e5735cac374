"""Transformer blocks of VAR: attention, FFN, AdaLN block and the AdaLN before the head.

Names follow the official `models/basic_var.py` so released checkpoints load unchanged. Attention math is
delegated to `attn.kernel`, a parameter-free module that compression passes may swap (windowed or
CFG-shared attention) without touching the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from app.model.kv_cache import LayerKVCache, ScaleStep
from app.model.row_stable import Linear, row_stable_linear


class QKVLinear(Linear):
    """The fused q|k|v projection; weight only, the (q_bias, 0, v_bias) bias is given per call."""

    def __init__(self, embed_dim: int):
        super().__init__(embed_dim, 3 * embed_dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return row_stable_linear(x, self.weight, bias)


class DenseAttention(nn.Module):
    """softmax(q k^T * scale + bias) v over all given keys: the baseline attention kernel."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        attn_bias: torch.Tensor | None,
        step: ScaleStep | None,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)


class SelfAttention(nn.Module):
    zero_k_bias: torch.Tensor

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            # the official cap is ln 100 computed in float32
            self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = QKVLinear(embed_dim)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = Linear(embed_dim, embed_dim)
        self.kernel: nn.Module = DenseAttention()

    def qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, L, head_dim); q and k L2-normalised and q scaled when attn_l2_norm."""
        B, L, _ = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.mat_qkv(x_BLC, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(
        self,
        x_BLC: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
        step: ScaleStep | None = None,
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC)
        if cache is not None:
            assert step is not None, "a cached call needs its scale step"
            k, v = cache.update(step, k, v)
        out = self.kernel(q, k, v, scale=self.scale, attn_bias=attn_bias, step=step)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SharedAdaLin(Linear):
    """One AdaLN projection for all blocks (`shared_aln=True`), output viewed as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """x + gamma1 * Attn(LN(x)(1+scale1)+shift1), then the same with the FFN; modulation from the class."""

    def __init__(
        self, embed_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, shared_aln: bool, attn_l2_norm: bool
    ):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(embed_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2. `cond` is the shared AdaLN output
        (B, 1, 6, C) with shared_aln, else the class embedding (B, C). Constant over scales, so computed once."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(
        self,
        x: torch.Tensor,
        mod_B16C: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
        step: ScaleStep | None = None,
    ) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn(h, attn_bias=attn_bias, cache=cache, step=step).mul_(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.ffn(h).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, embed_dim: int, norm_eps: float):
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(embed_dim, 2 * embed_dim))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1, 2, C): scale, shift (always from the raw class embedding)."""
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.C)

    def forward(self, x_BLC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = mod_B12C.unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
