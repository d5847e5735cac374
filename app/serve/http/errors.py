"""The one place that maps what a request can end in besides its answer (the engine's errors, the HTTP layer's
own refusals) to an HTTP answer, and counts each refusal by reason: one table, one handler."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from app.serve.engine import BatchFailed, DeadlineExceeded, Draining, NotReady, QueueFull
from app.serve.http.auth import Unauthorized
from app.serve.http.encoding import NotAcceptable
from app.serve.metrics import Rejection, ServeMetrics

CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer
ECHO_MAX_DEPTH = 4  # a 422 echoes an invalid value only when it is nested at most this deep
MAX_ERRORS = 32  # a 422 lists at most this many violations (a body of a thousand unknown fields is one mistake)
log = logging.getLogger(__name__)


class ClientDisconnected(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    """How an error is answered: its status, the reason it is counted under, fixed headers. An error with a
    `retry_after_s` adds Retry-After, one with an `error_id` names it in the body."""

    status: int
    reason: Rejection
    headers: dict[str, str] = field(default_factory=dict)


ANSWERS: dict[type[Exception], Answer] = {
    RequestValidationError: Answer(422, Rejection.INVALID),
    Unauthorized: Answer(401, Rejection.UNAUTHORIZED, {"WWW-Authenticate": Unauthorized.CHALLENGE}),
    NotAcceptable: Answer(406, Rejection.NOT_ACCEPTABLE),
    QueueFull: Answer(429, Rejection.QUEUE_FULL),
    NotReady: Answer(503, Rejection.NOT_READY),
    Draining: Answer(503, Rejection.DRAINING),
    DeadlineExceeded: Answer(504, Rejection.DEADLINE),
    BatchFailed: Answer(500, Rejection.FAILED),
    ClientDisconnected: Answer(CLIENT_CLOSED, Rejection.CLIENT_DISCONNECTED),
}


def error(status: int, detail: str, headers: dict[str, str] | None = None, error_id: str | None = None) -> Response:
    body: dict[str, str] = {"detail": detail}
    if error_id:
        body["error_id"] = error_id
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error of `ANSWERS` (and its subclasses) answered as the table says, and counted by reason; any
    other exception is a 500 naming an error id, logged with its traceback."""

    async def handler(request: Request, exc: Exception) -> Response:
        return answer(exc, metrics)

    for kind in ANSWERS:
        app.add_exception_handler(kind, handler)
    app.add_exception_handler(Exception, unexpected)


def answer(exc: Exception, metrics: ServeMetrics) -> Response:
    """The answer to an error of `ANSWERS` (or a subclass), counted by its reason."""
    how = next(ANSWERS[t] for t in type(exc).__mro__ if t in ANSWERS)
    metrics.rejections.labels(how.reason).inc()
    headers = dict(how.headers)
    if (retry_after_s := getattr(exc, "retry_after_s", None)) is not None:
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"detail": validation_errors(exc.errors())}, status_code=how.status)
    if isinstance(exc, ClientDisconnected):
        return Response(status_code=how.status)  # nobody reads it
    return error(how.status, str(exc), headers, getattr(exc, "error_id", None))


async def unexpected(request: Request, exc: Exception) -> Response:
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return error(500, f"internal error (error id {error_id})", error_id=error_id)


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
