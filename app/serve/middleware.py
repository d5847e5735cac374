"""Two plain ASGI middlewares: the request-body size limit (413) and the per-request metrics of /generate."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serve.batching import Rejection
from app.serve.metrics import ServeMetrics


class BodySizeLimit:
    """Refuse bodies over max_bytes with 413, whether announced by Content-Length or sent chunked.

    The body is read here (it is small by construction) and handed on in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServeMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send)

    async def _refuse(self, send: Send) -> None:
        self.metrics.rejections.labels(Rejection.BODY_TOO_LARGE).inc()
        detail = f"request body larger than {self.max_bytes} bytes (max_body_bytes), or an invalid Content-Length"
        payload = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


class GenerateMetrics:
    """Counts every answer of POST /generate by variant and status, and observes the latency of those answered
    with images (200): a refusal answers fast and would pull the latency quantiles down.

    The route names the variant in `request.state.variant` once the body is validated."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/generate":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            state: dict[str, Any] = scope.get("state", {})
            variant = self.metrics.label(state.get("variant"))
            self.metrics.requests.labels(variant, str(status)).inc()
            if status == 200:
                self.metrics.request_seconds.labels(variant).observe(time.perf_counter() - t0)
