"""Where each configured variant is on its way to serving, and what a request for it gets meanwhile.

Variants start one at a time while the others serve (app/serve/startup.py), each along

    LOADING -> [CALIBRATING -> LOADING] -> [WARMING] -> READY
    any state but READY -> FAILED          (it failed to load, calibrate, compile or warm up)

LOADING covers waiting its turn and applying its passes; CALIBRATING and WARMING carry a `Progress`. The
engine admits requests for a READY variant only; for the others it answers with `refusal`, which names what
the variant waits for. Written on the event loop (progress: by the thread doing the work), read anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.model.progress import Progress
from app.serve.engine.errors import VariantNotReady
from app.serve.engine.lifecycle import FAILED_RETRY_AFTER_S, VARIANT_RETRY_AFTER_MAX_S, VARIANT_RETRY_AFTER_MIN_S


class VariantState(StrEnum):
    LOADING = "loading"
    CALIBRATING = "calibrating"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


NEXT: dict[VariantState, set[VariantState]] = {
    VariantState.LOADING: {VariantState.CALIBRATING, VariantState.WARMING, VariantState.READY, VariantState.FAILED},
    VariantState.CALIBRATING: {VariantState.LOADING, VariantState.FAILED},
    VariantState.WARMING: {VariantState.READY, VariantState.FAILED},
    VariantState.READY: set(),
    VariantState.FAILED: set(),
}


@dataclass
class VariantStatus:
    name: str
    state: VariantState = VariantState.LOADING
    doing: str = "waiting for the checkpoint to be read"  # what it is doing or waiting for, in words
    progress: Progress | None = None  # while calibrating or warming up
    error: str | None = None  # why it failed

    def move(self, state: VariantState, doing: str, progress: Progress | None = None) -> None:
        """Take a step of the diagram above (or stay, saying what it does now); any other is a bug."""
        if state is not self.state and state not in NEXT[self.state]:
            raise RuntimeError(f"variant {self.name} cannot go from {self.state} to {state}")
        self.state, self.doing, self.progress = state, doing, progress

    def fail(self, error: str) -> None:
        self.move(VariantState.FAILED, "failed")
        self.error = error

    @property
    def settled(self) -> bool:
        """Ready or failed: nothing more will happen to it."""
        return self.state in (VariantState.READY, VariantState.FAILED)

    def describe(self) -> str:
        """e.g. "is calibrating its window and sharing plans (step 3/40, 2% done, 1 s elapsed, no estimate yet)"."""
        if self.state is VariantState.FAILED:
            return f"failed to start: {self.error}"
        if self.state is VariantState.READY:
            return "is ready"
        return f"is {self.doing}" + (f" ({self.progress.summary()})" if self.progress is not None else "")

    def refusal(self) -> VariantNotReady | None:
        """What a request for the variant gets now; None once it is ready."""
        if self.state is VariantState.READY:
            return None
        if self.state is VariantState.FAILED:  # a restart, or another replica, is what helps
            return VariantNotReady(self.name, self.describe(), FAILED_RETRY_AFTER_S)
        left = self.progress.left_s if self.progress is not None else None
        wait = VARIANT_RETRY_AFTER_MIN_S if left is None else math.ceil(left)
        return VariantNotReady(
            self.name, self.describe(), min(max(wait, VARIANT_RETRY_AFTER_MIN_S), VARIANT_RETRY_AFTER_MAX_S)
        )

    def as_dict(self) -> dict[str, Any]:
        """For /readyz and /models: state, what it does, progress and error (null where none)."""
        return {
            "state": self.state.value,
            "doing": None if self.settled else self.doing,
            "progress": self.progress.as_dict() if self.progress is not None and not self.settled else None,
            "error": self.error,
        }


def fail_unsettled(statuses: Iterable[VariantStatus], why: str) -> None:
    """Every variant not yet ready or failed fails with `why`: none of them will start (a drain, a failed load)."""
    for status in statuses:
        if not status.settled:
            status.fail(why)
