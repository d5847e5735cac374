"""A body over max_body_bytes gets a 413 its client can read, whatever its size and framing, also from a client
that writes its whole body before it reads (httpx's AsyncClient): the server discards the rest of the body
before it closes (`middleware.BodyLimits`). Against a live server (uvicorn on 127.0.0.1), and at the ASGI
level for the bounds of that discarding."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import closing
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.serve.http.middleware import DISCARD_MAX_BYTES, BodyLimits
from app.serve.metrics import ServeMetrics
from app.serve.settings import ServeSettings
from tests.serve.conftest import LiveServer

LIMIT = ServeSettings.model_fields["max_body_bytes"].default  # the live server's
MiB = 2**20


async def post(url: str, body: bytes, chunked: bool) -> httpx.Response:
    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{url}/generate", content=pieces() if chunked else body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [LIMIT + 1, MiB, 8 * MiB, 16 * MiB], ids=["limit+1", "1MiB", "8MiB", "16MiB"])
def test_an_async_client_reads_the_413_of_any_oversize_body(live_server: LiveServer, size: int, chunked: bool) -> None:
    r = asyncio.run(post(live_server.url, b"{" + b" " * (size - 2) + b"}", chunked))
    assert ("content-length" not in r.request.headers) == chunked  # the framing asked for
    assert r.status_code == 413, r.text
    assert f"larger than {LIMIT} bytes (max_body_bytes)" in r.json()["detail"]
    assert r.headers["connection"] == "close"


def test_a_declared_oversize_body_is_answered_before_it_is_sent_then_closed_cleanly(live_server: LiveServer) -> None:
    """The 413 of a Content-Length over the limit comes at once; the connection ends with a clean close (not
    a reset) once the client has sent the body it declared."""
    size = 4 * MiB
    parts = urlsplit(live_server.url)
    with closing(socket.create_connection((parts.hostname, parts.port), timeout=10)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        t0, answer = time.monotonic(), b""
        while b"}" not in answer:  # the JSON answer, complete
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert time.monotonic() - t0 < 5 and answer.startswith(b"HTTP/1.1 413 ")
        sock.sendall(b" " * size)  # read by the server: no broken pipe, no reset
        assert sock.recv(65536) == b""  # then closed


# --- the bounds, at the ASGI level ------------------------------------------------------------------------


def refuse(scope_headers: list[tuple[bytes, bytes]], receive: Any, timeout_s: float = 5) -> list[dict[str, Any]]:
    """What BodyLimits (max 1000 bytes) sends for a POST with these headers and this `receive`."""
    sent: list[dict[str, Any]] = []

    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not see an oversize body")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    limits = BodyLimits(never_called, max_bytes=1000, timeout_s=timeout_s, metrics=ServeMetrics(["baseline"], 1, 1))
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": scope_headers}
    asyncio.run(limits(scope, receive, send))
    return sent


def answered_in_full_first(sent: list[dict[str, Any]]) -> bool:
    """The status and every byte of the JSON answer went out before the discarding, the end of it after."""
    start, whole, end = sent
    return (
        start["status"] == 413
        and "max_body_bytes" in json.loads(whole["body"])["detail"]
        and whole["more_body"]
        and end == {"type": "http.response.body", "body": b"", "more_body": False}
    )


def test_an_endless_body_is_discarded_up_to_the_bound() -> None:
    read = 0

    async def endless() -> dict[str, Any]:
        nonlocal read
        read += 65536
        return {"type": "http.request", "body": b" " * 65536, "more_body": True}

    sent = refuse([(b"transfer-encoding", b"chunked")], endless)
    assert answered_in_full_first(sent)
    assert DISCARD_MAX_BYTES < read <= DISCARD_MAX_BYTES + 2 * 65536


def test_a_body_that_stops_coming_is_discarded_until_the_deadline() -> None:
    messages = [{"type": "http.request", "body": b" " * 2000, "more_body": True}]

    async def stalls() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    t0 = time.monotonic()
    sent = refuse([], stalls, timeout_s=0.2)
    assert answered_in_full_first(sent) and 0.15 < time.monotonic() - t0 < 2


def test_a_declared_length_past_the_bound_is_answered_and_closed_without_reading() -> None:
    async def never_read() -> dict[str, Any]:
        raise AssertionError("a body declared past DISCARD_MAX_BYTES is not read")

    sent = refuse([(b"content-length", str(DISCARD_MAX_BYTES + 1).encode())], never_read)
    assert [m.get("more_body", False) for m in sent] == [False, False] and sent[0]["status"] == 413
