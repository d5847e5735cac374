"""Requests, results, errors, and the batching policy: which queued images form the next batch.

No threads, no asyncio, no web: the policy is a pure function of the queue and the clock, so it is
tested without timing. A request of n images is n rows; rows of any class, seed, cfg, top-k, top-p and
more_smooth share a batch; only the variant splits batches. A request may be spread over batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

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


class Rejection(StrEnum):
    """Why a request was not served; the values are the `reason` label of `var_rejections_total`."""

    INVALID = "invalid"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"  # the body came too slowly (408)
    UNAUTHORIZED = "unauthorized"  # no valid API key (401)
    NOT_ACCEPTABLE = "not_acceptable"
    QUEUE_FULL = "queue_full"
    NOT_READY = "not_ready"  # starting, loading, or the load failed
    DRAINING = "draining"  # shutting down or stopped
    DEADLINE = "deadline"
    CLIENT_DISCONNECTED = "client_disconnected"
    FAILED = "failed"


class EngineError(Exception):
    """Base of the conditions a request can end in besides a result; each counts as its `rejection`."""

    rejection: Rejection


class QueueFull(EngineError):
    rejection = Rejection.QUEUE_FULL

    def __init__(self, queued: int, capacity: int, retry_after_s: int):
        super().__init__(f"queue full: {queued} images waiting, capacity {capacity}")
        self.retry_after_s = retry_after_s


class NotAccepting(EngineError):
    """The engine or service takes no request now: not ready (`Rejection.NOT_READY`) or draining
    (`Rejection.DRAINING`); `state` says which state in words, for the answer."""

    def __init__(self, rejection: Rejection, state: str, retry_after_s: int):
        super().__init__(f"not accepting requests: {state}")
        self.rejection = rejection
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    rejection = Rejection.DEADLINE

    def __init__(self, timeout_s: float, computed: bool, encoding: bool = False):
        what = "computed, not encoded in time" if encoding else "partly computed" if computed else "never computed"
        super().__init__(f"deadline of {timeout_s:g} s passed ({what})")
        self.computed = computed


class BatchFailed(EngineError):
    """The request's images could not be computed; `error_id` is in the log line with the cause."""

    rejection = Rejection.FAILED

    def __init__(self, error_id: str, what: str = "generation failed"):
        super().__init__(f"{what} (error id {error_id})")
        self.error_id = error_id


class NonFiniteOutput(BatchFailed):
    """An image of the request came out with NaN or infinite pixels: never encoded, never answered as 200."""

    def __init__(self, error_id: str):
        super().__init__(error_id, "generation produced non-finite output (NaN or infinite pixels)")


@dataclass(eq=False)
class Pending:
    """A queued request and the progress of its rows; owned by the engine's event loop."""

    request: GenerationRequest
    arrived: float  # monotonic seconds
    deadline: float
    next_row: int = 0  # rows [0, next_row) have been handed to a batch
    started: float | None = None
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


@dataclass(frozen=True)
class BatchRow:
    pending: Pending
    row: int  # index of the image within its request


@dataclass(frozen=True)
class Decision:
    """Either a batch to run now, or how long to wait before deciding again (None: until a request arrives)."""

    rows: list[BatchRow]
    wait_s: float | None = None


@dataclass
class BatchLimit:
    """The most rows the next batch may take: max_batch_size, except after running out of memory, when it is
    half the failed batch's size for the next `backoff_batches` batches that succeed; then it is restored."""

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


def queued_rows(queue: Iterable[Pending], variant: str | None = None) -> int:
    return sum(p.rows_waiting for p in queue if variant is None or p.variant == variant)


def next_batch(queue: list[Pending], now: float, max_batch_size: int, max_wait_s: float) -> Decision:
    """A variant is due when it has max_batch_size rows waiting or its oldest request has waited max_wait_s;
    of the due variants, the one with the oldest request goes first. Rows are taken in arrival order."""
    oldest: dict[str, float] = {}
    rows: dict[str, int] = {}
    for p in queue:
        if p.rows_waiting:
            oldest.setdefault(p.variant, p.arrived)
            rows[p.variant] = rows.get(p.variant, 0) + p.rows_waiting
    due = [v for v in oldest if rows[v] >= max_batch_size or now - oldest[v] >= max_wait_s]
    if not due:
        return Decision([], wait_until_due(queue, now, max_wait_s))
    variant = min(due, key=oldest.__getitem__)
    return Decision(take_rows(queue, variant, max_batch_size))


def wait_until_due(queue: Iterable[Pending], now: float, max_wait_s: float) -> float | None:
    """Seconds until the oldest waiting row has waited max_wait_s (negative: already); None: no row waits."""
    oldest = min((p.arrived for p in queue if p.rows_waiting), default=None)
    return None if oldest is None else oldest + max_wait_s - now


def row_inputs(rows: list[BatchRow]) -> tuple[list[int], list[SamplingParams], list[int]]:
    """The class labels, sampling parameters and seeds of `rows`, in their order: what a pipeline computes."""
    requests = [r.pending.request for r in rows]
    return (
        [q.class_label for q in requests],
        [q.params for q in requests],
        [q.seeds[r.row] for q, r in zip(requests, rows, strict=True)],
    )


def take_rows(queue: list[Pending], variant: str, max_batch_size: int) -> list[BatchRow]:
    taken: list[BatchRow] = []
    for p in queue:
        if p.variant != variant:
            continue
        n = min(p.rows_waiting, max_batch_size - len(taken))
        taken += [BatchRow(p, p.next_row + i) for i in range(n)]
        p.next_row += n
        if len(taken) == max_batch_size:
            break
    return taken
