"""Window plans of multi-diagonal windowed attention: which (query, key) pairs each head keeps.

For a query scale s and a key scale b (both past the dense prefix), head h of layer l keeps a band around the
scaled diagonal of the flattened token grids: query i of scale s and key j of scale b are a pair iff
|i * N_b / N_s - j| < w, with w = `windows[l, s, b, h]` in key-index units (the 1-D proportional mapping of
the LiteVAR code; because rows are flattened, w >= n_b reaches neighbouring rows). w = FULL keeps the whole
block, w = DROP none of it. Query scales below `dense_scales` attend densely, and every query keeps all keys
of the first `dense_scales` scales (the class token among them), so no row is ever left without keys.

Calibration (`calibrate`) runs the unmodified model on several different class batches, sums each head's
attention mass per key block (probabilities under `prob_floor` zeroed first) and the mass inside each
candidate band, over all batches, then picks per block: DROP when the block holds less than `drop_mass` of
the head's attention, else the narrowest candidate keeping `tau` of the block's mass, else FULL. Unlike the
authors' calibration, it does not mask while it measures: every decision sees the unmodified activations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from app.model.kv_cache import ScaleStep, scale_steps

FULL, DROP = -1, 0
PLAN_FILE = "window_plan.safetensors"


@dataclass(frozen=True)
class WindowSettings:
    tau: float = 0.95  # a band must keep this share of its block's attention mass
    prob_floor: float = 0.003  # probabilities below this are ignored when measuring mass
    drop_mass: float = 0.05  # a key block with less than this share of the head's mass is dropped
    dense_scales: int = 3  # query scales below this are dense; key scales below it are always kept
    shape: str = "band"  # "band": the authors' 1-D diagonal band; "square": 2-D window (our extension)
    batches: int = 4  # calibration batches of `batch_size` different classes each
    batch_size: int = 8
    seed: int = 0


def band(num_q: int, num_k: int, w: int) -> torch.Tensor:
    """Bool (num_q, num_k): the pairs a diagonal band of half-width w keeps between two flattened scales."""
    if w == FULL:
        return torch.ones(num_q, num_k, dtype=torch.bool)
    i = torch.arange(num_q, dtype=torch.float64)[:, None]
    j = torch.arange(num_k, dtype=torch.float64)[None, :]
    return (i * num_k / num_q - j).abs() < w


def square(pn_q: int, pn_k: int, w: int) -> torch.Tensor:
    """Bool (pn_q^2, pn_k^2): the 2-D extension. Query cell (r, c) maps to the key grid at its centre
    ((r + 0.5) * pn_k / pn_q - 0.5, likewise for c); keys within w cells along both axes are kept."""
    if w == FULL:
        return torch.ones(pn_q * pn_q, pn_k * pn_k, dtype=torch.bool)
    centre = (torch.arange(pn_q, dtype=torch.float64) + 0.5) * pn_k / pn_q - 0.5
    near = (centre[:, None] - torch.arange(pn_k, dtype=torch.float64)[None, :]).abs() < w  # (pn_q, pn_k)
    return (near[:, None, :, None] & near[None, :, None, :]).reshape(pn_q * pn_q, pn_k * pn_k)


def window(shape: str, pn_q: int, pn_k: int, w: int) -> torch.Tensor:
    return band(pn_q * pn_q, pn_k * pn_k, w) if shape == "band" else square(pn_q, pn_k, w)


def candidates(shape: str, pn: int) -> list[int]:
    """Window widths tried for a key scale of pn x pn tokens, narrowest first; a rule that works for any depth.

    band: small offsets, then multiples of the row width plus small offsets (2-D neighbourhoods under
    row-major flattening); square: every radius short of the whole grid."""
    if shape == "square":
        return list(range(1, pn))
    widths = {1, 2, 3} | {m * pn + o for m in range(1, pn) for o in (0, 1, 2)}
    return sorted(w for w in widths if w < pn * pn)


@dataclass
class WindowPlan:
    patch_nums: tuple[int, ...]
    windows: torch.Tensor  # int32 (depth, scales, scales, heads); FULL / DROP / half-width
    settings: WindowSettings

    @classmethod
    def full(cls, depth: int, heads: int, patch_nums: tuple[int, ...], settings: WindowSettings) -> WindowPlan:
        S = len(patch_nums)
        return cls(tuple(patch_nums), torch.full((depth, S, S, heads), FULL, dtype=torch.int32), settings)

    @property
    def depth(self) -> int:
        return self.windows.shape[0]

    @property
    def heads(self) -> int:
        return self.windows.shape[3]

    def windowed(self, s: int) -> bool:
        """Whether query scale s has windowed key blocks at all."""
        return s >= self.settings.dense_scales

    def kept(self, layer: int, step: ScaleStep) -> torch.Tensor:
        """Bool (heads, N_s, P_s): the key positions each query of scale `step` keeps in `layer`."""
        steps = scale_steps(self.patch_nums)
        H, n_q = self.heads, step.num_tokens
        if not self.windowed(step.si):
            return torch.ones(H, n_q, step.end, dtype=torch.bool)
        blocks = []
        for b in steps[: step.si + 1]:
            if b.si < self.settings.dense_scales:
                blocks.append(torch.ones(H, n_q, b.num_tokens, dtype=torch.bool))
                continue
            ws = self.windows[layer, step.si, b.si].tolist()
            pn_q, pn_k = self.patch_nums[step.si], self.patch_nums[b.si]
            blocks.append(torch.stack([window(self.settings.shape, pn_q, pn_k, w) for w in ws]))
        return torch.cat(blocks, dim=2)

    def kept_fraction(self) -> float:
        """Kept (query, key) pairs over all pairs, every layer, head and scale (the dense prefix included)."""
        kept = total = 0
        for layer in range(self.depth):
            for step in scale_steps(self.patch_nums):
                k = self.kept(layer, step)
                kept += int(k.sum())
                total += k.numel()
        return kept / total

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"patch_nums": json.dumps(self.patch_nums), "settings": json.dumps(asdict(self.settings))}
        save_file({"windows": self.windows.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> WindowPlan:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            windows = f.get_tensor("windows")
        return cls(tuple(json.loads(meta["patch_nums"])), windows, WindowSettings(**json.loads(meta["settings"])))

    def check_fits(self, depth: int, heads: int, patch_nums: tuple[int, ...]) -> None:
        if (self.depth, self.heads, self.patch_nums) != (depth, heads, tuple(patch_nums)):
            raise ValueError(
                f"window plan is for depth {self.depth}, {self.heads} heads, patch_nums {self.patch_nums}; "
                f"the model has depth {depth}, {heads} heads, patch_nums {tuple(patch_nums)}"
            )
