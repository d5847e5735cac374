"""The server launcher of the benchmarks and tests, on a stand-in server (a few lines of http.server that answer
/readyz as told): the port and settings it is given, the waits (ready with every variant, only answering,
failed, a variant failed, exited, too slow) and the stop (SIGTERM, SIGKILL after the grace, or at once)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.bench.launcher import launched

STAND_IN = r"""
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

mode = sys.argv[1]
if mode == "exit":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
status, body = {
    "ready": (200, {"status": "ready"}),
    "stubborn": (200, {"status": "ready"}),
    "failed": (503, {"status": "failed", "error": "MissingWindowPlan: calibrate first"}),
    "calibrating": (200, {"status": "ready", "variants": {"a": {"state": "ready"}, "b": {"state": "calibrating"}}}),
    "variant-failed": (200, {"status": "ready", "variants": {"b": {"state": "failed", "error": "RuntimeError: no"}}}),
}.get(mode, (503, {"status": "loading"}))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        data = json.dumps(body | {"extra": os.environ.get("STAND_IN_EXTRA")}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


print("stand-in on", os.environ["VAR_HOST"], os.environ["VAR_PORT"], flush=True)
HTTPServer((os.environ["VAR_HOST"], int(os.environ["VAR_PORT"])), Handler).serve_forever()
"""


def stand_in(mode: str) -> list[str]:
    return [sys.executable, "-c", STAND_IN, mode]


def test_ready_when_entered_with_its_settings_and_stopped_by_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with launched({"STAND_IN_EXTRA": "x"}, log, command=stand_in("ready"), ready_limit_s=30) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.log == log
        assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "extra": "x"}
        assert server.proc.poll() is None
    assert server.proc.returncode == -signal.SIGTERM
    assert f"stand-in on 127.0.0.1 {server.url.rsplit(':', 1)[1]}" in log.read_text()


def test_only_answering_is_enough_when_asked_and_a_timeout_otherwise() -> None:
    with launched({}, command=stand_in("loading"), ready=False, ready_limit_s=30) as server:
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "loading"
    loading = launched({}, command=stand_in("loading"), ready_limit_s=1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not ready after 1 s"), loading:
        pass
    assert time.monotonic() - t0 < 20


def test_a_server_is_ready_once_every_variant_serves_not_only_its_default_one() -> None:
    calibrating = launched({}, command=stand_in("calibrating"), ready_limit_s=1)
    with pytest.raises(TimeoutError, match="not ready after 1 s"), calibrating:
        pass
    failed = launched({}, command=stand_in("variant-failed"), ready_limit_s=600)
    with pytest.raises(RuntimeError, match=r"failed to start variants: \{'b': 'RuntimeError: no'\}"), failed:
        pass


def test_a_failed_load_or_an_exit_stops_the_wait_at_once_with_the_cause() -> None:
    failed = launched({}, command=stand_in("failed"), ready_limit_s=600)
    exited = launched({}, command=stand_in("exit"), ready_limit_s=600)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to load: MissingWindowPlan: calibrate first"), failed:
        pass
    with pytest.raises(RuntimeError, match="exited with status 3"), exited:
        pass
    assert time.monotonic() - t0 < 30  # not the 600 s of the limit


def test_sigkill_after_the_grace_or_at_once_without_one() -> None:
    with launched({}, command=stand_in("stubborn"), ready_limit_s=30, stop_grace_s=0.5) as server:
        t0 = time.monotonic()
    assert server.proc.returncode == -signal.SIGKILL and time.monotonic() - t0 >= 0.5  # SIGTERM ignored
    with launched({}, command=stand_in("ready"), ready_limit_s=30, stop_grace_s=0) as server:
        pass
    assert server.proc.returncode == -signal.SIGKILL  # no SIGTERM, no drain
