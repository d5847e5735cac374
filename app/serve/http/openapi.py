"""What the OpenAPI document says each route answers besides its 200 JSON (the raw images, the error bodies and
their headers), and, once the model is loaded, the limits of a request that depend on it and on the settings.
Schemathesis holds every answer to it, in process and with its command line (tests/serve/test_openapi.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from app.serve.http.encoding import MEDIA_TYPES
from app.serve.http.limits import Limits
from app.serve.http.schemas import (
    CLASS_BRANCHES,
    SEED_MAX,
    ErrorBody,
    FailureBody,
    HealthBody,
    ValidationErrorBody,
)

Responses = dict[int | str, dict[str, Any]]
RETRY_AFTER = {
    "Retry-After": {
        "description": "whole seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def _error(description: str, model: type = ErrorBody, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "model": model} | ({"headers": headers} if headers else {})


GENERATE: Responses = {
    200: {
        "description": "JSON with base64 images; or, with Accept: image/png|jpeg|webp (or image/*) and one image, "
        "the image itself with X-Seed, X-Variant and X-Class-Label headers",
        "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
    },
    406: _error(
        "Accept allows no answer this service gives (it gives application/json, image/png, image/jpeg, image/webp), "
        "or asks for a raw image of a request that is not one image in that format"
    ),
    408: _error("the body did not arrive within body_timeout_s of the headers; the connection is closed"),
    413: _error("body larger than max_body_bytes (or an invalid Content-Length); the connection is closed"),
    422: _error("invalid field: each error names the field and the limit", ValidationErrorBody),
    429: _error("queue full", headers=RETRY_AFTER),
    500: _error("generation failed or gave non-finite pixels", FailureBody),
    503: _error(
        "loading, draining, failed load or unhealthy engine; or the variant asked for is still starting (the "
        "answer names what it waits for) or failed to start",
        headers=RETRY_AFTER,
    ),
    504: _error("timeout_s passed (encoding included); images not started were never computed"),
}
MODELS: Responses = {
    503: _error("the checkpoint not read yet, draining, or the load failed before reading it", headers=RETRY_AFTER)
}
HEALTHZ: Responses = {
    200: {"model": HealthBody, "description": "alive"},
    503: {"model": HealthBody, "description": "the model failed to load or the engine is stuck: restart the process"},
}
READYZ: Responses = {
    200: {"model": HealthBody, "description": "the default variant serves; each variant's state in `variants`"},
    503: {"model": HealthBody, "description": "loading, draining, unhealthy or failed", "headers": RETRY_AFTER},
}
METRICS: Responses = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
UNAUTHORIZED: Responses = {
    401: _error(
        "no valid API key (Authorization: Bearer <key>, or X-API-Key); the same answer whatever was wrong",
        headers={"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    )
}


def with_limits(document: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The document with the limits of POST /generate that depend on the loaded model and the settings, which
    `limits.to_engine_request` checks: the class range and names, the images per request, the vocabulary, the
    loaded variants, max_timeout_s, and seed + num_images - 1 <= SEED_MAX (an `if` per number of images). A
    request that the document allows is then refused only by the queue (429) or its own deadline (504)."""
    document = copy.deepcopy(document)  # FastAPI caches its own
    request = document["components"]["schemas"]["GenerateRequest"]
    fields = request["properties"]
    _value(fields["class_label"])["maximum"] = limits.num_classes - 1
    if limits.class_names:
        # the spellings that name one class; case and spacing are free too, which JSON Schema cannot say
        _value(fields["class_name"])["enum"] = list(limits.classes.unambiguous())
    else:  # a model without class names: class_label alone names the class
        fields["class_name"] = {"type": "null", "description": fields["class_name"]["description"]}
        request["allOf"] = [{"oneOf": [copy.deepcopy(CLASS_BRANCHES["class_label"])]}]
    fields["num_images"]["maximum"] = limits.max_images_per_request
    _value(fields["top_k"])["maximum"] = limits.vocab_size
    _value(fields["variant"])["enum"] = list(limits.variants)
    _value(fields["timeout_s"])["maximum"] = limits.max_timeout_s
    request["allOf"] += [
        {
            "if": {"required": ["num_images"], "properties": {"num_images": {"const": n}}},
            "then": {"properties": {"seed": {"maximum": SEED_MAX - n + 1}}},
        }
        for n in range(2, limits.max_images_per_request + 1)
    ]
    return document


def _value(field: dict[str, Any]) -> dict[str, Any]:
    """The schema of an optional field's value, to change in place."""
    return next(s for s in field["anyOf"] if s.get("type") != "null")


def once_loaded(document: Callable[[], dict[str, Any]], limits: Callable[[], Limits | None]) -> Callable[[], Any]:
    """What to set as FastAPI's `app.openapi`: its `document` without the model's limits while the model loads,
    `with_limits` once it is loaded (made once)."""
    done: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal done
        if done is None:
            loaded = limits()
            if loaded is None:
                return document()
            done = with_limits(document(), loaded)
        return done

    return openapi
