"""The limits that depend on the loaded model and the settings, and the checks of a request against them.

Violations raise FastAPI's RequestValidationError, all of them at once, so every 422 has the shape of
pydantic's own: `{"detail": [{"loc": ["body", field], "msg": ..., "type": ..., "input": ...}, ...]}`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.model.sampling import SamplingParams
from app.serve.engine import GenerationRequest
from app.serve.http.schemas import SEED_MAX, GenerateRequest


@dataclass(frozen=True)
class Limits:
    num_classes: int
    class_names: tuple[str, ...]
    vocab_size: int
    variants: tuple[str, ...]
    default_variant: str
    defaults: SamplingParams
    max_images_per_request: int
    default_timeout_s: float
    max_timeout_s: float


def to_engine_request(body: GenerateRequest, limits: Limits) -> GenerationRequest:
    """Check the body against the model and settings and fill in defaults; never clamp."""
    errors: list[dict[str, Any]] = []

    def fail(field: str, msg: str, value: Any, kind: str = "value_error") -> None:
        errors.append({"type": kind, "loc": ("body", field), "msg": msg, "input": value})

    label = class_label(body, limits, fail)
    n, variant = body.num_images, body.variant or limits.default_variant
    if n > limits.max_images_per_request:
        fail(
            "num_images",
            f"must be at most {limits.max_images_per_request} (max_images_per_request)",
            n,
            "less_than_equal",
        )
    if variant not in limits.variants:
        fail("variant", f"unknown variant; loaded variants: {', '.join(limits.variants)}", body.variant)
    if body.top_k is not None and body.top_k > limits.vocab_size:
        fail(
            "top_k",
            f"must be at most {limits.vocab_size} (the vocabulary size; 0 = off)",
            body.top_k,
            "less_than_equal",
        )
    timeout_s = body.timeout_s if body.timeout_s is not None else limits.default_timeout_s
    if timeout_s > limits.max_timeout_s:
        fail(
            "timeout_s", f"must be at most {limits.max_timeout_s:g} (max_timeout_s)", body.timeout_s, "less_than_equal"
        )
    if body.seed is not None and body.seed + n - 1 > SEED_MAX:
        fail("seed", f"seed + num_images - 1 must be at most {SEED_MAX} (seeds stay exact JSON integers)", body.seed)
    if errors:
        raise RequestValidationError(errors)
    assert label is not None
    return GenerationRequest(variant, label, seeds(body.seed, n), sampling(body, limits.defaults), timeout_s)


def class_label(body: GenerateRequest, limits: Limits, fail: Callable[..., None]) -> int | None:
    if (body.class_label is None) == (body.class_name is None):
        fail("class_label", "give exactly one of class_label and class_name", body.class_label, "missing")
    elif body.class_name is not None:
        if body.class_name in limits.class_names:
            return limits.class_names.index(body.class_name)
        names = ", ".join(repr(c) for c in limits.class_names) or "none (this model has no class names)"
        fail("class_name", f"unknown class name; valid names: {names}", body.class_name)
    elif body.class_label is not None and body.class_label >= limits.num_classes:
        fail(
            "class_label", f"must be less than {limits.num_classes} (number of classes)", body.class_label, "less_than"
        )
    else:
        return body.class_label
    return None


def seeds(first: int | None, n: int) -> tuple[int, ...]:
    """Image i gets first + i; a random first seed when none is given."""
    if first is None:
        first = secrets.randbelow(SEED_MAX - n + 2)
    return tuple(first + i for i in range(n))


def sampling(body: GenerateRequest, defaults: SamplingParams) -> SamplingParams:
    return SamplingParams(
        cfg=defaults.cfg if body.cfg is None else body.cfg,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        more_smooth=defaults.more_smooth if body.more_smooth is None else body.more_smooth,
    )
