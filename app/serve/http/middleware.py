"""Three plain ASGI middlewares: the request body's limits (413 over its size, 408 when it comes too slowly), the
refusal of /generate while the queue is full, before the request is parsed, and the per-request metrics of
/generate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serve.engine import Engine
from app.serve.http.auth import ApiKeys
from app.serve.http.errors import answer
from app.serve.metrics import Rejection, ServeMetrics

# The most of a refused body that is read (and dropped) after its 413, so that its client can read the answer:
# enough for bodies of many megabytes (a file posted by mistake), at about 0.15 s of the event loop on loopback.
# A deadline alone would let one request keep the loop, which serves every connection, reading for body_timeout_s.
DISCARD_MAX_BYTES = 64 * 2**20


class BodyLimits:
    """Refuse bodies over max_bytes with 413, whether announced by Content-Length or sent chunked, and bodies
    not received within timeout_s of the headers with 408 (a client that sends a byte a second). Both answers
    close the connection.

    A 413 goes out as soon as the body is known to be too large (at once for a Content-Length over the limit),
    and then the rest of the body is read and dropped before the connection closes. Closing while the client
    still sends would leave unread bytes in the server's socket, and the kernel answers those with a reset,
    which can reach the client before it reads the 413: a client that writes its whole body before reading
    (httpx's AsyncClient) would see a connection error for any body larger than the socket buffers. So the
    answer's bytes are all sent at once (its Content-Length tells the client it is complete: curl, which reads
    while it sends, stops there) while the ASGI response stays open: uvicorn hands on `http.request` messages
    only until a response is complete. Its end is sent, and the connection closed, when the body has ended,
    the client has left, DISCARD_MAX_BYTES have been read or the body's deadline (timeout_s after the headers)
    has passed; past those bounds the connection is cut as before. A body declared longer than the bound is
    not read at all. Done here rather than as a lingering close in the HTTP protocol (`connections.py`), it
    needs nothing of uvicorn's internals, has a byte bound, and runs wherever the app does (under Ray Serve
    too). The 408 discards nothing: its client is the one too slow to wait for.

    The body is read here (it is small by construction) and handed on in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, metrics: ServeMetrics):
        self.app, self.max_bytes, self.timeout_s, self.metrics = app, max_bytes, timeout_s, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            discard = length.isdigit() and int(length) <= DISCARD_MAX_BYTES
            await self._too_large(send, receive if discard else None, deadline)
            return
        try:
            async with asyncio.timeout_at(deadline):
                body, more = await self._read(receive)
        except TimeoutError:
            detail = f"request body not received within {self.timeout_s:g} s (body_timeout_s)"
            await self._refuse(send, 408, Rejection.BODY_TIMEOUT, detail)
            return
        if body is None:  # the client left
            return
        if len(body) > self.max_bytes:
            await self._too_large(send, receive if more else None, deadline)
            return
        await self.app(scope, replaying({"type": "http.request", "body": body, "more_body": False}, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """(the whole body, None if the client disconnected, or as soon as it passes max_bytes what it has;
        whether more of it is to come)."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                break
        return b"".join(chunks), more

    async def _too_large(self, send: Send, rest: Receive | None, deadline: float) -> None:
        """413; then, with `rest`, the rest of the body discarded before the answer ends and the connection
        closes."""
        detail = f"request body larger than {self.max_bytes} bytes (max_body_bytes), or an invalid Content-Length"
        await self._refuse(send, 413, Rejection.BODY_TOO_LARGE, detail, end=rest is None)
        if rest is not None:
            await discard(rest, deadline)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _refuse(self, send: Send, status: int, reason: Rejection, detail: str, end: bool = True) -> None:
        """The answer's bytes, all of them; `end`: and the end of the response (else the caller ends it)."""
        self.metrics.rejections.labels(reason).inc()
        payload = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": not end})


def replaying(message: Message, receive: Receive) -> Receive:
    """`receive` that hands on `message` first: a body read here, passed to the app as if unread."""
    replay = [message]

    async def receive_replayed() -> Message:
        return replay.pop() if replay else await receive()

    return receive_replayed


async def discard(receive: Receive, deadline: float) -> None:
    """Read and drop the body's messages until it ends, the client leaves, DISCARD_MAX_BYTES have been read or
    the loop's clock passes `deadline`."""
    size = 0
    with suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            while size <= DISCARD_MAX_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                size += len(message.get("body", b""))


class ShedWhenFull:
    """POST /generate answered 429 (with Retry-After) while the queue has no free row, before the body is
    parsed, validated or routed. Under overload most requests are refusals, and each one's CPU time comes out
    of the batch being computed: the event loop holds the GIL that the worker needs between its kernels. Here a
    refusal skips FastAPI's routing, dependencies and validation (CPU per refusal: docs/benchmarks.md, "What a
    refusal costs").

    Refused here: a body that is a JSON object, with a valid API key where keys are set, while the engine
    accepts requests. Anything else takes the route and gets its own answer (401, 422, 503 while draining).
    So while the queue is full, a request the route would refuse for another reason (an unknown class, a
    variant still starting) gets 429 and its own answer when it retries; no request is ever queued here. The
    variant the body names labels the answer's metrics (`GenerateMetrics`)."""

    def __init__(
        self,
        app: ASGIApp,
        engine: Callable[[], Engine | None],
        keys: ApiKeys,
        default_variant: str,
        metrics: ServeMetrics,
    ):
        self.app, self.engine, self.keys, self.metrics = app, engine, keys, metrics
        self.default_variant = default_variant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.engine() if scope["type"] == "http" and scope["path"] == "/generate" else None
        full = engine.full() if engine is not None and scope["method"] == "POST" else None
        if full is None or not self.keys.admit(scope["headers"]):
            await self.app(scope, receive, send)
            return
        message = await receive()  # the whole body, in one message (BodyLimits)
        variant = self._variant_named(message.get("body", b""))
        if variant is None:
            await self.app(scope, replaying(message, receive), send)
            return
        scope.setdefault("state", {})["variant"] = variant
        await answer(full, self.metrics)(scope, receive, send)

    def _variant_named(self, body: bytes) -> str | None:
        """The variant a JSON object names (or the default), as a metrics label; None for any other body."""
        try:
            fields = json.loads(body)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        named = fields.get("variant")
        if named is None:  # as the route reads it: omitted or null is the default, "" is no variant
            named = self.default_variant
        return self.metrics.label(named if isinstance(named, str) else None)


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
