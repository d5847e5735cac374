"""The VAR transformer: embeddings, AdaLN blocks and head; one next-scale step per call.

Parameter and buffer names are the official ones (`models/var.py`), so `var_d*.pth` loads with strict=True.
The sampling loop lives in `pipeline.py`; this module only maps tokens to logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from app.model.blocks import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, flat_tokens, unflat_tokens
from app.model.config import VARConfig
from app.model.kv_cache import KVCache, ScaleStep
from app.model.row_stable import Linear


@dataclass
class Conditioning:
    """Everything that depends only on the class labels, computed once per generation."""

    cond_BD: torch.Tensor  # class embeddings, (rows, C)
    block_mods: list[torch.Tensor]  # per block (rows, 1, 6, C)
    head_mod: torch.Tensor  # (rows, 1, 2, C)

    def first_rows(self, n: int) -> Conditioning:
        return Conditioning(self.cond_BD[:n], [m[:n] for m in self.block_mods], self.head_mod[:n])


class VAR(nn.Module):
    lvl_1L: torch.Tensor
    attn_bias_for_masking: torch.Tensor

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        self.num_classes = cfg.num_classes
        self.first_l = cfg.patch_nums[0] ** 2
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)]).view(1, L)
        self.register_buffer("lvl_1L", lvl)
        d = lvl.view(1, L, 1)
        bias = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
        self.register_buffer("attn_bias_for_masking", bias.contiguous())
        self.word_embed = Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class for guidance
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.shared_ada_lin: nn.Module = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = Linear(C, cfg.vocab_size)

    @property
    def block_list(self) -> list[AdaLNSelfAttn]:
        return cast(list[AdaLNSelfAttn], list(self.blocks))

    # ---- conditioning and embeddings -------------------------------------------------------------
    def condition(self, labels: torch.Tensor) -> Conditioning:
        """Class labels (rows,) -> class embeddings and every AdaLN modulation."""
        cond_BD = self.class_emb(labels)
        shared = self.shared_ada_lin(cond_BD)
        mods = [block.modulation(shared) for block in self.block_list]
        return Conditioning(cond_BD, mods, self.head_nm.modulation(cond_BD))

    def level_pos(self) -> torch.Tensor:
        """(1, L, C): level embedding plus absolute position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_tokens(self, cond: Conditioning, lvl_pos: torch.Tensor) -> torch.Tensor:
        rows = cond.cond_BD.shape[0]
        sos = cond.cond_BD.unsqueeze(1).expand(rows, self.first_l, -1)
        return sos + self.pos_start.expand(rows, self.first_l, -1) + lvl_pos[:, : self.first_l]

    def embed_scale(self, next_BChw: torch.Tensor, step: ScaleStep, lvl_pos: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale `step` from the area-downsampled f_hat (B, Cvae, pn, pn) -> (B, pn^2, C)."""
        x_BlCv = next_BChw.flatten(2).transpose(1, 2)
        return self.word_embed(x_BlCv) + lvl_pos[:, step.begin : step.end]

    # ---- transformer ---------------------------------------------------------------------------------
    def logits(self, x_BLC: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.head(self.head_nm(x_BLC.float(), cond.head_mod).float()).float()

    def step(self, x_BlC: torch.Tensor, cond: Conditioning, cache: KVCache, step: ScaleStep) -> torch.Tensor:
        """One scale with the KV cache: input tokens (rows, l, C) -> logits (rows, l, V)."""
        for block, mod, layer_cache in zip(self.block_list, cond.block_mods, cache.layers, strict=True):
            x_BlC = block(x_BlC, mod, cache=layer_cache, step=step)
        return self.logits(x_BlC, cond)

    def step_groups(
        self, xs: list[torch.Tensor], conds: list[Conditioning], caches: list[KVCache], steps: list[ScaleStep]
    ) -> list[torch.Tensor]:
        """`step` of several groups of rows, each at its own scale with its own cache, the linear layers over
        all their tokens at once (`AdaLNSelfAttn.forward_groups`) -> logits per group."""
        for i, block in enumerate(self.block_list):
            mods = [c.block_mods[i] for c in conds]
            xs = block.forward_groups(xs, mods, [c.layers[i] for c in caches], steps)
        heads = [self.head_nm(x.float(), c.head_mod).float() for x, c in zip(xs, conds, strict=True)]
        return unflat_tokens(self.head(flat_tokens(heads)).float(), xs)

    def new_cache(self, rows: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        c = self.cfg
        return KVCache.allocate(c.depth, rows, c.num_heads, c.embed_dim // c.num_heads, c.patch_nums, device, dtype)

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) under the block-causal mask.

        Unlike the official `forward`, labels are never replaced by the null class at random here:
        classifier-free-guidance dropout is the trainer's business.
        """
        cond = self.condition(label_B)
        lvl_pos = self.level_pos()
        L = self.cfg.seq_len
        rest = self.word_embed(x_BLCv_wo_first_l.float()) + lvl_pos[:, self.first_l : L]
        x = torch.cat((self.first_tokens(cond, lvl_pos), rest), dim=1)
        bias = self.attn_bias_for_masking[:, :, :L, :L].to(x.dtype)
        for block, mod in zip(self.block_list, cond.block_mods, strict=True):
            x = block(x, mod, attn_bias=bias)
        return self.logits(x, cond)


@torch.no_grad()
def init_weights(var: VAR, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """The official initialisation: every block starts near the identity, logits near uniform."""
    C, depth = var.cfg.embed_dim, var.cfg.depth
    std = math.sqrt(1 / C / 3)
    for m in var.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    for p in (var.pos_start, var.pos_1LC):
        nn.init.trunc_normal_(p, std=std)
    var.head.weight.mul_(init_head)
    cast(nn.Linear, var.head_nm.ada_lin[-1]).weight.mul_(init_adaln)
    for block in var.block_list:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if not block.shared_aln:
            w = cast(nn.Linear, block.ada_lin[-1]).weight
            w[2 * C :].mul_(init_adaln)
            w[: 2 * C].mul_(init_adaln_gamma)
