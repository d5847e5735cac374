"""Key/value cache for next-scale prediction, allocated once per generation.

Scale si's tokens occupy positions [begin, end) of the sequence. The cache holds the keys and values of
every scale but the last (nothing ever attends to the last scale's keys from a later scale), so it is
sized to the prefix L - pn_last^2. At the last scale each layer assembles its full key/value sequence
in one workspace shared by all layers (layers run one after the other).
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

    def first_rows(self, n: int) -> KVCache:
        """A view of the first n rows of every layer (the conditional half, once guidance stops). The layers
        keep sharing one workspace view: distinct views of one buffer would be aliased inputs to a compiled
        step, which Inductor's runtime size checks reject."""
        wk, wv = self.layers[0].workspace
        workspace = (wk[:n], wv[:n])
        return KVCache([LayerKVCache(c.k[:n], c.v[:n], workspace) for c in self.layers])

    def nbytes(self) -> int:
        first = self.layers[0]
        per_layer = first.k.nbytes + first.v.nbytes
        return per_layer * len(self.layers) + sum(t.nbytes for t in first.workspace)
