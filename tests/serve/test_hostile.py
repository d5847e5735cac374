"""Hostile inputs: each answers 4xx or closes the connection, never 5xx, and the server stays up with bounded
memory. In process for bodies and headers the app sees; against a live server (uvicorn on 127.0.0.1) for what
only the connection shows: slow headers and bodies, oversize headers, too many connections.

docs/reliability.md#hostile-inputs lists every input tried here with what it gets."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

import app.serve.http.routes as routes
from app.bench.prometheus_text import NO_LABELS, scrape
from app.serve.http.json_body import MAX_DEPTH
from app.serve.http.middleware import BodyLimits
from app.serve.http.schemas import TIMEOUT_MIN_S
from app.serve.metrics import Rejection, ServeMetrics
from tests.serve.conftest import LiveServer, live_server_process, serve_settings, serving

BODY_TIMEOUT_S, HEADER_TIMEOUT_S, CONNECTION_LIMIT = 1.0, 1.5, 6
MARGIN_S = 2.0  # scheduling slack on a loaded machine


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"the answer holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


# --- in process ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(demo_folder: Path) -> Iterator[TestClient]:
    with serving(serve_settings(demo_folder, max_images_per_request=2, default_timeout_s=5, max_timeout_s=5)) as c:
        yield c


def post_raw(client: TestClient, body: bytes, content_type: str | None = "application/json") -> Any:
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post("/generate", content=body, headers=headers)


HOSTILE_BODIES = {
    "deep array in a field": b'{"class_name": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "deep object": b'{"a":' * 2000 + b"1" + b"}" * 2000,
    f"nested {MAX_DEPTH + 1} deep": b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    "not UTF-8": b'{"class_name": "\xff\xfe"}',
    "a lone surrogate in a value": b'{"class_name": "\\ud800"}',
    "a lone surrogate as a field name": b'{"class_label": 1, "\\udfff": 1}',
    "an integer of 5000 digits": b'{"class_label": ' + b"9" * 5000 + b"}",
    "an integer of 4000 digits": b'{"class_label": 1, "seed": ' + b"9" * 4000 + b"}",
    "num_images of 4000 digits": b'{"class_label": 1, "num_images": ' + b"9" * 4000 + b"}",
    "a negative huge class_label": b'{"class_label": -100000000000000000000}',
    "top_k 2**63": b'{"class_label": 1, "top_k": 9223372036854775808}',
    "NaN as the whole body": b"NaN",
    "a list as the body": b"[1, 2]",
    "null as the body": b"null",
    "a string as the body": b'"class_label"',
    "an empty body": b"",
    "truncated JSON": b'{"class_label": 1',
    "a NUL in a class name": b'{"class_name": "Bag\\u0000"}',
    "a 15 KB class name": b'{"class_name": "' + b"x" * 15_000 + b'"}',
    "an emoji class name": '{"class_name": "Платье 👗"}'.encode(),
    "many unknown fields": b"{" + b",".join(b'"f%d": 1' % i for i in range(1000)) + b', "class_label": 1}',
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_a_hostile_json_body_is_422_and_the_answer_stays_json(client: TestClient, body: bytes) -> None:
    r = post_raw(client, body)
    assert r.status_code == 422, r.text[:500]
    detail = strict_json(r.text)["detail"]
    assert detail and all({"type", "loc", "msg"} <= set(e) for e in detail)
    assert len(r.content) < len(body) + 8192, "a 422 stays about the size of the body it refuses"


def test_a_422_lists_32_violations_and_counts_the_rest(client: TestClient) -> None:
    r = post_raw(client, HOSTILE_BODIES["many unknown fields"])
    detail = r.json()["detail"]
    assert len(detail) == 33 and detail[-1] == {
        "type": "too_many_errors",
        "loc": ["body"],
        "msg": "968 more violations not listed",
    }


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_a_body_of_another_content_type_is_422(client: TestClient, content_type: str | None) -> None:
    r = post_raw(client, b'{"class_label": 1}\xff', content_type)
    assert r.status_code == 422 and strict_json(r.text)["detail"], r.text


def test_extreme_but_valid_numbers_are_served(client: TestClient) -> None:
    subnormal = post_raw(client, b'{"class_label": 1, "cfg": 5e-324, "top_p": 1e-300, "seed": 0}')
    assert subnormal.status_code == 200, subnormal.text


def test_a_deadline_below_the_least_is_422_and_one_at_it_that_passes_is_504(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadline no generation could meet is the client's mistake; one that could be met, but passes while
    the image is encoded (held here), is the deadline doing its work."""
    instant = post_raw(client, b'{"class_label": 1, "timeout_s": 5e-324}')
    assert instant.status_code == 422, instant.text
    [error] = instant.json()["detail"]
    assert error["loc"] == ["body", "timeout_s"] and f"greater than or equal to {TIMEOUT_MIN_S:g}" in error["msg"]
    release, real = threading.Event(), routes.encode_images

    def held(*args: Any) -> Any:
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(routes, "encode_images", held)
    try:
        t0 = time.monotonic()
        late = post_raw(client, b'{"class_label": 1, "timeout_s": %g}' % TIMEOUT_MIN_S)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert late.status_code == 504 and TIMEOUT_MIN_S - 0.01 < elapsed < TIMEOUT_MIN_S + MARGIN_S, (late.text, elapsed)


