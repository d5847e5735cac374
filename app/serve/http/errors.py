"""The one place that maps engine conditions to HTTP answers, and counts each rejection by reason."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from app.serve.auth import Unauthorized
from app.serve.batching import BatchFailed, DeadlineExceeded, NotAccepting, QueueFull, Rejection
from app.serve.encoding import NotAcceptable
from app.serve.metrics import ServeMetrics

CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer
ECHO_MAX_DEPTH = 4  # a 422 echoes an invalid value only when it is nested at most this deep
MAX_ERRORS = 32  # a 422 lists at most this many violations (a body of a thousand unknown fields is one mistake)


class ClientDisconnected(Exception):
    pass


def error(status: int, detail: str, headers: dict[str, str] | None = None, error_id: str | None = None) -> Response:
    body: dict[str, str] = {"detail": detail}
    if error_id:
        body["error_id"] = error_id
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    def reject(reason: Rejection) -> None:
        metrics.rejections.labels(reason).inc()

    async def on_invalid(request: Request, exc: Exception) -> Response:
        reject(Rejection.INVALID)
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=422)

    async def on_unauthorized(request: Request, exc: Exception) -> Response:
        reject(Rejection.UNAUTHORIZED)
        return error(401, "a valid API key is required", {"WWW-Authenticate": Unauthorized.CHALLENGE})

    async def on_queue_full(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, QueueFull)
        reject(exc.rejection)
        return error(429, str(exc), {"Retry-After": str(exc.retry_after_s)})

    async def on_not_accepting(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NotAccepting)
        reject(exc.rejection)
        return error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    async def on_deadline(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DeadlineExceeded)
        reject(exc.rejection)
        return error(504, str(exc))

    async def on_batch_failed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BatchFailed)
        reject(exc.rejection)
        return error(500, str(exc), error_id=exc.error_id)

    async def on_not_acceptable(request: Request, exc: Exception) -> Response:
        reject(Rejection.NOT_ACCEPTABLE)
        return error(406, str(exc))

    async def on_disconnected(request: Request, exc: Exception) -> Response:
        reject(Rejection.CLIENT_DISCONNECTED)
        return Response(status_code=CLIENT_CLOSED)

    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(Unauthorized, on_unauthorized)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(NotAccepting, on_not_accepting)
    app.add_exception_handler(DeadlineExceeded, on_deadline)
    app.add_exception_handler(BatchFailed, on_batch_failed)
    app.add_exception_handler(NotAcceptable, on_not_acceptable)
    app.add_exception_handler(ClientDisconnected, on_disconnected)


def validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's errors as a 422 lists them, safe to encode whatever the client sent: an invalid value is
    echoed (`input`) only when it is finite JSON nested at most ECHO_MAX_DEPTH deep (never NaN, Infinity, a
    number beyond a double's range, a deep nest or bytes), and strings that UTF-8 cannot carry (a lone
    surrogate, in a field name or message) are written with backslash escapes. Past MAX_ERRORS violations, one
    last entry counts the rest, so that the answer stays about the size of the body."""
    out = []
    for e in errors[:MAX_ERRORS]:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        item["loc"] = [_text(part) if isinstance(part, str) else part for part in e.get("loc", ())]
        item["msg"] = _text(str(e.get("msg", "")))
        if "input" in e and _echoable(e["input"], ECHO_MAX_DEPTH):
            item["input"] = e["input"]
        ctx = jsonable_encoder(e.get("ctx"))
        if isinstance(ctx, dict) and _echoable(ctx, ECHO_MAX_DEPTH):
            item["ctx"] = ctx
        out.append(item)
    if len(errors) > MAX_ERRORS:
        more = len(errors) - MAX_ERRORS
        out.append({"type": "too_many_errors", "loc": ["body"], "msg": f"{more} more violations not listed"})
    return out


def _text(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _echoable(value: Any, depth: int) -> bool:
    """Whether a value is JSON that the strict encoder takes: finite numbers, UTF-8-safe strings, shallow."""
    if value is None or isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return _text(value) == value
    if depth == 0:
        return False
    if isinstance(value, list | tuple):
        return all(_echoable(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _text(k) == k and _echoable(v, depth - 1) for k, v in value.items())
    return False
