"""PlannedAttention: the attention kernel of windowed attention and of attention sharing across CFG.

Per query scale a layer takes one of three routes, all with true -inf semantics outside the kept pairs:
- dense: scaled_dot_product_attention over every key (the baseline, and every scale without windows);
- masked: dense scores with -inf outside the kept pairs: exact, but computes every pair (the reference, and
  the route where skipping does not pay: small scales on CPU, where any sparse kernel costs more than it saves);
- sparse: only part of the pairs is computed, pairs computed but outside the windows are masked. On CPU,
  key tiles (`KeyTiles`): queries are cut into tiles of about 32 rows, each tile gathers the keys any of its
  queries keeps and attends to them as one small dense problem (matmul, softmax, matmul), one row and group
  of heads at a time so that the gathered keys stay in cache. On GPU, FlexAttention under torch.compile with
  a 32x32 block mask, so key blocks without a kept pair are never computed. FlexAttention also runs on CPU
  (`sparse_kernel="flex"`), but there its 32x32 blocks cover a band poorly: with a d16 band plan keeping 15%
  of the pairs it computes 51% of scale 9's pairs where key tiles compute 25%, and 63% of scale 8's blocks.

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

SPARSE_BLOCK = 32  # FlexAttention's block edge on both axes; the key tiles' target query rows
TILE_CHUNK = 1 << 22  # gathered key elements per chunk, rows over it split by heads (16 MiB of float32)
ROUTES = ("dense", "masked", "sparse")


@functools.cache
def _compiled_flex():  # compiled once per process; each new shape compiles once (seconds on CPU)
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True, eq=False)
class KeyTiles:
    """The CPU sparse kernel's layout for one (heads, N, P) kept-pairs mask: the N queries cut into `tiles`
    tiles of `size` rows (the last tile padded with copies of the last query); per (head, tile) the `keys`
    that any query of the tile keeps, padded to a common `width` with keys no query keeps, and the `bias`,
    0 on the pairs each query keeps and -inf elsewhere."""

    size: int
    keys: torch.Tensor  # int64 (heads, tiles, width)
    bias: torch.Tensor  # float32 (heads, tiles, size, width)

    @property
    def pairs(self) -> int:
        """(query, key) pairs computed for one row, all heads (padding included: the multiplies run on it)."""
        return self.bias.numel()


def key_tiles(kept: torch.Tensor, target_size: int = SPARSE_BLOCK) -> KeyTiles:
    """Tiles of about `target_size` queries, balanced so that the last one is not mostly padding."""
    heads, n, p = kept.shape
    tiles = -(-n // target_size)
    size = -(-n // tiles)
    padded = torch.cat([kept, kept[:, -1:].expand(heads, tiles * size - n, p)], dim=1).view(heads, tiles, size, p)
    union = padded.any(2)  # (heads, tiles, P)
    width = int(union.sum(-1).max())
    # kept keys first, in key order (a stable sort of "not kept"); then keys no query of the tile keeps
    keys = torch.sort((~union).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    kept_in_tile = padded.gather(3, keys[:, :, None, :].expand(heads, tiles, size, width))
    bias = torch.zeros(kept_in_tile.shape, device=kept.device).masked_fill_(~kept_in_tile, float("-inf"))
    return KeyTiles(size, keys, bias)


@dataclass
class Route:
    """How one query scale attends: `bias` (heads, N, P), 0 on kept pairs and -inf elsewhere (None: dense, or
    sparse, which carries its own mask); `blocks`, the sparse kernel's layout (None: not sparse): key tiles on
    CPU, a FlexAttention block mask on GPU."""

    bias: torch.Tensor | None = None
    blocks: BlockMask | KeyTiles | None = None
    computed_pairs: int | None = None  # (query, key) pairs computed for one row, all heads; None: every pair
    visited_pairs: int = 0  # sparse: pairs in the key blocks the kernel visits for one row, all heads

    def pairs(self, step: ScaleStep, heads: int) -> int:
        return heads * step.num_tokens * step.end if self.computed_pairs is None else self.computed_pairs


def block_mask(kept: torch.Tensor) -> BlockMask:
    heads, n, p = kept.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return kept[h, q_idx, kv_idx]

    return create_block_mask(mask_mod, None, heads, n, p, device=kept.device, BLOCK_SIZE=SPARSE_BLOCK)


SPARSE_KERNELS = ("tiles", "flex")


def route_for(kept: torch.Tensor, min_skipped: float, sparse_kernel: str | None = None) -> Route:
    """The route for a (heads, N, P) kept-pairs mask: sparse where the sparse kernel skips at least
    `min_skipped` of the pairs (FlexAttention: of the key blocks), else masked (or dense when everything is
    kept). The sparse kernel, unless named: key tiles on CPU, FlexAttention on GPU."""
    if bool(kept.all()):
        return Route()
    if sparse_kernel is None:
        sparse_kernel = "tiles" if kept.device.type == "cpu" else "flex"
    if sparse_kernel not in SPARSE_KERNELS:
        raise ValueError(f"unknown sparse kernel {sparse_kernel!r}; known: {', '.join(SPARSE_KERNELS)}")
    sparse = _tiled_route(kept, min_skipped) if sparse_kernel == "tiles" else _flex_route(kept, min_skipped)
    if sparse is not None:
        return sparse
    return Route(bias=torch.zeros(kept.shape, device=kept.device).masked_fill_(~kept, float("-inf")))


def _tiled_route(kept: torch.Tensor, min_skipped: float) -> Route | None:
    tiles = key_tiles(kept)
    if 1 - tiles.pairs / kept.numel() < min_skipped:
        return None
    return Route(blocks=tiles, computed_pairs=tiles.pairs, visited_pairs=tiles.pairs)


def _flex_route(kept: torch.Tensor, min_skipped: float) -> Route | None:
    mask = block_mask(kept)
    computed = mask.to_dense()[0].bool()  # (heads, query blocks, key blocks) that the kernel computes
    if 1 - computed.float().mean().item() < min_skipped:
        return None
    q_sizes = _block_sizes(kept.shape[1])
    k_sizes = _block_sizes(kept.shape[2])
    pairs = int((computed * (q_sizes[:, None] * k_sizes[None, :]).to(computed.device)).sum())
    return Route(blocks=mask, computed_pairs=pairs, visited_pairs=block_mask_pairs(mask))


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
    of its key tiles (`KeyTiles.pairs`) or of the blocks its block mask lists (`block_mask_pairs`), each
    counted once per route, on the sparse route. Shared
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
        pairs = B * q.shape[1] * q.shape[2] * k.shape[2]  # the conditional rows' scores, weighting both halves
        self._count(step.si, "masked" if route.bias is not None else "dense", pairs, 2 * pairs)
        return explicit_attention(q, k, v, route.bias, scale, shared=True)

    def _attend(self, q, k, v, route: Route, scale: float, si: int) -> torch.Tensor:
        if route.blocks is not None:
            pairs = q.shape[0] * route.visited_pairs
            self._count(si, "sparse", pairs, pairs)
            if isinstance(route.blocks, KeyTiles):
                return tiled_attention(q, k, v, route.blocks, scale)
            return _compiled_flex()(q, k, v, block_mask=route.blocks, scale=scale)
        if route.bias is None:
            pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
            self._count(si, "dense", pairs, pairs)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        self._count(si, "masked", pairs, pairs)
        return explicit_attention(q, k, v, route.bias, scale, shared=False)

    # ---- accounting ----------------------------------------------------------------------------------
    def flops(self, step: ScaleStep, rows: int, heads: int, head_dim: int) -> int:
        """FLOPs of QK^T and PV actually computed at this scale for `rows` rows (2 per multiply-add)."""
        per_row = 2 * self.routes.get(step.si, Route()).pairs(step, heads) * head_dim  # one of QK^T or PV
        if not self.shares(step, rows):
            return 2 * rows * per_row
        if self.share_outputs:
            return rows * per_row  # the conditional half only, QK^T and PV
        return (rows // 2 + rows) * per_row  # QK^T for the conditional half, PV for all rows


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: KeyTiles, scale: float) -> torch.Tensor:
    """Attention over the pairs the key tiles keep: per (row, head, tile) softmax(q k^T * scale + bias) v over
    the tile's gathered keys.

    Eager, it goes one row at a time (and one group of heads, where a row gathers over `TILE_CHUNK` key
    elements): one gather of many rows' keys leaves the cache before the matmuls read it (chunks of rows were
    slower than single rows: docs/benchmarks.md, "Attention, row by row"), and buffers over glibc's mmap
    threshold (32 MiB at most) are fresh pages, faulted in at every call. Compiled, all rows at once, so
    that the graph does not depend on the batch size."""
    rows, heads, n, dim = q.shape
    num_tiles, width = tiles.keys.shape[1:]
    padded = tiles.size * num_tiles
    if padded > n:  # the padding rows' outputs are computed and dropped
        q = torch.cat([q, q[:, :, -1:].expand(rows, heads, padded - n, dim)], dim=2)
    q = q.unflatten(2, (num_tiles, tiles.size))
    k_flat, k_index = _gather_source(k, tiles.keys)
    v_flat, v_index = _gather_source(v, tiles.keys)

    def attend(rs: slice, hs: slice) -> torch.Tensor:
        index = k_index[rs, hs]
        shape = (*index.shape[:2], num_tiles, width, dim)
        # one gather along dim 0 of a 2-D view: along dim 1 of a 3-D strided view index_select copies its input
        kg = k_flat.index_select(0, index.flatten()).view(shape)
        vg = v_flat.index_select(0, v_index[rs, hs].flatten()).view(shape)
        scores = (q[rs, hs] @ kg.transpose(-1, -2)).mul_(scale).add_(tiles.bias[hs])
        return scores.softmax(-1) @ vg

    if torch.compiler.is_compiling():
        return attend(slice(None), slice(None)).flatten(2, 3)[:, :, :n]
    out = q.new_empty(rows, heads, num_tiles, tiles.size, dim)
    groups = -(-heads * num_tiles * width * dim // TILE_CHUNK)  # of heads, where one row is over the budget
    head_chunk = -(-heads // groups)
    for r in range(rows):
        for h in range(0, heads, head_chunk):
            rs, hs = slice(r, r + 1), slice(h, h + head_chunk)
            out[rs, hs] = attend(rs, hs)
    return out.flatten(2, 3)[:, :, :n]


def _gather_source(t: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, heads, P, dim) as a (positions, dim) view, and the positions in it of every row's `keys` (heads,
    tiles, width), (rows, heads, tiles * width). A slice of the KV cache stays a view: row r's head h's key j
    is position r * per_row + h * per_head + j, its strides in units of a key."""
    rows, heads, p, dim = t.shape
    if t.stride(3) != 1 or t.stride(2) < dim or t.stride(1) % t.stride(2) or t.stride(0) % t.stride(2):
        t = t.contiguous()
    per_head, per_row = t.stride(1) // t.stride(2), t.stride(0) // t.stride(2)
    flat = t.as_strided(((rows - 1) * per_row + (heads - 1) * per_head + p, dim), (t.stride(2), 1))
    offsets = (torch.arange(rows, device=t.device) * per_row)[:, None] + torch.arange(heads, device=t.device) * per_head
    return flat, (keys.flatten(1) + offsets[..., None])


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, *, shared: bool
) -> torch.Tensor:
    """The explicit routes, probabilities formed in full: masked (`_masked`) or shared (`_shared`).

    Under torch.compile they run as one opaque operator (`var::explicit_attention`) whose body is the eager
    code, row by row: traced, the row loop would be replaced by one call over all rows, whose score tensors
    (89 MB at d16's last scale, batch 8) leave the cache between the matmuls and the softmax. That took 1.5-2x
    the eager time at d16's two largest scales (docs/benchmarks.md, "Explicit attention opaque to the
    compiler"). The arithmetic is the eager code's, so compiled and eager agree here bit for bit."""
    run = _explicit_attention_op if torch.compiler.is_compiling() else _explicit
    return run(q, k, v, bias, scale, shared)


