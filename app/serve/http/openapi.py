"""What the OpenAPI document says each route answers besides its 200 JSON: the raw images, the error bodies and
their headers. Schemathesis holds every answer to it (tests/serve/test_openapi.py)."""

from __future__ import annotations

from typing import Any

from app.serve.http.encoding import MEDIA_TYPES
from app.serve.http.schemas import ErrorBody, FailureBody, HealthBody, ValidationErrorBody

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
