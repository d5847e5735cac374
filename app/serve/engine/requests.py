"""What the engine is asked and what it answers: a request of n images (n rows), its result, and the progress
of an accepted request's rows. No threads, no asyncio, no web."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from app.model.sampling import SamplingParams
from app.model.timing import Stage


@dataclass(frozen=True)
class GenerationRequest:
    variant: str
    class_label: int
    seeds: tuple[int, ...]  # one per image
    params: SamplingParams
    timeout_s: float

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass
class GenerationResult:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1], on the CPU
    seeds: tuple[int, ...]
    variant: str
    queued_s: float  # from arrival to the start of its first batch
    stage_s: dict[Stage, float]  # the pipeline's stages, summed over the request's batches
    batch_sizes: list[int]
    timeout_s: float = math.inf  # the request's
    deadline: float = math.inf  # monotonic seconds: what finishes the answer (encoding) must be done by then


@dataclass(eq=False)
class Pending:
    """An accepted request and the progress of its rows. Rows are handed out in order: rows [0, next_row) have
    gone to a batch; only `take_rows`, `return_rows` and `close` move that cursor."""

    request: GenerationRequest
    arrived: float  # monotonic seconds
    deadline: float
    next_row: int = 0
    started: float | None = None  # monotonic seconds its first batch (step) started
    images: list[torch.Tensor | None] = field(default_factory=list)
    stage_s: dict[Stage, float] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = [None] * self.request.num_images

    @property
    def rows_waiting(self) -> int:
        return self.request.num_images - self.next_row

    @property
    def variant(self) -> str:
        return self.request.variant

    def take_rows(self, n: int) -> list[BatchRow]:
        """Up to n of its waiting rows, in order."""
        n = min(n, self.rows_waiting)
        self.next_row += n
        return [BatchRow(self, self.next_row - n + i) for i in range(n)]

    def return_rows(self, n: int) -> None:
        """Give back the last n rows taken (not computed): they wait again."""
        assert 0 <= n <= self.next_row, "only rows that were taken go back"
        self.next_row -= n

    def close(self) -> None:
        """No row of it waits any more (answered, failed or withdrawn)."""
        self.next_row = self.request.num_images


@dataclass(frozen=True)
class BatchRow:
    pending: Pending
    row: int  # index of the image within its request


def requests_of(rows: list[BatchRow]) -> list[Pending]:
    """The requests of `rows`, each once, in order of first appearance."""
    return list(dict.fromkeys(r.pending for r in rows))


def row_inputs(rows: list[BatchRow]) -> tuple[list[int], list[SamplingParams], list[int]]:
    """The class labels, sampling parameters and seeds of `rows`, in their order: what a pipeline computes."""
    requests = [r.pending.request for r in rows]
    return (
        [q.class_label for q in requests],
        [q.params for q in requests],
        [q.seeds[r.row] for q, r in zip(requests, rows, strict=True)],
    )
