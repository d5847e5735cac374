"""How far a long task (a calibration run, a warm-up) has come, for the people waiting on it.

One thread does the work and advances a `Progress`; others read it: the service's GET /models and its
503 answers, a log line every few seconds (`heartbeat`), a progress bar on the command line (a listener).
Steps may differ in cost (a calibration step at the last scale computes 256 times the tokens of the first),
so each step carries a weight, and the estimate of the time left extrapolates the weight done, not the
count of steps.

Only the working thread writes; readers may see a step count one behind its weight, which no reader acts on.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

HEARTBEAT_S = 10.0  # a task that takes minutes says where it is at least this often


class Cancelled(Exception):
    """The task was asked to stop (the process is shutting down); raised in the working thread."""


class Progress:
    def __init__(self, task: str, clock: Callable[[], float] = time.monotonic):
        self.task = task  # what is being done, in words: "litevar: calibrating its window and sharing plans"
        self.clock = clock
        self.weights: list[float] = []  # relative cost of each step
        self.done = 0  # steps finished
        self.started = clock()
        self.ended: float | None = None
        self.listeners: list[Callable[[Progress], None]] = []  # called in the working thread at each step
        self._weight_done = 0.0
        self._cancelled = threading.Event()

    def begin(self, weights: Sequence[float]) -> None:
        """The steps to come, by relative cost; the clock starts now."""
        self.weights, self.done, self._weight_done = [float(w) for w in weights], 0, 0.0
        self.started, self.ended = self.clock(), None
        self._notify()

    def advance(self, to: int | None = None) -> None:
        """`to` steps are done (default: one more). Raises Cancelled once `cancel` was called, so that the
        working thread stops at its next step."""
        if self._cancelled.is_set():
            raise Cancelled(f"{self.task}: cancelled")
        self.done = min(self.done + 1 if to is None else to, self.steps)
        self._weight_done = sum(self.weights[: self.done])
        self._notify()

    def finish(self) -> None:
        self.advance(self.steps)
        self.ended = self.clock()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def steps(self) -> int:
        return len(self.weights)

    @property
    def fraction(self) -> float:
        total = sum(self.weights)
        return self._weight_done / total if total else 0.0

    @property
    def elapsed_s(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    @property
    def left_s(self) -> float | None:
        """Seconds until done, extrapolated from the weight done so far; None before any is done."""
        f = self.fraction
        return None if f <= 0 else self.elapsed_s * (1 - f) / f

    def summary(self) -> str:
        """e.g. "step 3/40, 12% done, 8 s elapsed, about 57 s left"."""
        step = min(self.done + 1, self.steps)
        left = self.left_s
        estimate = f"about {math.ceil(left)} s left" if left is not None else "no estimate yet"
        return f"step {step}/{self.steps}, {100 * self.fraction:.0f}% done, {self.elapsed_s:.0f} s elapsed, {estimate}"

    def as_dict(self) -> dict[str, Any]:
        """For JSON: `step` is the step in progress (1-based), `fraction` the share of the work done."""
        left = self.left_s
        return {
            "step": min(self.done + 1, self.steps),
            "steps": self.steps,
            "fraction": round(self.fraction, 3),
            "elapsed_s": round(self.elapsed_s, 1),
            "left_s": None if left is None else round(left, 1),
        }

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self)


@contextmanager
def heartbeat(progress: Progress, say: Callable[[str], None], every_s: float | None = None) -> Iterator[Progress]:
    """While inside: `say` where `progress` is, every `every_s` seconds (default HEARTBEAT_S), from a thread of
    its own, so that a step that takes minutes still gets its lines."""
    stop = threading.Event()
    interval = HEARTBEAT_S if every_s is None else every_s

    def beat() -> None:
        while not stop.wait(interval):
            say(f"{progress.task}: {progress.summary()}")

    thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
