"""create_app(settings) -> FastAPI: the composition root, and the only reader of ServeSettings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.serve.http import openapi
from app.serve.http.auth import ApiKeys, require_key
from app.serve.http.errors import install_error_handlers
from app.serve.http.middleware import BodyLimits, GenerateMetrics, ShedWhenFull
from app.serve.http.routes import ops_router, page_router, router
from app.serve.metrics import versions
from app.serve.service import Service
from app.serve.settings import ServeSettings


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
    # /openapi.json: with the model's limits once it is loaded, so that a request it allows is one the service takes
    app.openapi = openapi.once_loaded(app.openapi, lambda: service.limits)  # type: ignore[method-assign]
    s = service.settings
    keys = ApiKeys(k.get_secret_value() for k in s.api_keys)
    include_routes(app, keys, protect_ops=s.protect_ops)
    install_error_handlers(app, service.metrics)
    # innermost first: each add_middleware wraps what is there
    app.add_middleware(
        ShedWhenFull,
        engine=lambda: service.engine,
        keys=keys,
        default_variant=s.default_variant,
        metrics=service.metrics,
    )
    app.add_middleware(BodyLimits, max_bytes=s.max_body_bytes, timeout_s=s.body_timeout_s, metrics=service.metrics)
    app.add_middleware(GenerateMetrics, metrics=service.metrics)  # outermost: sees every answer, 413 included
    return app


def include_routes(app: FastAPI, keys: ApiKeys, protect_ops: bool) -> None:
    """The API behind VAR_API_KEYS when set, the operations' routes too with VAR_PROTECT_OPS; the playground
    page and the OpenAPI document stay open (they hold no data; the page asks the protected API)."""
    if not keys:
        for r in (router, ops_router, page_router):
            app.include_router(r)
        return
    guard, refusal = [Depends(require_key(keys))], openapi.UNAUTHORIZED
    app.include_router(router, dependencies=guard, responses=refusal)
    if protect_ops:
        app.include_router(ops_router, dependencies=guard, responses=refusal)
    else:
        app.include_router(ops_router)
    app.include_router(page_router)
