"""The engine: batching and the model's worker thread, behind `Engine.generate`. No web framework here.

engine.py        Engine: lifecycle, admission (backpressure, deadlines, cancellation), health
lifecycle.py     the one lifecycle (loading, ready, draining, stopped, failed) and its Retry-After values
variants.py      each variant's way to serving (loading, calibrating, warming, ready, failed) and its refusal
requests.py      GenerationRequest, GenerationResult; Pending, an accepted request's rows
errors.py        what a request can end in besides images (QueueFull, NotReady, Draining, DeadlineExceeded...)
queue.py         RequestQueue: waiting rows and one future per request, behind methods; next_batch
core.py          EngineCore: what the policies share, and how a request ends
policy.py        the BatchingPolicy protocol and its two implementations:
whole_batching.py    a batch runs every scale before the next starts
scale_batching.py    requests join the running generations at the next scale
batch_limit.py   the batch limit, lowered for a while after running out of memory
worker.py        what runs in the worker thread: a batch through a pipeline, finiteness, freeing memory
watchdog.py      is a batch stuck, has the scheduler died
"""

from app.serve.engine.engine import Engine, within_deadline
from app.serve.engine.errors import (
    BatchFailed,
    DeadlineExceeded,
    Draining,
    EngineError,
    NonFiniteOutput,
    NotAccepting,
    NotReady,
    QueueFull,
    UnknownVariant,
    VariantNotReady,
)
from app.serve.engine.lifecycle import Lifecycle, Phase
from app.serve.engine.policy import POLICIES, auto_policy
from app.serve.engine.requests import GenerationRequest, GenerationResult
from app.serve.engine.variants import VariantState, VariantStatus, fail_unsettled
from app.serve.engine.watchdog import Unhealthy

__all__ = [
    "POLICIES",
    "BatchFailed",
    "DeadlineExceeded",
    "Draining",
    "Engine",
    "EngineError",
    "GenerationRequest",
    "GenerationResult",
    "Lifecycle",
    "NonFiniteOutput",
    "NotAccepting",
    "NotReady",
    "Phase",
    "QueueFull",
    "Unhealthy",
    "UnknownVariant",
    "VariantNotReady",
    "VariantState",
    "VariantStatus",
    "auto_policy",
    "fail_unsettled",
    "within_deadline",
]
