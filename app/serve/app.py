"""create_app(settings) -> FastAPI: the composition root, and the only reader of ServeSettings."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from app.serve.api import router
from app.serve.errors import error, install_error_handlers
from app.serve.metrics import versions
from app.serve.middleware import BodySizeLimit, GenerateMetrics
from app.serve.service import Service
from app.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    service = Service(settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()  # loads in the background; /readyz turns 200 when done
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="var-serve",
        version=versions()["app_version"],
        summary="Class-conditional image generation with VAR and its compressed variants",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(router)
    install_error_handlers(app, service.metrics)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodySizeLimit, max_bytes=service.settings.max_body_bytes, metrics=service.metrics)
    app.add_middleware(GenerateMetrics, metrics=service.metrics)  # outermost: sees every answer, 413 included
    return app


async def _unexpected(request: Request, exc: Exception) -> Response:
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return error(500, f"internal error (error id {error_id})", error_id=error_id)