def test_a_long_accept_header_is_406_with_a_short_message(client: TestClient) -> None:
    r = client.post("/generate", json={"class_label": 1}, headers={"Accept": "image/gif;q=0.5, " * 500})
    assert r.status_code == 406 and len(r.json()["detail"]) < 400


def test_the_body_deadline_answers_408_and_closes_the_connection() -> None:
    """At the ASGI level: a client that sends part of the body and then nothing more."""
    sent: list[dict[str, Any]] = []
    metrics = ServeMetrics(["baseline"], 1, 1)

    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not see a body that never arrived")

    async def receive() -> dict[str, Any]:
        if not sent and not getattr(receive, "gave", False):
            receive.gave = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b'{"class', "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    limits = BodyLimits(never_called, max_bytes=1000, timeout_s=0.05, metrics=metrics)
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"100")]}
    t0 = time.monotonic()
    asyncio.run(limits(scope, receive, send))
    assert time.monotonic() - t0 < 2
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert "body_timeout_s" in json.loads(sent[1]["body"])["detail"]
    assert metrics.rejections.labels(Rejection.BODY_TIMEOUT)._value.get() == 1


# --- a live server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(demo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {
        "VAR_VARIANTS": "baseline",
        "VAR_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "VAR_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "VAR_QUEUE_CAPACITY": "2",
        "VAR_MAX_BATCH_SIZE": "1",
        "VAR_MAX_IMAGES_PER_REQUEST": "1",
        "VAR_LIMIT_CONCURRENCY": str(CONNECTION_LIMIT),
        "VAR_KEEP_ALIVE_S": "1",
    }
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with live_server_process(demo_folder, log, **env) as s:
        yield s
        assert s.proc.poll() is None, "the server is still up after every hostile input"
    assert "Traceback" not in log.read_text()


def connect(server: LiveServer) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def answer_or_close(sock: socket.socket, limit_s: float) -> tuple[int | None, float]:
    """(the status of the answer, or None when the server closed without one; seconds it took)."""
    t0, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - t0


def closed(sock: socket.socket, limit_s: float = 3) -> bool:
    """Whether the server closes the connection (after any answer) within limit_s."""
    end = time.monotonic() + limit_s
    try:
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def dribble(sock: socket.socket, data: bytes, limit_s: float) -> tuple[int | None, float]:
    """Send `data` a byte every 0.1 s until the server answers or closes (or limit_s passes)."""
    t0 = time.monotonic()
    for byte in data:
        if time.monotonic() - t0 > limit_s:
            break
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([sock], [], [], 0.1)[0]:
            break
    status, _ = answer_or_close(sock, limit_s)
    return status, time.monotonic() - t0


def alive(server: LiveServer) -> bool:
    return httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_a_body_sent_a_byte_at_a_time_gets_408_and_a_closed_connection(server: LiveServer) -> None:
    body = json.dumps({"class_label": 1, "class_name": None, "seed": 1, "variant": "baseline"}).encode()
    head = b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with closing(connect(server)) as sock:
        sock.sendall(head % len(body))
        status, seconds = dribble(sock, body, BODY_TIMEOUT_S + MARGIN_S)
        assert status in (408, None) and seconds < BODY_TIMEOUT_S + MARGIN_S, (status, seconds)
        assert closed(sock)
    assert alive(server)


def test_headers_sent_a_byte_at_a_time_get_408_and_a_closed_connection(server: LiveServer) -> None:
    with closing(connect(server)) as sock:
        status, seconds = dribble(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100, 10)
        assert status in (408, None) and seconds < HEADER_TIMEOUT_S + MARGIN_S, (status, seconds)
        assert closed(sock)
    assert alive(server)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_deadline(server: LiveServer) -> None:
    with closing(connect(server)) as sock:
        status, seconds = answer_or_close(sock, HEADER_TIMEOUT_S + MARGIN_S)
        assert status in (408, None) and HEADER_TIMEOUT_S * 0.8 < seconds < HEADER_TIMEOUT_S + MARGIN_S
        assert closed(sock)


