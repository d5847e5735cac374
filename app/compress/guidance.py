"""Guidance switched off for the last scales: one forward pass instead of two where it matters least."""

from __future__ import annotations

from dataclasses import dataclass

from app.model.pipeline import VARPipeline


@dataclass(frozen=True)
class GuidanceOff:
    """Options of `guidance_off_last`."""

    scales: int = 2  # how many of the last scales run unguided


def guidance_off_last(pipe: VARPipeline, *, scales: int = 2) -> VARPipeline:
    """The last `scales` scales run the conditional rows alone and sample from their logits unguided.

    Those scales hold most of the tokens (at 256 px the last two are 425 of 680), so this nearly halves
    their transformer work; the class is settled by then, the cost is in detail (measured, not assumed)."""
    n = len(pipe.config.var.patch_nums)
    if not 0 <= scales < n:
        raise ValueError(f"scales must be in [0, {n - 1}] (the first scale always runs guided), got {scales}")
    pipe.guided_scales = n - scales
    return pipe
