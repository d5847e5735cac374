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
        return self.split_heads(self.project_qkv(x_BLC), B, L)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The fused projection of tokens (..., C) -> (..., 3C); any leading shape (tokens of many rows)."""
        return self.mat_qkv(x, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))

    def split_heads(self, qkv: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
        step: ScaleStep | None = None,
    ) -> torch.Tensor:
        """Attention of q over k, v (and the cached keys and values before them) -> (B, L, C), before `proj`."""
        B, _, L, _ = q.shape
        if cache is not None:
            assert step is not None, "a cached call needs its scale step"
            k, v = cache.update(step, k, v)
        out = self.kernel(q, k, v, scale=self.scale, attn_bias=attn_bias, step=step)
        return out.transpose(1, 2).reshape(B, L, -1)

    def forward(
        self,
        x_BLC: torch.Tensor,
        *,
        attn_bias: torch.Tensor | None = None,
        cache: LayerKVCache | None = None,
        step: ScaleStep | None = None,
    ) -> torch.Tensor:
        q, k, v = self.qkv(x_BLC)
        return self.proj(self.attend(q, k, v, attn_bias=attn_bias, cache=cache, step=step))


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
        h = self._modulated(x, scale1, shift1)
        x = x + self.attn(h, attn_bias=attn_bias, cache=cache, step=step).mul_(gamma1)
        h = self._modulated(x, scale2, shift2)
        return x + self.ffn(h).mul(gamma2)

    def forward_groups(
        self, xs: list[torch.Tensor], mods: list[torch.Tensor], caches: list[LayerKVCache], steps: list[ScaleStep]
    ) -> list[torch.Tensor]:
        """`forward` of groups of rows, each at its own scale with its own cache: the linear layers run once
        over the tokens of every group together, attention per group. Each row computes what it would alone
        (the linears are row-stable), so this equals `forward` per group, bit for bit on CPU."""
        parts = [m.unbind(2) for m in mods]  # per group: gamma1, gamma2, scale1, scale2, shift1, shift2
        h = flat_tokens([self._modulated(x, p[2], p[4]) for x, p in zip(xs, parts, strict=True)])
        qkv = unflat_tokens(self.attn.project_qkv(h), xs)
        outs = []
        for x, g_qkv, cache, step in zip(xs, qkv, caches, steps, strict=True):
            q, k, v = self.attn.split_heads(g_qkv, x.shape[0], x.shape[1])
            outs.append(self.attn.attend(q, k, v, cache=cache, step=step))
        attn = unflat_tokens(self.attn.proj(flat_tokens(outs)), xs)
        xs = [x + a.mul_(p[0]) for x, a, p in zip(xs, attn, parts, strict=True)]
        h = flat_tokens([self._modulated(x, p[3], p[5]) for x, p in zip(xs, parts, strict=True)])
        ffn = unflat_tokens(self.ffn(h), xs)
        return [x + f.mul(p[1]) for x, f, p in zip(xs, ffn, parts, strict=True)]

    def _modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


def flat_tokens(groups: list[torch.Tensor]) -> torch.Tensor:
    """Groups (rows, l, C) -> the tokens of all of them, (sum rows * l, C)."""
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in groups])


def unflat_tokens(tokens: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat_tokens`'s inverse for tokens of any width: (T, N) -> per group (rows, l, N), views."""
    sizes = [g.shape[0] * g.shape[1] for g in like]
    return [t.view(g.shape[0], g.shape[1], -1) for t, g in zip(tokens.split(sizes), like, strict=True)]


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
