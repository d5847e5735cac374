"""The real server process (uvicorn on 127.0.0.1): SIGTERM stops accepting, finishes accepted work, exits."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import LiveServer, live_server_process


def wait_for(condition: str, check: Callable[[], bool], limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {condition}"
        time.sleep(0.01)


def images_in_progress(server: LiveServer) -> bool:
    text = httpx.get(f"{server.url}/metrics").text
    return any(
        line.startswith(("var_inflight_images", "var_queue_depth_images")) and not line.endswith(" 0.0")
        for line in text.splitlines()
    )


@pytest.mark.slow
def test_sigterm_drains_accepted_work_then_exits(demo_folder: Path, tmp_path: Path) -> None:
    env = {"VAR_MAX_BATCH_SIZE": "1", "VAR_MAX_IMAGES_PER_REQUEST": "48", "VAR_DRAIN_GRACE_S": "120"}
    # the default variants include litevar, and the random-weight folder has no window plan: calibrate it at load
    env["VAR_CALIBRATE_MISSING_PLANS"] = "true"
    with live_server_process(demo_folder, tmp_path / "server.log", **env) as server, ThreadPoolExecutor(1) as pool:
        body = {"class_label": 1, "num_images": 48, "top_k": 0, "top_p": 0}
        accepted = pool.submit(httpx.post, f"{server.url}/generate", json=body, timeout=300)
        wait_for("the request to be queued", lambda: images_in_progress(server))
        server.proc.send_signal(signal.SIGTERM)
        wait_for("draining", lambda: httpx.get(f"{server.url}/readyz").json()["status"] == "draining")
        late = httpx.post(f"{server.url}/generate", json={"class_label": 1})
        assert late.status_code == 503 and "draining" in late.json()["detail"] and late.headers["retry-after"]
        answer = accepted.result(timeout=300)
        assert answer.status_code == 200 and len(answer.json()["images"]) == 48
        # uvicorn re-raises the handled SIGTERM after its graceful shutdown
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "drained; 0 request(s) were not finished" in (tmp_path / "server.log").read_text()


def test_server_answers_on_loopback(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "alive"}
    r = httpx.post(f"{live_server.url}/generate", json={"class_name": "Sneaker"}, headers={"Accept": "image/webp"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"


def test_a_server_that_cannot_load_says_why_at_once(demo_folder: Path, tmp_path: Path) -> None:
    """A windowed variant of a folder without a window plan refuses to load; waiting for readiness stops at
    the failure (not after the readiness time limit) with its cause."""
    refusal = r"MissingWindowPlan: .*`python -m app\.compress calibrate --model "
    windows = {"VAR_VARIANTS": "windows"}
    with pytest.raises(RuntimeError, match=refusal), live_server_process(demo_folder, tmp_path / "log", **windows):
        pass
