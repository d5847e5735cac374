"""Where the time goes: named sections accumulated over a call (CUDA-synchronised when on a GPU)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
        """Seconds summed over every stage whose name starts with `prefix` (e.g. "transformer.")."""
        return sum(v for k, v in self.seconds.items() if k.startswith(prefix))


NULL_TIMER = StageTimer(enabled=False)
