"""The server as a child process, for the benchmarks and the tests: `python -m app.serve` (or a stand-in
command that ends in its main) on a free 127.0.0.1 port, ready when entered, stopped on exit.

Stopping is graceful by default (SIGTERM, which drains, then SIGKILL after a grace), as an operator would;
tests that signal the process themselves ask for no grace, so that a failed test never waits on a drain.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVE_COMMAND = (sys.executable, "-m", "app.serve")


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:<port>
    proc: subprocess.Popen[bytes]
    log: Path | None  # its stdout and stderr, when kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    url: str, proc: subprocess.Popen[bytes] | None = None, limit_s: float = 600, *, answering: bool = False
) -> None:
    """Until GET /readyz answers 200 with every variant it lists ready (the server is ready once its default
    variant serves; the others may still be starting), or answers at all (`answering`: the server is up,
    maybe still loading). RuntimeError as soon as the process exits, the server reports that its load failed
    or a variant failed to start (it will never be ready: say why now, not after limit_s); TimeoutError after
    limit_s."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5)
        except httpx.TransportError:
            ready = None
        if ready is not None and (answering or every_variant_ready(ready)):
            return
        if ready is not None and ready.json().get("status") == "failed":
            raise RuntimeError(f"server failed to load: {ready.json().get('error')}")
        failed = {name: v.get("error") for name, v in variants_of(ready).items() if v.get("state") == "failed"}
        if failed:
            raise RuntimeError(f"server failed to start variants: {failed}")
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {limit_s} s")


def variants_of(readyz: httpx.Response | None) -> dict[str, dict[str, object]]:
    """The variants a /readyz answer lists, by name (none for a server that lists none)."""
    variants = readyz.json().get("variants") if readyz is not None else None
    return variants if isinstance(variants, dict) else {}


def every_variant_ready(readyz: httpx.Response) -> bool:
    return readyz.status_code == 200 and all(v.get("state") == "ready" for v in variants_of(readyz).values())


def stop_process(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within grace_s; grace_s 0: SIGKILL at once."""
    if proc.poll() is not None:
        return
    if grace_s > 0:
        proc.terminate()
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


@contextmanager
def launched(
    env: Mapping[str, str],
    log: Path | None = None,
    *,
    command: Sequence[str] = SERVE_COMMAND,
    ready: bool = True,
    ready_limit_s: float = 600,
    stop_grace_s: float = 60,
) -> Iterator[ServerProcess]:
    """`command` with this process's environment plus `env`, on a free loopback port (VAR_HOST, VAR_PORT
    always set here); output to `log` (else discarded). Entered once /readyz answers 200 (ready=False: once
    it answers at all), within ready_limit_s (else TimeoutError, or RuntimeError if it exited or failed to
    load); stopped on exit with `stop_process(proc, stop_grace_s)`."""
    port = free_port()
    full_env = os.environ | dict(env) | {"VAR_HOST": "127.0.0.1", "VAR_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(list(command), env=full_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc, ready_limit_s, answering=not ready)
            yield ServerProcess(url, proc, log)
        finally:
            stop_process(proc, stop_grace_s)
    finally:
        if not isinstance(out, int):
            out.close()
