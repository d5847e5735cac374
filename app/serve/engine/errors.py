"""The conditions an accepted or refused request can end in besides its images. The HTTP layer maps each to an
answer in one table (app/serve/http/errors.py); here they only say what happened."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's refusals and failures."""


class QueueFull(EngineError):
    def __init__(self, queued: int, capacity: int, retry_after_s: int):
        super().__init__(f"queue full: {queued} images waiting, capacity {capacity}")
        self.retry_after_s = retry_after_s


class NotAccepting(EngineError):
    """The engine or service takes no request now; `state` says which state in words, for the answer."""

    def __init__(self, state: str, retry_after_s: int):
        super().__init__(f"not accepting requests: {state}")
        self.retry_after_s = retry_after_s


class NotReady(NotAccepting):
    """Loading, warming up, unhealthy, or the load failed."""


class VariantNotReady(NotReady):
    """The service serves, but not this variant yet (it is calibrating, warming up...) or not at all (it failed
    to start); `why` says which, for the answer."""

    def __init__(self, variant: str, why: str, retry_after_s: int):
        EngineError.__init__(self, f"variant {variant} {why}")
        self.retry_after_s = retry_after_s


class Draining(NotAccepting):
    """Shutting down, or stopped."""


class UnknownVariant(EngineError, ValueError):
    def __init__(self, variant: str, loaded: list[str]):
        super().__init__(f"unknown variant {variant!r}; loaded: {', '.join(loaded)}")


class DeadlineExceeded(EngineError):
    def __init__(self, timeout_s: float, computed: bool, encoding: bool = False):
        what = "computed, not encoded in time" if encoding else "partly computed" if computed else "never computed"
        super().__init__(f"deadline of {timeout_s:g} s passed ({what})")
        self.computed = computed


class BatchFailed(EngineError):
    """The request's images could not be computed; `error_id` is in the log line with the cause."""

    def __init__(self, error_id: str, what: str = "generation failed"):
        super().__init__(f"{what} (error id {error_id})")
        self.error_id = error_id


class NonFiniteOutput(BatchFailed):
    """An image of the request came out with NaN or infinite pixels: never encoded, never answered as 200."""

    def __init__(self, error_id: str):
        super().__init__(error_id, "generation produced non-finite output (NaN or infinite pixels)")
