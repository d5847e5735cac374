"""HTTP routes: thin. Validation is pydantic's and `limits`; batching is the engine's; errors map in `errors`.

The routes reach the service through `Backend`, which `app/serve/service.py` implements: the HTTP layer never
imports the composition root above it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.model.timing import Stage
from app.serve.engine import Engine, GenerationResult, Lifecycle, Phase, Unhealthy, within_deadline
from app.serve.http import openapi
from app.serve.http.encoding import ANY_IMAGE, MEDIA_TYPES, NotAcceptable, encode_images, negotiate
from app.serve.http.errors import ClientDisconnected
from app.serve.http.json_body import JSONBodyRoute
from app.serve.http.limits import Limits, to_engine_request
from app.serve.http.schemas import GeneratedImage, GenerateRequest, GenerateResponse, Timings
from app.serve.metrics import ServeMetrics

T = TypeVar("T")
# three routers, so that the composition root can put API keys on the API, on the operations' routes only when
# asked (VAR_PROTECT_OPS), and never on the playground page
router = APIRouter(route_class=JSONBodyRoute)  # POST /generate, GET /models
ops_router = APIRouter()  # /healthz, /readyz, /metrics
page_router = APIRouter()  # the playground
PLAYGROUND = (Path(__file__).parent / "static" / "index.html").read_text()


class Backend(Protocol):
    """What the routes need of the service."""

    metrics: ServeMetrics
    lifecycle: Lifecycle

    def ready_engine(self) -> tuple[Engine, Limits]:
        """The engine and the request limits, or NotAccepting (503) while not ready."""
        ...

    def health(self) -> Unhealthy | None: ...

    def describe(self) -> dict[str, Any]:
        """GET /models, or NotAccepting (503) while there is nothing to describe yet (or any more)."""
        ...

    def variant_states(self) -> dict[str, dict[str, Any]]:
        """Per variant: its state, what it does, its progress, its error."""
        ...


async def get_service(request: Request) -> Backend:
    """Async on purpose: FastAPI runs a plain function dependency in its thread pool, a thread hop per request
    that cost a refusal more than half its time (docs/benchmarks.md, "What a refusal costs")."""
    service: Backend = request.app.state.service
    return service


ServiceDep = Annotated[Backend, Depends(get_service)]


@router.post("/generate", response_model=GenerateResponse, responses=openapi.GENERATE)
async def generate(body: GenerateRequest, request: Request, service: ServiceDep) -> Response:
    """Images of one class. JSON (base64 images) by default; with `Accept: image/png|jpeg|webp` and
    num_images 1, the image itself, with seed, variant and timings in headers."""
    arrived = time.perf_counter()
    raw_format = negotiate(request.headers.get("accept"))
    engine, limits = service.ready_engine()
    job = to_engine_request(body, limits)
    request.state.variant = job.variant
    fmt = answer_format(body, job.num_images, raw_format)
    result = await until_disconnected(engine.generate(job), request)
    t0 = time.perf_counter()
    encoded = await within_deadline(result, asyncio.to_thread(encode_images, result.images, fmt))
    encode_s = time.perf_counter() - t0
    service.metrics.stage_seconds.labels(job.variant, Stage.ENCODE).observe(encode_s)
    timings = timings_of(result, encode_s, time.perf_counter() - arrived)
    headers = {"Server-Timing": server_timing(timings)}
    if raw_format:
        headers |= {"X-Seed": str(result.seeds[0]), "X-Variant": result.variant, "X-Class-Label": str(job.class_label)}
        return Response(encoded[0], media_type=MEDIA_TYPES[fmt], headers=headers)
    answer = GenerateResponse(
        variant=result.variant,
        class_label=job.class_label,
        class_name=limits.class_names[job.class_label] if limits.class_names else None,
        format=fmt,  # type: ignore[arg-type]
        media_type=MEDIA_TYPES[fmt],
        images=[
            GeneratedImage(seed=s, data=base64.b64encode(b).decode())
            for s, b in zip(result.seeds, encoded, strict=True)
        ],
        timings=timings,
        batch_sizes=result.batch_sizes,
    )
    return JSONResponse(answer.model_dump(), headers=headers)


def answer_format(body: GenerateRequest, num_images: int, raw_format: str | None) -> str:
    if raw_format is None:
        return body.format
    if raw_format == ANY_IMAGE:  # image/*: the body's format
        raw_format = body.format
    if num_images != 1:
        raise NotAcceptable(
            f"a raw image answer (Accept: image/{raw_format}) holds one image; num_images is {num_images}"
        )
    if "format" in body.model_fields_set and body.format != raw_format:
        raise NotAcceptable(f"Accept asks for image/{raw_format} but the body's format is {body.format!r}")
    return raw_format


async def until_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await `work` unless the client goes away first; then cancel it (which withdraws queued rows)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, or this handler itself is being cancelled
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timings_of(result: GenerationResult, encode_s: float, total_s: float) -> Timings:
    st = result.stage_s
    return Timings(
        queued_ms=1000 * result.queued_s,
        transformer_ms=1000 * st.get(Stage.TRANSFORMER, 0.0),
        sampling_ms=1000 * st.get(Stage.SAMPLING, 0.0),
        latent_ms=1000 * st.get(Stage.LATENT, 0.0),
        decode_ms=1000 * st.get(Stage.DECODE, 0.0),
        encode_ms=1000 * encode_s,
        total_ms=1000 * total_s,
    )


def server_timing(t: Timings) -> str:
    parts = {"queue": t.queued_ms, Stage.TRANSFORMER: t.transformer_ms, Stage.SAMPLING: t.sampling_ms}
    parts |= {Stage.LATENT: t.latent_ms, Stage.DECODE: t.decode_ms, Stage.ENCODE: t.encode_ms, "total": t.total_ms}
    return ", ".join(f"{k};dur={v:.2f}" for k, v in parts.items())


@router.get("/models", responses=openapi.MODELS)
async def models(service: ServiceDep) -> dict[str, Any]:
    """Every configured variant (its state and progress while it starts, its error if it failed; passes,
    weight bytes), the classes, the sampling defaults and the limits. 503 until the checkpoint is read."""
    return service.describe()


@ops_router.get("/healthz", responses=openapi.HEALTHZ)
async def healthz(service: ServiceDep) -> Response:
    """Alive: 200, unless the model failed to load, a batch runs far past its expected time or the engine's
    scheduler died: then 503 naming the reason, so that the process gets restarted."""
    if (problem := service.health()) is not None:
        body = {"status": problem.status, "reason": problem.reason, "error": problem.detail}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "alive"})


@ops_router.get("/readyz", responses=openapi.READYZ)
async def readyz(service: ServiceDep) -> Response:
    """200 once the default variant serves (the other variants may still be starting, or have failed: each
    one's state is in the body); 503 while loading, draining, unhealthy or after a failed load."""
    problem, life = service.health(), service.lifecycle
    variants = service.variant_states()
    if life.phase is Phase.READY and problem is None:
        return JSONResponse({"status": "ready", "variants": variants})
    body = {"status": life.phase.value, "error": life.error}
    if problem is not None:
        body = {"status": problem.status, "error": problem.detail}
    retry_after_s = life.retry_after_s(problem.detail if problem else None)
    return JSONResponse(body | {"variants": variants}, status_code=503, headers={"Retry-After": str(retry_after_s)})


@ops_router.get("/metrics", response_class=Response, responses=openapi.METRICS)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@page_router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(PLAYGROUND)
