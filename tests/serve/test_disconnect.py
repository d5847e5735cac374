"""A client that goes away while its request waits in the queue: the request leaves the queue uncomputed.

Driven at the ASGI level (one event loop for the app and the test) so the disconnect happens at a chosen
moment: while the worker is held busy by another request."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.serve.app import create_app
from app.serve.engine import GenerationRequest
from app.serve.http.errors import CLIENT_CLOSED
from tests.serve.conftest import Gated, serve_settings


async def post_then_leave(app: FastAPI, body: dict[str, Any], leave: asyncio.Event) -> int:
    """POST /generate; the client disconnects when `leave` is set. Returns the status the app answered."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": payload, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_disconnected_client_is_dropped_from_the_queue(demo_folder: Path, demo_pipeline: VARPipeline) -> None:
    app = create_app(serve_settings(demo_folder))
    service = app.state.service
    gated = Gated(demo_pipeline)

    async def scenario() -> int:
        async with app.router.lifespan_context(app):
            await service.wait_loaded()
            engine = service.engine
            engine.pipelines["baseline"] = gated
            busy = asyncio.create_task(
                engine.generate(GenerationRequest("baseline", 0, (1,), SamplingParams(top_k=0), 30))
            )
            assert await asyncio.to_thread(gated.entered.wait, 30)
            leave = asyncio.Event()
            call = asyncio.create_task(post_then_leave(app, {"class_label": 4, "seed": 77, "num_images": 2}, leave))
            while engine.queued_images() < 2:
                await asyncio.sleep(0.005)
            leave.set()
            status = await call
            assert engine.queued_images() == 0
            gated.release.set()
            await busy
            return status

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == CLIENT_CLOSED
    assert 77 not in gated.computed_seeds() and 78 not in gated.computed_seeds()
    metrics = service.metrics.render().decode()
    assert 'var_rejections_total{reason="client_disconnected"} 1.0' in metrics
