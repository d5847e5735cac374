"""Health and the service's life through the API: the watchdog (a stuck batch, a dead scheduler) and a failed
load turn /healthz to 503 naming the reason; non-finite pixels answer 500, never an image; the deadline
covers encoding; a drain that begins while loading or warming up is final."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import app.serve.http.routes as api_module
import app.serve.warmup as warmup_module
from app.model.pipeline import Generation, VARPipeline
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams
from app.model.timing import StageTimer
from app.serve.app import create_app
from app.serve.engine import NotAccepting, Phase
from app.serve.service import Service
from tests.serve.conftest import Gated, Recording, crash_the_scheduler, gated_load, serve_settings, serving

BODY = {"class_label": 1, "top_k": 0}


def wait_until(what: str, check: Callable[[], bool], limit_s: float = 30) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def metric(client: TestClient, line_start: str) -> str:
    return next(line for line in client.get("/metrics").text.splitlines() if line.startswith(line_start))


def test_a_stuck_batch_turns_healthz_to_503_naming_it_until_the_batch_ends(
    demo_folder: Path, demo_pipeline: VARPipeline
) -> None:
    gated = Gated(demo_pipeline)
    with serving(serve_settings(demo_folder, watchdog_s=0.3)) as c, ThreadPoolExecutor(1) as pool:
        c.app.state.service.engine.pipelines["baseline"] = gated
        assert c.get("/healthz").json() == {"status": "alive"} and metric(c, "var_healthy ") == "var_healthy 1.0"
        stuck = pool.submit(c.post, "/generate", json=BODY)
        assert gated.entered.wait(30)
        wait_until("the watchdog", lambda: c.get("/healthz").status_code == 503)
        health = c.get("/healthz").json()
        assert health["status"] == "unhealthy" and health["reason"] == "batch_stuck" and "has run" in health["error"]
        assert c.get("/readyz").status_code == 503
        assert metric(c, "var_healthy ") == "var_healthy 0.0"
        refused = c.post("/generate", json=BODY)
        assert refused.status_code == 503 and "unhealthy" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "30"
        gated.release.set()
        assert stuck.result(30).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_a_dead_scheduler_turns_healthz_to_503_and_fails_accepted_requests_with_500(
    demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_the_scheduler(monkeypatch)
    with serving(serve_settings(demo_folder)) as c:
        failed = c.post("/generate", json=BODY)
        assert failed.status_code == 500 and failed.json()["error_id"] in failed.json()["detail"]
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["reason"] == "scheduler_dead"
        assert "injected scheduler bug" in health.json()["error"]
        assert c.post("/generate", json=BODY).status_code == 503
        assert metric(c, "var_healthy ") == "var_healthy 0.0"


def test_a_failed_load_asks_for_a_restart_not_for_quick_retries(tmp_path: Path) -> None:
    with TestClient(create_app(serve_settings(tmp_path / "missing"))) as c:
        wait_until("the load to fail", lambda: c.get("/readyz").json()["status"] != "loading")
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "failed" and health.json()["reason"] == "load_failed"
        assert "missing" in health.json()["error"]
        refused = c.post("/generate", json=BODY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
        assert "model failed to load" in refused.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "60"
        assert metric(c, "var_healthy ") == "var_healthy 0.0"


class NonFinite(Recording):
    """Images with one NaN pixel."""

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation:
        gen = super().generate(labels, params, seeds=seeds, timer=timer)
        images = gen.images.clone()  # a copy: the pipeline's tensors are inference tensors
        images[:, :, 0, 0] = float("nan")
        return dataclasses.replace(gen, images=images)

    def finish(self, rollout: Rollout, timer: StageTimer) -> torch.Tensor:  # the scale policy's decode
        images = super().finish(rollout, timer).clone()
        images[:, :, 0, 0] = float("nan")
        return images


def test_nan_pixels_answer_500_with_an_error_id_never_an_image(demo_folder: Path, demo_pipeline: VARPipeline) -> None:
    with serving(serve_settings(demo_folder)) as c:
        c.app.state.service.engine.pipelines["baseline"] = NonFinite(demo_pipeline)
        for accept in ("application/json", "image/png"):
            r = c.post("/generate", json=BODY, headers={"Accept": accept})
            assert r.status_code == 500 and r.headers["content-type"] == "application/json"
            assert "non-finite output" in r.json()["detail"] and r.json()["error_id"] in r.json()["detail"]
        assert metric(c, "var_nonfinite_images_total{") == 'var_nonfinite_images_total{variant="baseline"} 2.0'
        assert c.get("/healthz").status_code == 200  # a bad output is the request's failure, not the process's


def test_an_answer_never_arrives_after_timeout_s_even_when_encoding_is_slow(
    demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoding = threading.Event()
    release = threading.Event()
    real = api_module.encode_images

    def slow_encode(images: torch.Tensor, fmt: str) -> list[bytes]:
        encoding.set()
        assert release.wait(30)
        return real(images, fmt)

    timeout_s = 2.0
    with serving(serve_settings(demo_folder)) as c:
        assert c.post("/generate", json=BODY).status_code == 200  # the first batch of the process is slower
        monkeypatch.setattr(api_module, "encode_images", slow_encode)
        t0 = time.monotonic()
        r = c.post("/generate", json=BODY | {"timeout_s": timeout_s})
        elapsed = time.monotonic() - t0
        release.set()
        assert encoding.is_set()
        assert r.status_code == 504 and "not encoded in time" in r.json()["detail"]
        # the answer is due at timeout_s; the encoding would have taken 30 s. The margin covers the request's
        # way to the engine and back on a loaded machine
        assert elapsed < timeout_s + 2.0


def assert_never_started(service: Service) -> None:
    assert service.phase is Phase.DRAINING and service.metrics.registry.get_sample_value("var_ready") == 0
    with pytest.raises(NotAccepting, match="draining"):
        service.ready_engine()
    if service.engine is not None:
        assert service.engine._scheduler is None
        with pytest.raises(RuntimeError, match="starts once"):
            service.engine.start()


def test_a_drain_while_loading_means_the_service_never_becomes_ready(
    demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = gated_load(monkeypatch)
    service = Service(serve_settings(demo_folder))

    async def scenario() -> None:
        service.start()
        await service.drain()
        release.set()
        await service.wait_loaded()  # the load ends after the drain
        assert_never_started(service)
        await service.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_drain_while_warming_up_means_the_engine_is_never_started(
    demo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(serve_settings(demo_folder, warmup=True, max_batch_size=2))
    warming = threading.Event()
    real = warmup_module.compute

    def observed(*args: Any, **kwargs: Any) -> Any:
        warming.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(warmup_module, "compute", observed)

    async def scenario() -> None:
        service.start()
        assert await asyncio.to_thread(warming.wait, 60)  # the first warm-up batch is running
        await service.drain()
        await service.wait_loaded()
        assert_never_started(service)
        await service.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
