"""Window plans of multi-diagonal windowed attention: which (query, key) pairs each head keeps.

For a query scale s and a key scale b (both past the dense prefix), head h of layer l keeps a band around the
scaled diagonal of the flattened token grids: query i of scale s and key j of scale b are a pair iff
|i * N_b / N_s - j| < w, with w = `windows[l, s, b, h]` in key-index units (the 1-D proportional mapping of
the LiteVAR code; because rows are flattened, w >= n_b reaches neighbouring rows). w = FULL keeps the whole
block, w = DROP none of it. Query scales below `dense_scales` attend densely, and every query keeps all keys
of the first `dense_scales` scales (the class token among them), so no row is ever left without keys.

A band plan (`band_plan`) is synthetic: every layer and head keeps the same band in a (query scale, key
scale) block, each block about the same share of its pairs, so that a stated share of all pairs of the
windowed query scales is kept (the LiteVAR paper's budget is 15%). It exercises the sparse route at a model
shape whose random weights would calibrate to a nearly dense plan; it says nothing about a trained model.

Calibration (`calibrate`) runs the unmodified model on several different class batches, sums each head's
attention mass per key block (probabilities under `prob_floor` zeroed first) and the mass inside each
candidate band, over all batches, then picks per block: DROP when the block holds less than `drop_mass` of
the head's attention, else the narrowest candidate keeping `tau` of the block's mass, else FULL. Unlike the
authors' calibration, it does not mask while it measures: every decision sees the unmodified activations.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
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


@functools.cache
def window_pairs(shape: str, pn_q: int, pn_k: int, w: int) -> int:
    """The pairs `window(shape, pn_q, pn_k, w)` keeps."""
    if shape == "band":
        return band_pairs(pn_q * pn_q, pn_k * pn_k, w)
    return int(square(pn_q, pn_k, w).sum())


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

    def kept_fraction(self, windowed_only: bool = False) -> float:
        """Kept (query, key) pairs over all pairs, every layer and head; every scale (the dense prefix included),
        or with `windowed_only` the windowed query scales alone (all their keys, the always-kept prefix too)."""
        kept = total = 0
        for step in scale_steps(self.patch_nums):
            if windowed_only and not self.windowed(step.si):
                continue
            total += self.depth * self.heads * step.num_tokens * step.end
            kept += sum(self._kept_pairs(layer, step) for layer in range(self.depth))
        return kept / total

    def _kept_pairs(self, layer: int, step: ScaleStep) -> int:
        """What `kept(layer, step).sum()` is, counted block by block (cached per window: far faster)."""
        if not self.windowed(step.si):
            return self.heads * step.num_tokens * step.end
        prefix = scale_steps(self.patch_nums)[self.settings.dense_scales].begin
        kept = self.heads * step.num_tokens * prefix
        pn_q = self.patch_nums[step.si]
        for b in range(self.settings.dense_scales, step.si + 1):
            ws = self.windows[layer, step.si, b].tolist()
            kept += sum(window_pairs(self.settings.shape, pn_q, self.patch_nums[b], w) for w in ws)
        return kept

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"patch_nums": json.dumps(self.patch_nums), "settings": json.dumps(asdict(self.settings))}
        save_file({"windows": self.windows.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> WindowPlan:
        """The plan saved at `path`; OSError when it cannot be read, ValueError when it holds no window plan."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                windows = f.get_tensor("windows")
            settings = WindowSettings(**json.loads(meta["settings"]))
            return cls(tuple(json.loads(meta["patch_nums"])), windows, settings)
        except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a window plan file ({type(e).__name__}: {e})") from e

    def check_fits(self, depth: int, heads: int, patch_nums: tuple[int, ...]) -> None:
        if (self.depth, self.heads, self.patch_nums) != (depth, heads, tuple(patch_nums)):
            raise ValueError(
                f"window plan is for depth {self.depth}, {self.heads} heads, patch_nums {self.patch_nums}; "
                f"the model has depth {depth}, {heads} heads, patch_nums {tuple(patch_nums)}"
            )


