"""The batching policy: when waiting images start, and how they are stepped. Two implement it: `whole`
(whole_batching.py), where a batch runs every scale of its images before the next starts, and `scale`
(scale_batching.py), where requests join the running generations at the next scale boundary."""

from __future__ import annotations

from typing import Protocol

from app.serve.engine.core import EngineCore
from app.serve.engine.scale_batching import ScaleBatching
from app.serve.engine.watchdog import Unhealthy
from app.serve.engine.whole_batching import WholeBatching
from app.serve.engine.worker import Pipeline

POLICIES = ("whole", "scale")
# `auto` picks `scale` for a transformer at least this wide (the released d16..d36 are 1024..2304), where it
# measured better; at the demo model's width (256) `whole` did (docs/benchmarks.md, "Batching policies")
SCALE_FROM_EMBED_DIM = 1024


class BatchingPolicy(Protocol):
    async def run(self) -> None:
        """The scheduler: forever, take waiting rows, compute them, hand back what came out."""

    async def add_variant(self, name: str, pipeline: Pipeline) -> None:
        """Prepare for a variant added while serving; the engine admits its requests once this returns."""

    def close(self) -> None:
        """Release what the policy holds beyond the core (threads); the scheduler has stopped."""

    def health(self) -> Unhealthy | None:
        """Why the policy's own work is stuck, if it is (the core's watchdog is checked by the engine)."""

    def rows_in_flight(self, variant: str | None = None) -> int:
        """Images being computed (all variants when None)."""

    def generation_s(self) -> float:
        """The running estimate of one generation's seconds (for Retry-After)."""


def auto_policy(embed_dim: int) -> str:
    """The batching policy measured better for a transformer of this width (`SCALE_FROM_EMBED_DIM`)."""
    return "scale" if embed_dim >= SCALE_FROM_EMBED_DIM else "whole"


def make_policy(name: str, core: EngineCore, overlap_decode: bool) -> BatchingPolicy:
    if name == "scale":
        return ScaleBatching(core, overlap_decode)
    if name == "whole":
        return WholeBatching(core)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
