"""uvicorn's h11 protocol with a deadline for the request line and headers.

uvicorn has none: a client that opens a connection and sends nothing, or its headers a byte at a time, holds
a connection (one of `limit_concurrency`) for as long as it likes. Here the request line and headers must be
complete `header_timeout_s` after the connection opens, or after the first byte of a later request on a
kept-alive connection (an idle kept-alive connection is closed by uvicorn's own keep-alive timeout); else the
client gets 408 and the connection is closed. The body has its own deadline (`middleware.BodyLimits`).

h11 rather than httptools: h11 bounds the request line and headers (`h11_max_incomplete_event_size`, 400
beyond it); httptools keeps every header it is sent. Parsing costs microseconds beside a generation.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
_BODY = json.dumps({"detail": "request line and headers not received in time"}).encode()
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout_s = 10.0  # a subclass per server sets it: `with_header_timeout`

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()
        elif self._deadline is None:  # the first bytes of a request on a kept-alive connection
            self._arm()

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
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


def with_header_timeout(seconds: float) -> type[H11Protocol]:
    """The protocol class to give uvicorn.Config(http=...)."""

    class Protocol(HeaderDeadlineH11Protocol):
        header_timeout_s = seconds

    return Protocol
