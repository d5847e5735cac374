"""The real server process (uvicorn on 127.0.0.1): SIGTERM stops accepting, finishes accepted work, exits; a
second SIGTERM exits at once; a SIGTERM while loading exits without ever becoming ready; under load with
clients that go away, every request is answered and the process exits within the drain grace.

Some tests start the server through LAUNCHER, which slows every batch or the load down by a fixed time, so
that a signal surely arrives while work is in progress (the demo model computes in milliseconds)."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.bench import launcher
from app.bench.prometheus_text import scrape, total
from tests.serve.conftest import LiveServer, live_server_process

LAUNCHER = """
import sys, time
import app.model.pipeline as pipeline
import app.serve.service as service
from app.serve.__main__ import main

slow_batch_s, slow_load_s = float(sys.argv[1]), float(sys.argv[2])
generate, load_checkpoint = pipeline.VARPipeline.generate, service.load_checkpoint

def slow_generate(self, *args, **kwargs):
    time.sleep(slow_batch_s)
    return generate(self, *args, **kwargs)

def slow_load(*args, **kwargs):
    time.sleep(slow_load_s)
    return load_checkpoint(*args, **kwargs)

pipeline.VARPipeline.generate = slow_generate
service.load_checkpoint = slow_load
sys.exit(main())
"""


def wait_for(condition: str, check: Callable[[], bool], limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {condition}"
        time.sleep(0.01)


def images_in_progress(server: LiveServer) -> bool:
    samples = scrape(f"{server.url}/metrics")
    return total(samples, "var_inflight_images") + total(samples, "var_queue_depth_images") > 0


@contextmanager
def launched(
    folder: Path, log: Path, *, slow_batch_s: float = 0.0, slow_load_s: float = 0.0, ready: bool = True, **env: str
) -> Iterator[LiveServer]:
    """`python -m app.serve`'s main through LAUNCHER on a free 127.0.0.1 port; ready when entered, or only
    answering (ready=False). Killed on exit if still running: the tests send their own signals, and a failed
    one should not wait on a drain."""
    values = {"VAR_MODEL_DIR": str(folder), "VAR_VARIANTS": "baseline", "VAR_WARMUP": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", LAUNCHER, str(slow_batch_s), str(slow_load_s)]
    with launcher.launched(
        values | env, log, command=command, ready=ready, ready_limit_s=120, stop_grace_s=0
    ) as server:
        yield server


def readiness(url: str) -> str | None:
    try:
        status: str = httpx.get(f"{url}/readyz", timeout=5).json()["status"]
        return status
    except httpx.TransportError:
        return None


def outcome_of(url: str, body: dict[str, Any]) -> int | str:
    try:
        return httpx.post(f"{url}/generate", json=body, timeout=120).status_code
    except httpx.TransportError as e:
        return type(e).__name__


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once(demo_folder: Path, tmp_path: Path) -> None:
    """The first SIGTERM starts a drain that would take 16 s (16 images of a second each, grace 120 s); the
    second one ends the process at once with status 128 + 15."""
    env = {"VAR_MAX_BATCH_SIZE": "1", "VAR_DRAIN_GRACE_S": "120"}
    log = tmp_path / "server.log"
    with launched(demo_folder, log, slow_batch_s=1.0, **env) as server, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(outcome_of, server.url, {"class_label": 1, "num_images": 16, "top_k": 0})
        wait_for("the request to be computed", lambda: images_in_progress(server))
        server.proc.send_signal(signal.SIGTERM)
        wait_for("draining", lambda: readiness(server.url) == "draining")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(timeout=10)
        print(f"second SIGTERM to exit: {time.monotonic() - t0:.3f} s")
        assert status == 128 + signal.SIGTERM
        assert accepted.result(timeout=60) not in (200, 503)  # no answer: the process is gone
    assert "exiting now, accepted work unfinished" in log.read_text()


@pytest.mark.slow
def test_sigterm_while_loading_exits_without_ever_becoming_ready(demo_folder: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with launched(demo_folder, log, slow_load_s=120.0, ready=False, VAR_DRAIN_GRACE_S="30") as server:
        assert readiness(server.url) == "loading"
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(timeout=30)  # the load would take 120 s more
        print(f"SIGTERM while loading to exit: {time.monotonic() - t0:.3f} s")
        assert status in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "signal 15: draining" in text and "app.serve.service: ready:" not in text


async def load_then_sigterm(server: LiveServer, requests: int, cancelled: int) -> tuple[list[int | str], float]:
    """`requests` concurrent requests of 1 or 2 images; `cancelled` of them are given up by the client at a
    random moment (closing the connection); SIGTERM once 3 answers came. Returns each request's outcome
    (status, "cancelled" or the transport error) and the seconds from SIGTERM to the process's exit."""
    rng = random.Random(16)
    give_up_s = {i: rng.uniform(0.05, 2.0) for i in rng.sample(range(requests), cancelled)}
    answers = asyncio.Semaphore(0)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def one(i: int) -> int | str:
            body = {"class_label": i % 10, "num_images": 1 + i % 2, "seed": i, "top_k": 0}
            try:
                r = await asyncio.wait_for(client.post("/generate", json=body), give_up_s.get(i))
            except TimeoutError:
                return "cancelled"
            except httpx.TransportError as e:
                return type(e).__name__
            answers.release()
            return r.status_code

        tasks = [asyncio.create_task(one(i)) for i in range(requests)]
        for _ in range(3):
            await asyncio.wait_for(answers.acquire(), 120)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*tasks)
        await asyncio.to_thread(server.proc.wait, 60)
        return outcomes, time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_and_exits_within_the_grace(demo_folder: Path, tmp_path: Path) -> None:
    grace_s = 2.0
    env = {"VAR_MAX_BATCH_SIZE": "4", "VAR_DRAIN_GRACE_S": str(grace_s)}
    with launched(demo_folder, tmp_path / "server.log", slow_batch_s=0.3, **env) as server:
        outcomes, exit_s = asyncio.run(load_then_sigterm(server, requests=30, cancelled=8))
        status = server.proc.returncode
    counts = Counter(outcomes)
    print(f"SIGTERM under load: outcomes {dict(counts)}, exit {exit_s:.3f} s after the signal (grace {grace_s} s)")
    assert set(counts) <= {200, 503, 504, "cancelled"}, counts
    assert counts[200] >= 3 and counts["cancelled"] >= 1
    assert status in (0, -signal.SIGTERM)
    assert exit_s <= grace_s + 5


@pytest.mark.slow
def test_sigterm_drains_accepted_work_then_exits(demo_folder: Path, tmp_path: Path) -> None:
    env = {"VAR_MAX_BATCH_SIZE": "1", "VAR_MAX_IMAGES_PER_REQUEST": "48", "VAR_DRAIN_GRACE_S": "120"}
    # the random-weight folder has no plans, and the plans a service calibrates are saved beside the checkpoint,
    # into a folder every test shares: the baseline alone, which takes none
    env["VAR_VARIANTS"] = "baseline"
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
    """A windowed default variant of a folder without a window plan, calibrating switched off, fails the load;
    waiting for readiness stops at the failure (not after the readiness time limit) with its cause."""
    refusal = r"MissingWindowPlan: .*`python -m app\.compress calibrate --model "
    windows = {"VAR_VARIANTS": "windows", "VAR_CALIBRATE_MISSING_PLANS": "false"}
    with pytest.raises(RuntimeError, match=refusal), live_server_process(demo_folder, tmp_path / "log", **windows):
        pass
