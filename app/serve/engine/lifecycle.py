"""The one lifecycle of a serving process, shared by the service (loading, a failed load) and its engine
(accepting, draining, stopped), and every Retry-After it answers a refused client with.

    LOADING -> READY -> DRAINING -> STOPPED
    LOADING -> DRAINING            (a drain that begins while loading: the engine is never started)
    LOADING -> FAILED -> STOPPED   (a failed load: /healthz 503 until the process is restarted)
"""

from __future__ import annotations

from enum import StrEnum

from app.serve.engine.errors import Draining, NotAccepting, NotReady

LOADING_RETRY_AFTER_S = 5  # a load takes seconds
DRAINING_RETRY_AFTER_S = 1  # a draining process has a replacement (or nothing) behind it
UNHEALTHY_RETRY_AFTER_S = 30  # a stuck engine needs a restart, which its /healthz 503 asks for
FAILED_RETRY_AFTER_S = 60  # a failed load does not heal: only a restart helps
# a variant still starting: its estimate of the time left, within these bounds (a client that needs it polls
# at least once a minute; a calibration's first estimate is rough)
VARIANT_RETRY_AFTER_MIN_S = LOADING_RETRY_AFTER_S
VARIANT_RETRY_AFTER_MAX_S = 60


class Phase(StrEnum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


NEXT: dict[Phase, set[Phase]] = {
    Phase.LOADING: {Phase.READY, Phase.DRAINING, Phase.FAILED},
    Phase.READY: {Phase.DRAINING},
    Phase.DRAINING: {Phase.STOPPED},
    Phase.FAILED: {Phase.STOPPED},
    Phase.STOPPED: set(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.error: str | None = None  # why the load failed

    def move(self, phase: Phase) -> None:
        """Take a step of the diagram above; any other is a bug (RuntimeError)."""
        if phase is not self.phase and phase not in NEXT[self.phase]:
            raise RuntimeError(f"the lifecycle cannot go from {self.phase} to {phase}")
        self.phase = phase

    def fail(self, error: str) -> None:
        self.move(Phase.FAILED)
        self.error = error

    def drain(self) -> None:
        """Refuse new work from now on (a failed load stays FAILED)."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.move(Phase.DRAINING)

    def stop(self) -> None:
        self.drain()
        self.move(Phase.STOPPED)

    def refusal(self, unhealthy: str | None = None) -> NotAccepting | None:
        """The error a new request gets now (None: accepted); `unhealthy` says why a ready engine is not
        healthy, if it is not."""
        p = self.phase
        if p is Phase.READY:
            return None if unhealthy is None else NotReady(f"unhealthy: {unhealthy}", UNHEALTHY_RETRY_AFTER_S)
        if p in (Phase.DRAINING, Phase.STOPPED):
            return Draining(p.value, DRAINING_RETRY_AFTER_S)
        if p is Phase.FAILED:
            return NotReady("model failed to load", FAILED_RETRY_AFTER_S)
        return NotReady("loading" if p is Phase.LOADING else p.value, LOADING_RETRY_AFTER_S)

    def retry_after_s(self, unhealthy: str | None = None) -> int:
        """What /readyz's 503 says: as a new request would be told (1 when nothing refuses: a flip is near)."""
        refusal = self.refusal(unhealthy)
        return refusal.retry_after_s if refusal is not None else DRAINING_RETRY_AFTER_S
