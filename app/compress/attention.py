"""PlannedAttention: the attention kernel of windowed attention and of attention sharing across CFG.

Per query scale a layer takes one of three routes, all with true -inf semantics outside the kept pairs:
- dense: scaled_dot_product_attention over every key (the baseline, and every scale without windows);
- masked: dense scores with -inf outside the kept pairs: exact, but computes every pair (the reference, and
  the route where skipping does not pay: small scales on CPU, where any sparse kernel costs more than it saves);
- sparse: FlexAttention under torch.compile with a block mask, so key blocks without a kept pair are never
  computed (CPU and GPU); pairs inside computed blocks but outside the windows are masked.

With sharing at a scale, the unconditional rows [B, 2B) reuse the conditional rows' attention
probabilities (their own QK^T and softmax are skipped; their own values are still used), or, with
`share_outputs`, the conditional rows' whole attention output. Probabilities come from the explicit
(masked) route, so at a sparse scale sharing probabilities is skipped: the block-sparse kernel does less
work than sharing would save. Guidance-free scales (`step.guided` false) have no unconditional rows.
The teacher-forced path (no `step`) stays dense.

Each kernel counts what it runs (`PlannedAttention.ran`), so tests measure savings from the calls made
rather than from the accounting of `PlannedAttention.flops`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from app.model.blocks import DenseAttention
from app.model.kv_cache import ScaleStep

SPARSE_BLOCK = 32  # FlexAttention's block edge on both axes
ROUTES = ("dense", "masked", "sparse")


@functools.cache
def _compiled_flex():  # compiled once per process; each new shape compiles once (seconds on CPU)
    return torch.compile(flex_attention, dynamic=False)


@dataclass
class Route:
    """How one query scale attends: `bias` (heads, N, P), 0 on kept pairs and -inf elsewhere (None: dense);
    `blocks`, the block mask of the sparse route (None: not sparse)."""

    bias: torch.Tensor | None = None
    blocks: BlockMask | None = None
    computed_pairs: int | None = None  # (query, key) pairs computed for one row, all heads; None: every pair
    visited_pairs: int = 0  # sparse: pairs in the key blocks the kernel visits for one row, all heads

    def pairs(self, step: ScaleStep, heads: int) -> int:
        return heads * step.num_tokens * step.end if self.computed_pairs is None else self.computed_pairs


def block_mask(kept: torch.Tensor) -> BlockMask:
    heads, n, p = kept.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[h, q_idx, kv_idx]

    return create_block_mask(mask_mod, None, heads, n, p, device=kept.device, BLOCK_SIZE=SPARSE_BLOCK)


def route_for(kept: torch.Tensor, min_skipped: float) -> Route:
    """The route for a (heads, N, P) kept-pairs mask: sparse where at least `min_skipped` of the key blocks
    are skipped, else masked (or dense when everything is kept)."""
    if bool(kept.all()):
        return Route()
    bias = torch.zeros(kept.shape, device=kept.device).masked_fill_(~kept, float("-inf"))
    mask = block_mask(kept)
    computed = mask.to_dense()[0].bool()  # (heads, query blocks, key blocks) that the kernel computes
    if 1 - computed.float().mean().item() < min_skipped:
        return Route(bias=bias)
    q_sizes = _block_sizes(kept.shape[1])
    k_sizes = _block_sizes(kept.shape[2])
    pairs = int((computed * (q_sizes[:, None] * k_sizes[None, :]).to(computed.device)).sum())
    return Route(bias=bias, blocks=mask, computed_pairs=pairs, visited_pairs=block_mask_pairs(mask))


def block_mask_pairs(mask: BlockMask) -> int:
    """(query, key) pairs one row's FlexAttention call computes, all heads: for each (head, query block), the
    key blocks of its partial and full lists (the first `num_blocks` entries of each, what the kernel loops
    over), every block clipped to the sequence ends."""
    n, p = mask.seq_lengths
    q_sizes, k_sizes = _block_sizes(n), _block_sizes(p)
    total = 0
    for num, idx in ((mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)):
        if num is None or idx is None:
            continue
        num, idx = num[0].cpu(), idx[0].cpu().long()  # (heads, query blocks), (heads, query blocks, key blocks)
        listed = torch.arange(idx.shape[-1]) < num[..., None]
        total += int((k_sizes[idx] * listed * q_sizes[:, None]).sum())
    return total


def _block_sizes(n: int) -> torch.Tensor:
    sizes = torch.full((-(-n // SPARSE_BLOCK),), SPARSE_BLOCK)
    sizes[-1] = n - SPARSE_BLOCK * (len(sizes) - 1)
    return sizes


class Ran:
    """What a kernel ran at one query scale: calls per route, and the (query, key) pairs of those calls, over
    all rows and heads, whose score q.k was computed (`scores`) and whose probability weighted a value row
    (`weighted`)."""

    __slots__ = ("dense", "masked", "scores", "sparse", "weighted")

    def __init__(self) -> None:
        self.dense = self.masked = self.sparse = self.scores = self.weighted = 0


class PlannedAttention(DenseAttention):
    """The attention kernel of windowed attention and sharing across CFG (see the module docstring).

    `ran` counts what the kernel runs, per query scale: `ran[si]` is a `Ran`. Each call adds one call of its
    route and its pairs, taken from the operands where the multiplies run: the score tensor's size on the
    masked route, q's rows, heads and length times k's length on the dense route, the rows times the pairs
    its block mask lists (`block_mask_pairs`, counted once per mask) on the sparse route. Shared
    probabilities count as a call of the scale's route: scores of the conditional rows, weighted pairs of
    all rows. A few integer adds per call, no tensor work; nothing is counted on the teacher-forced path or
    while torch.compile traces the kernel (a compiled step counts nothing). `reset_counts` starts over."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[int, Route] = {}  # query scale -> route; absent: dense
        self.share_scales: frozenset[int] = frozenset()
        self.share_outputs = False
        self.ran: dict[int, Ran] = {}  # query scale -> what ran there

    def reset_counts(self) -> None:
        self.ran = {}

    def _count(self, si: int, route: str, scores: int, weighted: int) -> None:
        if torch.compiler.is_compiling():
            return
        ran = self.ran.get(si)
        if ran is None:
            ran = self.ran[si] = Ran()
        setattr(ran, route, getattr(ran, route) + 1)
        ran.scores += scores
        ran.weighted += weighted

    def shares(self, step: ScaleStep, rows: int) -> bool:
        if not (step.guided and step.si in self.share_scales and rows % 2 == 0):
            return False
        return self.share_outputs or self.routes.get(step.si, Route()).blocks is None

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
        if step is None:  # the teacher-forced path
            return super().forward(q, k, v, scale=scale, attn_bias=attn_bias, step=step)
        route = self.routes.get(step.si, Route())
        if not self.shares(step, q.shape[0]):
            return self._attend(q, k, v, route, scale, step.si)
        B = q.shape[0] // 2
        if self.share_outputs:
            return self._attend(q[:B], k[:B], v[:B], route, scale, step.si).repeat(2, 1, 1, 1)
        p = _probs(q[:B], k[:B], route, scale).unsqueeze(0)  # the conditional rows', for both halves
        v2 = v.unflatten(0, (2, B))
        self._count(step.si, "masked" if route.bias is not None else "dense", p.numel(), v2.shape[0] * p.numel())
        return (p @ v2).flatten(0, 1)

    def _attend(self, q, k, v, route: Route, scale: float, si: int) -> torch.Tensor:
        if route.blocks is not None:
            pairs = q.shape[0] * route.visited_pairs
            self._count(si, "sparse", pairs, pairs)
            return _compiled_flex()(q, k, v, block_mask=route.blocks, scale=scale)
        if route.bias is None:
            pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            self._count(si, "dense", pairs, pairs)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # masked: explicit, measured faster on CPU than SDPA with a mask (which drops to a slower kernel)
        p = _probs(q, k, route, scale)
        self._count(si, "masked", p.numel(), p.numel())
        return p @ v

    # ---- accounting ----------------------------------------------------------------------------------
    def flops(self, step: ScaleStep, rows: int, heads: int, head_dim: int) -> int:
        """FLOPs of QK^T and PV actually computed at this scale for `rows` rows (2 per multiply-add)."""
        per_row = 2 * self.routes.get(step.si, Route()).pairs(step, heads) * head_dim  # one of QK^T or PV
        if not self.shares(step, rows):
            return 2 * rows * per_row
        if self.share_outputs:
            return rows * per_row  # the conditional half only, QK^T and PV
        return (rows // 2 + rows) * per_row  # QK^T for the conditional half, PV for all rows


def _probs(q: torch.Tensor, k: torch.Tensor, route: Route, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale), -inf outside the route's kept pairs."""
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    if route.bias is not None:
        scores += route.bias.to(scores.dtype)
    return scores.softmax(-1)


def dense_flops(step: ScaleStep, rows: int, heads: int, head_dim: int) -> int:
    return 4 * rows * heads * step.num_tokens * step.end * head_dim