# ---- synthetic band plans ----------------------------------------------------------------------------
def band_pairs(num_q: int, num_k: int, w: int) -> int:
    """The pairs `band(num_q, num_k, w)` keeps, counted per query row without building the mask (the same
    float64 arithmetic, so the counts agree exactly): keys j with c - w < j < c + w, c = i * num_k / num_q."""
    if w == FULL:
        return num_q * num_k
    c = torch.arange(num_q, dtype=torch.float64) * num_k / num_q
    lo = (torch.floor(c - w) + 1).clamp_min(0)
    hi = (torch.ceil(c + w) - 1).clamp_max(num_k - 1)
    return int((hi - lo + 1).clamp_min(0).sum())


@dataclass(frozen=True)
class _BlockOptions:
    """The widths a band plan may give one (query scale, key scale) block, narrowest first, and their pairs."""

    s: int
    b: int
    widths: tuple[int, ...]  # DROP, the band candidates, FULL
    pairs: tuple[int, ...]

    def closest(self, share: float) -> int:
        """Index of the width whose kept share of the block is closest to `share` (the narrower on a tie)."""
        size = self.pairs[-1]
        return min(range(len(self.widths)), key=lambda i: abs(self.pairs[i] / size - share))


def _block_options(patch_nums: tuple[int, ...], dense_scales: int) -> list[_BlockOptions]:
    out = []
    for s in range(dense_scales, len(patch_nums)):
        for b in range(dense_scales, s + 1):
            n_q, n_k = patch_nums[s] ** 2, patch_nums[b] ** 2
            widths = (DROP, *candidates("band", patch_nums[b]), FULL)
            out.append(_BlockOptions(s, b, widths, tuple(band_pairs(n_q, n_k, w) for w in widths)))
    return out


def band_plan(
    depth: int, heads: int, patch_nums: tuple[int, ...], keep: float, settings: WindowSettings | None = None
) -> WindowPlan:
    """A synthetic band plan keeping about `keep` of the (query, key) pairs of the windowed query scales (the
    always-kept prefix keys included), the same in every layer and head.

    Every windowed block gets the band candidate whose kept share of the block is closest to one common
    share f (multi-diagonal: a band in every key scale, as calibrated plans have), f chosen so the total is
    closest to `keep`; then single blocks move one width narrower or wider while that brings the total
    closer (the block shares are discrete, coarsest on small scales)."""
    settings = replace(settings or WindowSettings(), shape="band")
    ds = settings.dense_scales
    if not 0 <= keep <= 1:
        raise ValueError(f"keep must be a share of the pairs in [0, 1], not {keep}")
    if len(patch_nums) <= ds:
        raise ValueError(f"no windowed scale: {len(patch_nums)} scales, the first {ds} of them dense")
    blocks = _block_options(tuple(patch_nums), ds)
    steps = scale_steps(tuple(patch_nums))[ds:]
    total = sum(st.num_tokens * st.end for st in steps)
    prefix = sum(st.num_tokens for st in steps) * steps[0].begin  # keys of the dense scales: always kept
    target = keep * total - prefix
    chosen = _closest_common_share(blocks, target)
    _refine(blocks, chosen, target)
    plan = WindowPlan.full(depth, heads, tuple(patch_nums), settings)
    for blk, i in zip(blocks, chosen, strict=True):
        plan.windows[:, blk.s, blk.b] = blk.widths[i]
    return plan


def _kept(blocks: list[_BlockOptions], chosen: list[int]) -> int:
    return sum(blk.pairs[i] for blk, i in zip(blocks, chosen, strict=True))


def _closest_common_share(blocks: list[_BlockOptions], target: float) -> list[int]:
    """Per block, the width closest to one common share f; of all f that some block can reach exactly, the
    one whose kept pairs come closest to `target`."""
    shares = sorted({p / blk.pairs[-1] for blk in blocks for p in blk.pairs})
    choices = ([blk.closest(f) for blk in blocks] for f in shares)
    return min(choices, key=lambda chosen: abs(_kept(blocks, chosen) - target))


def _refine(blocks: list[_BlockOptions], chosen: list[int], target: float) -> None:
    """Greedy: the one-step width change that brings the kept pairs closest to `target`, until none helps."""
    while True:
        kept = _kept(blocks, chosen)
        best, best_error = None, abs(kept - target)
        for n, (blk, i) in enumerate(zip(blocks, chosen, strict=True)):
            for j in (i - 1, i + 1):
                if 0 <= j < len(blk.widths):
                    e = abs(kept - blk.pairs[i] + blk.pairs[j] - target)
                    if e < best_error:
                        best, best_error = (n, j), e
        if best is None:
            return
        chosen[best[0]] = best[1]
