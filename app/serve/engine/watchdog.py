"""The engine's watchdog: is a batch running far past its expected time, or has the scheduler died?

Bookkeeping only, with an injectable clock: the engine reports each batch's start and end and a dead
scheduler; GET /healthz and the engine's admission ask `check()`. A batch is stuck once it has run longer
than `floor_s` and WATCHDOG_FACTOR times the running mean of a batch's seconds (only the floor until a
first batch has ended), so a first batch that compiles or a larger batch than usual is not called stuck.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
WATCHDOG_FACTOR = 10


@dataclass(frozen=True)
class Unhealthy:
    """Why the process should be restarted; `reason` is a fixed word, `detail` says what was seen."""

    reason: str  # load_failed, batch_stuck, scheduler_dead
    detail: str
    status: str = "unhealthy"


@dataclass(frozen=True)
class Running:
    since: float  # the clock's seconds
    variant: str
    size: int


class Watchdog:
    def __init__(self, floor_s: float, clock: Callable[[], float] = time.monotonic):
        self.floor_s = floor_s
        self.clock = clock
        self.batch_s = 0.1  # running mean of a batch's seconds (exponential, weight 0.2 on the latest)
        self.batches = 0  # batches that ended with images
        self.running: Running | None = None
        self.scheduler_died: str | None = None  # why, once it has
        self._reported: str | None = None  # the reason last logged

    def batch_started(self, variant: str, size: int) -> None:
        self.running = Running(self.clock(), variant, size)

    def batch_ended(self, computed: bool) -> None:
        """The batch in progress ended; `computed`: with images (a failed batch says nothing of the time)."""
        if self.running is not None and computed:
            self.batch_s = 0.8 * self.batch_s + 0.2 * (self.clock() - self.running.since)
            self.batches += 1
        self.running = None

    def stuck_after_s(self) -> float:
        return max(WATCHDOG_FACTOR * self.batch_s if self.batches else 0.0, self.floor_s)

    def check(self) -> Unhealthy | None:
        """None while the engine can answer; else why it cannot. Logged once per change."""
        problem = None
        if self.scheduler_died is not None:
            problem = Unhealthy("scheduler_dead", f"the engine's scheduler stopped: {self.scheduler_died}")
        elif (running := self.running) is not None:
            seconds, limit = self.clock() - running.since, self.stuck_after_s()
            if seconds > limit:
                what = f"a batch of {running.size} {running.variant} image(s)"
                problem = Unhealthy("batch_stuck", f"{what} has run {seconds:.1f} s (limit {limit:.1f} s)")
        reason = problem.reason if problem else None
        if reason != self._reported:
            if problem:
                log.error("engine unhealthy: %s", problem.detail)
            else:
                log.info("engine healthy again")
            self._reported = reason
        return problem
