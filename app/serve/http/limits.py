"""The limits that depend on the loaded model and the settings, and the checks of a request against them.

Violations raise FastAPI's RequestValidationError, all of them at once, so every 422 has the shape of
pydantic's own: `{"detail": [{"loc": ["body", field], "msg": ..., "type": ..., "input": ...}, ...]}`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.model.classes import ClassNames
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
    class_synonyms: tuple[tuple[str, ...], ...] = ()  # none, or one tuple per class

    @cached_property
    def classes(self) -> ClassNames:
        """The names indexed for lookup, built at the first request that gives one."""
        return ClassNames(self.class_names, self.class_synonyms)


# An unknown class name's 422 lists every name of a model with at most this many classes; with more (ImageNet's
# 1000 and their synonyms) it lists the closest few and points to GET /models.
LISTED_NAMES_MAX = 20


def to_engine_request(body: GenerateRequest, limits: Limits) -> GenerationRequest:
    """Check the body against the model and settings and fill in defaults; never clamp."""
    errors: list[dict[str, Any]] = []

    def fail(field: str, msg: str, value: Any, kind: str = "value_error") -> None:
        errors.append({"type": kind, "loc": ("body", field), "msg": msg, "input": value})

    label = class_label(body, limits, fail)
    n = body.num_images
    variant = limits.default_variant if body.variant is None else body.variant  # "" names no variant: 422
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
        return label_of_name(body.class_name, limits, fail)
    elif body.class_label is not None and body.class_label >= limits.num_classes:
        fail(
            "class_label", f"must be less than {limits.num_classes} (number of classes)", body.class_label, "less_than"
        )
    else:
        return body.class_label
    return None


def label_of_name(name: str, limits: Limits, fail: Callable[..., None]) -> int | None:
    """Case-insensitive, any synonym; a name of several classes is refused naming them all, never picked."""
    labels = limits.classes.labels(name) if limits.class_names else ()
    if len(labels) == 1:
        return labels[0]
    if labels:
        candidates = "; ".join(limits.classes.describe(label) for label in labels)
        fail("class_name", f"ambiguous class name, {len(labels)} classes have it: {candidates}; give class_label", name)
    elif len(limits.class_names) <= LISTED_NAMES_MAX:
        names = ", ".join(repr(c) for c in limits.class_names) or "none (this model has no class names)"
        fail("class_name", f"unknown class name; valid names: {names}", name)
    else:
        closest = ", ".join(repr(c) for c in limits.classes.closest(name))
        hint = f"closest: {closest}; " if closest else ""
        count = len(limits.class_names)
        fail("class_name", f"unknown class name; {hint}all {count} names and their synonyms: GET /models", name)
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
