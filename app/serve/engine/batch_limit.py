"""The most images the next batch may hold, lowered for a while after running out of memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchLimit:
    """max_batch_size, except after running out of memory, when it is half the failed batch's size for the next
    `backoff_batches` batches that succeed; then it is restored."""

    max_batch_size: int
    backoff_batches: int
    current: int = 0
    _left: int = 0  # successful batches until the limit is restored

    def __post_init__(self) -> None:
        self.current = self.max_batch_size

    def out_of_memory(self, size: int) -> None:
        self.current = max(1, min(self.current, size // 2))
        self._left = self.backoff_batches

    def batch_done(self) -> None:
        if self._left:
            self._left -= 1
            if not self._left:
                self.current = self.max_batch_size
