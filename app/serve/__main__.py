"""`python -m app.serve`: serve the configured model with uvicorn (settings: VAR_* environment variables).

SIGTERM (or Ctrl+C): stop accepting (503, /readyz 503), let accepted work finish within
VAR_DRAIN_GRACE_S, then exit (uvicorn re-raises the signal: status -15 / 143 for SIGTERM). A second signal
exits at once, with status 128 + the signal's number (143 for SIGTERM, 130 for Ctrl+C), answering nothing
more: uvicorn alone would start a graceful shutdown on it, which waits for the drain it interrupts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from types import FrameType
from typing import NoReturn

import uvicorn
from fastapi import FastAPI

from app.serve.app import create_app
from app.serve.http.connections import bounded_headers
from app.serve.service import Service
from app.serve.settings import ServeSettings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            super().handle_exit(sig, frame)
            return
        if self._draining:
            exit_now(sig)
        self._draining = True
        logging.getLogger(__name__).info("signal %d: draining (grace %g s)", sig, self.service.settings.drain_grace_s)
        self._loop.call_soon_threadsafe(self._drain_then_exit, sig)

    def _drain_then_exit(self, sig: int) -> None:
        self.service.drain().add_done_callback(lambda _: super(DrainingServer, self).handle_exit(sig, None))


def exit_now(sig: int) -> NoReturn:
    """The second signal: exit without waiting for anything (the worker thread, open connections)."""
    logging.getLogger(__name__).warning("signal %d again: exiting now, accepted work unfinished", sig)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(128 + sig)


def main() -> int:
    settings = ServeSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings), app.state.service).run()
    return 0


def uvicorn_config(app: FastAPI, settings: ServeSettings) -> uvicorn.Config:
    """How the service runs under uvicorn (`python -m app.bench refusals` runs it so too)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 5,
        # connection limits (docs/serving.md#connections): httptools with a deadline and a size bound for the
        # request line and headers; no WebSocket; beyond the connection limit uvicorn answers 503
        http=bounded_headers(settings.header_timeout_s, settings.max_header_bytes),
        ws="none",
        limit_concurrency=settings.connection_limit,
        backlog=settings.backlog,
        timeout_keep_alive=settings.keep_alive_s,
    )


if __name__ == "__main__":
    sys.exit(main())
