"""Where the time goes: named sections accumulated over a call (CUDA-synchronised when on a GPU), and the
stages every report of it (the service's answers and metrics, the benchmark) names."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum

import torch


class Stage(StrEnum):
    """The stages of a generation as reported by the pipeline, the service and the benchmark.

    The pipeline times TRANSFORMER per scale (sections `transformer.scale0`, ... from `scale_section`),
    SAMPLING, LATENT and DECODE; ENCODE (images to PNG / JPEG / WebP bytes) is timed by the service's API."""

    TRANSFORMER = "transformer"
    SAMPLING = "sampling"
    LATENT = "latent"
    DECODE = "decode"
    ENCODE = "encode"


PIPELINE_STAGES = (Stage.TRANSFORMER, Stage.SAMPLING, Stage.LATENT, Stage.DECODE)  # what the pipeline times


def scale_section(si: int) -> str:
    """The timer section of the transformer at scale `si`."""
    return f"{Stage.TRANSFORMER}.scale{si}"


class StageTimer:
    """Accumulates wall time per stage name; `enabled=False` makes every section free."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.enabled = enabled
        self.sync = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start

    def total(self, prefix: str) -> float:
        """Seconds summed over every section whose name starts with `prefix` (e.g. "transformer.")."""
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))

    def stage_seconds(self) -> dict[Stage, float]:
        """Seconds per pipeline stage, the transformer's summed over its scales; 0 for a stage not run."""
        out = {stage: self.seconds.get(stage, 0.0) for stage in PIPELINE_STAGES}
        out[Stage.TRANSFORMER] = self.total(f"{Stage.TRANSFORMER}.")
        return out


NULL_TIMER = StageTimer(enabled=False)
