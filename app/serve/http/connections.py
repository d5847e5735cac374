"""uvicorn's httptools protocol with a deadline and a size bound for the request line and headers.

uvicorn has neither: a client that opens a connection and sends nothing, or its headers a byte at a time, holds
a connection (one of `limit_concurrency`) for as long as it likes, and httptools keeps every header byte it is
sent until the headers end. Here the request line and headers must be complete `header_timeout_s` after the
connection opens, or after the first byte of a later request on a kept-alive connection (an idle kept-alive
connection is closed by uvicorn's own keep-alive timeout), else the client gets 408; and they must end within
`max_header_bytes`, else 431. Both answers close the connection. The body has its own limits
(`middleware.BodyLimits`).

httptools (llhttp, in C) rather than h11: it takes a third of the CPU per request that h11 does, which under
overload is CPU taken from the batch being computed (docs/benchmarks.md, "What a refusal costs"). The byte
count is of what arrived while headers were awaited, so it can pass the bound by at most one read (250 KB on
uvloop, 256 KiB on asyncio's loop).
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def _answer(status: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


REQUEST_TIMEOUT = _answer("408 Request Timeout", "request line and headers not received in time")
HEADERS_TOO_LARGE = _answer(
    "431 Request Header Fields Too Large", "request line and headers larger than max_header_bytes"
)


class BoundedHeadersProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # a subclass per server sets both: `bounded_headers`
    max_header_bytes = 16_384

    _deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._awaiting_headers():
            self._disarm()
            self._header_bytes = 0
            return
        if self._deadline is None:  # the first bytes of a request on a kept-alive connection
            self._arm()
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            log.debug("%s: headers over %d bytes; closing", self.client, self.max_header_bytes)
            self._refuse(HEADERS_TOO_LARGE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_headers(self) -> bool:
        """No request is being answered: the next one's headers are what the connection waits for."""
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self._awaiting_headers() and not self.transport.is_closing():
            log.debug("%s: headers not complete within %g s; closing", self.client, self.header_timeout_s)
            self._refuse(REQUEST_TIMEOUT)

    def _refuse(self, answer: bytes) -> None:
        self._disarm()
        self.transport.write(answer)
        self.transport.close()


def bounded_headers(timeout_s: float, max_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn.Config(http=...)."""

    class Protocol(BoundedHeadersProtocol):
        header_timeout_s = timeout_s
        max_header_bytes = max_bytes

    return Protocol
