"""The one place that maps engine conditions to HTTP answers, and counts each rejection by reason."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from app.serve.batching import BatchFailed, DeadlineExceeded, NotAccepting, QueueFull, Rejection
from app.serve.metrics import ServeMetrics

CLIENT_CLOSED = 499  # nginx's convention: the client went away before the answer


class ClientDisconnected(Exception):
    pass


class NotAcceptable(Exception):
    """The Accept header asks for a raw image the request cannot be answered with."""


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
        return await request_validation_exception_handler(request, exc)

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
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(NotAccepting, on_not_accepting)
    app.add_exception_handler(DeadlineExceeded, on_deadline)
    app.add_exception_handler(BatchFailed, on_batch_failed)
    app.add_exception_handler(NotAcceptable, on_not_acceptable)
    app.add_exception_handler(ClientDisconnected, on_disconnected)