@pytest.mark.parametrize(
    ("size", "end"),
    [(20_000, b""), (1_000_000, b""), (1_000_000, b"\r\n\r\n")],
    ids=["20 KB never ending", "1 MB never ending", "1 MB ending"],
)
def test_oversize_headers_get_431_and_a_closed_connection(server: LiveServer, size: int, end: bytes) -> None:
    """Headers still incomplete past max_header_bytes (16 KiB) are refused: 20 KB that never end, or 1 MB, which
    arrives in several reads. (A header block that arrives whole in one read, up to uvloop's 250 KB, is
    parsed: a bound on memory all the same.)"""
    with closing(connect(server)) as sock:
        with suppress(BrokenPipeError, ConnectionResetError):  # closed before all of it was sent
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * size + end)
        status, _ = answer_or_close(sock, 5)
        assert status in (431, None) and closed(sock)
    assert alive(server)


BODY = b'{"class_label": 1}'
CHUNKED = b"12\r\n" + BODY + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 18\r\nContent-Length: 19\r\n\r\n" + BODY,
        b"Content-Length: 18\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED,
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED,
        b"Transfer-Encoding: gzip\r\n\r\n" + BODY,
        b"Transfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED,
    ],
    ids=["two lengths", "length and chunked", "two codings", "gzip", "chunked then gzip"],
)
def test_a_body_framed_two_ways_is_400_and_the_connection_closed(server: LiveServer, framing: bytes) -> None:
    """What request smuggling through a proxy relies on: the parser refuses every ambiguous framing."""
    with closing(connect(server)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + framing)
        assert answer_or_close(sock, 5)[0] == 400 and closed(sock)
    assert alive(server)


def test_oversize_bodies_get_413_announced_or_chunked(server: LiveServer) -> None:
    with closing(connect(server)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")
        sock.sendall(b"Content-Length: 1000000000\r\n\r\n" + b"{" * 1000)
        assert answer_or_close(sock, 5)[0] == 413 and closed(sock)
    with closing(connect(server)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        with suppress(BrokenPipeError, ConnectionResetError):  # closed after the answer
            for _ in range(100):  # up to 1.6 MB
                sock.sendall(b"4000\r\n" + b" " * 0x4000 + b"\r\n")
        assert answer_or_close(sock, 5)[0] in (413, None) and closed(sock)
    assert alive(server)


def test_deep_json_over_the_wire_is_422_or_413_never_500(server: LiveServer) -> None:
    deep = b'{"class_name": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert httpx.post(f"{server.url}/generate", content=deep, timeout=30).status_code == 422
    deeper = b"[" * 100_000
    assert httpx.post(f"{server.url}/generate", content=deeper, timeout=30).status_code == 413


def test_connections_beyond_the_limit_get_503_and_the_server_stays_up(server: LiveServer) -> None:
    """uvicorn counts open connections, idle ones too: with CONNECTION_LIMIT + 14 open at once, every request
    is 503; once they close, requests are served again."""
    socks = [connect(server) for _ in range(CONNECTION_LIMIT + 14)]
    try:
        time.sleep(0.2)  # accepted by now
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        statuses = [answer_or_close(s, 5)[0] for s in socks]
    finally:
        for s in socks:
            s.close()
    assert set(statuses) == {503}, statuses
    end = time.monotonic() + 10
    while not alive(server):
        assert time.monotonic() < end, "the server did not recover"
        time.sleep(0.1)


def test_memory_stays_bounded_under_repeated_hostile_inputs(server: LiveServer) -> None:
    def rss() -> float:
        return scrape(f"{server.url}/metrics")["process_resident_memory_bytes", NO_LABELS]

    hostile = [
        b'{"class_name": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"class_name": "' + b"x" * 15_000 + b'"}',
        b'{"class_label": ' + b"9" * 4000 + b"}",
        b"{" + b",".join(b'"f%d": 1' % i for i in range(1000)) + b"}",
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body in hostile:  # once before measuring: first-use allocations
            c.post("/generate", content=body)
        before = rss()
        for _ in range(25):
            for body in hostile:
                assert c.post("/generate", content=body).status_code == 422
    grown = rss() - before
    assert grown < 32 * 2**20, f"resident memory grew {grown / 2**20:.1f} MiB over 100 hostile requests"
