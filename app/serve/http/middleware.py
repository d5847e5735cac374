"""Two plain ASGI middlewares: the request body's limits (413 over its size, 408 when it comes too slowly) and
the per-request metrics of /generate."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serve.metrics import Rejection, ServeMetrics


class BodyLimits:
    """Refuse bodies over max_bytes with 413, whether announced by Content-Length or sent chunked, and bodies
    not received within timeout_s of the headers with 408 (a client that sends a byte a second). Both answers
    close the connection, so that the rest of such a body is never read.

    The body is read here (it is small by construction) and handed on in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, metrics: ServeMetrics):
        self.app, self.max_bytes, self.timeout_s, self.metrics = app, max_bytes, timeout_s, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, 413, Rejection.BODY_TOO_LARGE, self._too_large)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            detail = f"request body not received within {self.timeout_s:g} s (body_timeout_s)"
            await self._refuse(send, 408, Rejection.BODY_TIMEOUT, detail)
            return
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            await self._refuse(send, 413, Rejection.BODY_TOO_LARGE, self._too_large)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, None if the client disconnected, or as soon as it passes max_bytes what it has."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                break
        return b"".join(chunks)

    @property
    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (max_body_bytes), or an invalid Content-Length"

    async def _refuse(self, send: Send, status: int, reason: Rejection, detail: str) -> None:
        self.metrics.rejections.labels(reason).inc()
        payload = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
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