def _explicit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, shared: bool
) -> torch.Tensor:
    return _shared(q, k, v, bias, scale) if shared else _masked(q, k, v, bias, scale)


_explicit_attention_op = torch.library.custom_op("var::explicit_attention", _explicit, mutates_args=())


@_explicit_attention_op.register_fake
def _explicit_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float, shared: bool
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The masked route: explicit, measured faster on CPU than SDPA with a mask (which drops to a slower
    kernel). Score tensors over `TILE_CHUNK` elements go one row at a time (as the key tiles: cache, page
    faults; docs/benchmarks.md, "Attention, row by row")."""
    rows, heads, n, _ = q.shape
    if rows == 1 or rows * heads * n * k.shape[2] <= TILE_CHUNK:
        return _probs(q, k, bias, scale) @ v
    out = q.new_empty(rows, heads, n, v.shape[-1])
    for r in range(rows):
        torch.matmul(_probs(q[r], k[r], bias, scale), v[r], out=out[r])
    return out


def _shared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Shared probabilities: conditional row r's probabilities weight the values of rows r and B + r. They are
    never expanded to both halves (a broadcast matmul copies them), and, as on the masked route, score tensors
    over `TILE_CHUNK` elements go one conditional row at a time. Faster than a broadcast and than SDPA over the
    conditional queries and keys repeated for both halves (docs/benchmarks.md, "Attention, row by row"): its
    flash kernel needs values as wide as the keys, so the two halves' values cannot ride one call."""
    B, heads, n = q.shape[0] // 2, q.shape[1], q.shape[2]
    if B * heads * n * k.shape[2] <= TILE_CHUNK:
        p = _probs(q[:B], k[:B], bias, scale)
        return torch.cat((p @ v[:B], p @ v[B:]))
    out = q.new_empty(2 * B, heads, n, v.shape[-1])
    for r in range(B):
        p = _probs(q[r], k[r], bias, scale)
        torch.matmul(p, v[r], out=out[r])
        torch.matmul(p, v[B + r], out=out[B + r])
    return out


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale), -inf where `bias` (0 on the kept pairs) says so."""
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        scores += bias.to(scores.dtype)
    return scores.softmax(-1)


def dense_flops(step: ScaleStep, rows: int, heads: int, head_dim: int) -> int:
    return 4 * rows * heads * step.num_tokens * step.end * head_dim
