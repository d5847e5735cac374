"""Sharing plans of attention sharing across CFG: at which (layer, query scale) the unconditional rows reuse the
conditional rows' attention probabilities.

Distance of a (layer, scale), measured on the unmodified model by calibration (`calibrate_sharing`):

    distance = s / (K - 1) * ||(P_cond - P_uncond) V_uncond|| / ||P_uncond V_uncond||

the relative error of the unconditional rows' attention output when they use the conditional rows'
probabilities (Frobenius norms over every row, head and query of the calibration batches), times the
guidance ramp of the scale: guided logits are (1 + t) cond - t uncond with t = cfg * s / (K - 1), so an error
in the unconditional rows reaches the sampled distribution scaled by the ramp. Sharing one (layer, scale)
at a time on the demo model, with the baseline's tokens forced so that every scale sees the same inputs,
this distance ranks the resulting change of the guided token distributions (KL summed over every token of
that scale and the later ones) best of the measures tried: the ramp-weighted total variation and JS
divergence of the probability rows ignore the values the probabilities weight, and every measure without the
ramp ranks poorly, since the early scales, where guidance is weak, differ as much as the late ones (the rank
correlations are in docs/compression.md, "Sharing scope").

A (layer, scale) is shared when its distance is below the threshold: 0 shares nowhere, infinity everywhere
calibration measured (a scale it saw without guidance has distance infinity and is never shared).
Scale 0 (one key, so equal probabilities) has distance 0 and is shared at any positive threshold.

Default threshold 0.035, chosen on the demo model (the figures: docs/compression.md, "Sharing scope"): it
shares scales 0 and 1 of every layer and layer 0's scales 2 and 6, and its FID and KID stay within the
baseline's seed-to-seed spread in both feature spaces (its class accuracy nearly so), where the next
candidate, 0.075 (also layer 0's scales 3-5), and sharing everywhere go past it. Beyond 0.075 the
thresholds add the late scales of layers 1-3, where nearly all of the change to the output is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

SHARING_PLAN_FILE = "sharing_plan.safetensors"
METRIC = "ramp-weighted relative error of the unconditional attention output"


@dataclass(frozen=True)
class SharingSettings:
    threshold: float = 0.035  # share a (layer, scale) whose distance is below this (see the module docstring)
    batches: int = 4  # calibration batches of `batch_size` different classes each, as for window plans
    batch_size: int = 8
    seed: int = 0


def guidance_ramp(patch_nums: tuple[int, ...]) -> torch.Tensor:
    """Per scale, s / (K - 1): the guidance weight t over cfg (the pipeline's linear ramp)."""
    K = len(patch_nums)
    return torch.arange(K, dtype=torch.float64) / max(K - 1, 1)


@dataclass
class SharingPlan:
    patch_nums: tuple[int, ...]
    distances: torch.Tensor  # float64 (depth, scales); inf where calibration saw no guided rows
    settings: SharingSettings

    @property
    def depth(self) -> int:
        return self.distances.shape[0]

    @property
    def shared(self) -> torch.Tensor:
        """Bool (depth, scales): where the unconditional rows reuse the conditional rows' attention."""
        return self.distances < self.settings.threshold

    def scales(self, layer: int) -> frozenset[int]:
        """The query scales `layer` shares."""
        return frozenset(int(s) for s in self.shared[layer].nonzero().flatten())

    def with_threshold(self, threshold: float) -> SharingPlan:
        """The same measurements under another threshold."""
        return replace(self, settings=replace(self.settings, threshold=threshold))

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {
            "patch_nums": json.dumps(self.patch_nums),
            "settings": json.dumps(asdict(self.settings)),  # an infinite threshold is written as Infinity
            "metric": METRIC,
        }
        save_file({"distances": self.distances.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> SharingPlan:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            distances = f.get_tensor("distances")
        settings = SharingSettings(**json.loads(meta["settings"]))
        return cls(tuple(json.loads(meta["patch_nums"])), distances, settings)

    def check_fits(self, depth: int, patch_nums: tuple[int, ...]) -> None:
        """ValueError listing what differs when the plan was calibrated for another model shape."""
        differ = []
        if self.depth != depth:
            differ.append(f"depth {self.depth} (the model: {depth})")
        if self.patch_nums != tuple(patch_nums):
            differ.append(f"patch_nums {self.patch_nums} (the model: {tuple(patch_nums)})")
        if differ:
            raise ValueError(f"the sharing plan does not fit the model: {'; '.join(differ)}")


def shared_fraction(plan: SharingPlan) -> float:
    """Shared (layer, scale) pairs over all of them."""
    return float(plan.shared.double().mean())
