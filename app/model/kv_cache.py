"""Key/value cache for next-scale prediction: allocated once per generation, or leased from a pool.

Scale si's tokens occupy positions [begin, end) of the sequence. The cache holds the keys and values of
every scale but the last (nothing ever attends to the last scale's keys from a later scale), so it is
sized to the prefix L - pn_last^2. At the last scale each layer assembles its full key/value sequence
in one workspace shared by all layers (layers run one after the other).

`KVPool` serves scale-level batching: one preallocation for the most rows in flight, leased to rollouts in
contiguous row ranges (a rollout's cache is then a view, which every step function takes unchanged), shrunk
when rows leave a rollout and returned when its images are decoded. Rollouts of one pool run one after the
other, so they share one workspace too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScaleStep:
    """Where one scale sits in the token sequence."""

    si: int
    begin: int
    end: int
    is_last: bool
    guided: bool = True  # rows [B, 2B) hold the unconditional (guidance) branch

    @property
    def num_tokens(self) -> int:
        return self.end - self.begin


def scale_steps(patch_nums: tuple[int, ...]) -> list[ScaleStep]:
    steps, cur = [], 0
    for si, pn in enumerate(patch_nums):
        steps.append(ScaleStep(si, cur, cur + pn * pn, si == len(patch_nums) - 1))
        cur += pn * pn
    return steps


class LayerKVCache:
    """One layer's view of the cache: writes this scale's keys/values, returns all keys/values so far."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor]):
        self.k, self.v = k, v  # (rows, heads, prefix_len, head_dim)
        self.workspace = workspace  # (rows, heads, seq_len, head_dim) each, shared by all layers

    def update(self, step: ScaleStep, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, e = step.begin, step.end
        if not step.is_last:
            self.k[:, :, b:e].copy_(k_new)
            self.v[:, :, b:e].copy_(v_new)
            return self.k[:, :, :e], self.v[:, :, :e]
        wk, wv = self.workspace
        wk[:, :, :b].copy_(self.k[:, :, :b])
        wv[:, :, :b].copy_(self.v[:, :, :b])
        wk[:, :, b:e].copy_(k_new)
        wv[:, :, b:e].copy_(v_new)
        return wk[:, :, :e], wv[:, :, :e]


class KVCache:
    """Preallocated keys and values of every layer for `rows` sequences (2B with guidance)."""

    def __init__(self, layers: list[LayerKVCache]):
        self.layers = layers

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        rows: int,
        num_heads: int,
        head_dim: int,
        patch_nums: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
    ) -> KVCache:
        seq_len = sum(pn * pn for pn in patch_nums)
        prefix_len = seq_len - patch_nums[-1] ** 2
        shape = (rows, num_heads, prefix_len, head_dim)
        ws_shape = (rows, num_heads, seq_len, head_dim)
        workspace = (
            torch.empty(ws_shape, device=device, dtype=dtype),
            torch.empty(ws_shape, device=device, dtype=dtype),
        )
        return cls(
            [
                LayerKVCache(
                    torch.empty(shape, device=device, dtype=dtype),
                    torch.empty(shape, device=device, dtype=dtype),
                    workspace,
                )
                for _ in range(num_layers)
            ]
        )

    @property
    def rows(self) -> int:
        return self.layers[0].k.shape[0]

    def rows_range(self, start: int, n: int) -> KVCache:
        """A view of rows [start, start + n) of every layer, with the first n rows of the shared workspace."""
        wk, wv = self.layers[0].workspace
        workspace = (wk[:n], wv[:n])
        return KVCache([LayerKVCache(c.k[start : start + n], c.v[start : start + n], workspace) for c in self.layers])

    def keep_rows(self, keep: list[int]) -> KVCache:
        """Rows `keep` (in that order) moved to the front; returns the view of them. In place: the rows after
        them are then free."""
        idx = torch.tensor(keep, device=self.layers[0].k.device)
        for c in self.layers:
            for t in (c.k, c.v):
                t[: len(keep)].copy_(t.index_select(0, idx))
        return self.first_rows(len(keep))

    def first_rows(self, n: int) -> KVCache:
        """A view of the first n rows of every layer (the conditional half, once guidance stops). The layers
        keep sharing one workspace view: distinct views of one buffer would be aliased inputs to a compiled
        step, which Inductor's runtime size checks reject."""
        return self.rows_range(0, n)

    def nbytes(self) -> int:
        first = self.layers[0]
        per_layer = first.k.nbytes + first.v.nbytes
        return per_layer * len(self.layers) + sum(t.nbytes for t in first.workspace)


class KVPool:
    """A cache for `rows` sequences, leased in contiguous row ranges (first fit)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self._taken = [False] * cache.rows

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def free_rows(self) -> int:
        return self._taken.count(False)

    def largest_free(self) -> int:
        """The most rows one lease can take now."""
        best = run = 0
        for taken in self._taken:
            run = 0 if taken else run + 1
            best = max(best, run)
        return best

    def lease(self, rows: int) -> KVLease | None:
        """Rows [start, start + rows) of the first free run long enough; None when no run is."""
        run = 0
        for i, taken in enumerate(self._taken):
            run = 0 if taken else run + 1
            if run == rows:
                start = i - rows + 1
                self._taken[start : i + 1] = [True] * rows
                return KVLease(self, start, rows)
        return None

    def free(self, start: int, rows: int) -> None:
        assert all(self._taken[start : start + rows]), "freeing rows not leased"
        self._taken[start : start + rows] = [False] * rows

    def nbytes(self) -> int:
        return self.cache.nbytes()


class KVLease:
    """Rows [start, start + rows) of a pool, held by one rollout."""

    def __init__(self, pool: KVPool, start: int, rows: int):
        self.pool, self.start, self.rows = pool, start, rows

    @property
    def cache(self) -> KVCache:
        return self.pool.cache.rows_range(self.start, self.rows)

    def shrink(self, rows: int) -> None:
        """Keep the first `rows` rows; the rest return to the pool."""
        assert 0 <= rows <= self.rows
        self.pool.free(self.start + rows, self.rows - rows)
        self.rows = rows

    def release(self) -> None:
        self.shrink(0)
