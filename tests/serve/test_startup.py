"""Starting from released weights: the baseline serves while a compressed variant calibrates its plans in the
background (503 naming what it waits for, its progress in /models and /readyz), which are then saved beside
the checkpoint; a variant that fails to start is reported while the others serve; eager variants are warmed
once, compiled ones at the batch sizes that need graphs; a drain stops a calibration at its next step."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import app.model.progress as progress_module
import app.serve.startup as startup_module
import app.serve.warmup as warmup_module
from app.bench.prometheus_text import by_label
from app.compress import VARIANTS
from app.compress.plans import PlanOrigin
from app.compress.sharing import SHARING_PLAN_FILE
from app.compress.windows import PLAN_FILE
from app.model.checksums import SUMS_FILE, sums_mismatches
from app.model.config import DEMO
from app.model.kv_cache import scale_steps
from app.model.progress import Progress
from app.serve.app import create_app
from app.serve.engine import VariantState
from app.serve.http.encoding import encode_images
from app.serve.models import load_model
from app.serve.service import Service
from app.serve.warmup import warmup_batch_sizes
from tests.conftest import DEMO as DEMO_FOLDER
from tests.serve.conftest import serve_settings, serving, wait_ready, wait_until_settled
from tests.serve.test_metrics import scrape

BODY = {"class_label": 1, "top_k": 0}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class HeldCalibration:
    """The service's calibration, held once it is at its third step until `release` (`reached`: it waits
    there); `progress` is the calibration's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.reached, self.release = threading.Event(), threading.Event()
        self.progress: Progress | None = None
        real = startup_module.calibrated

        def held(pipe: Any, kinds: Any, calibration: Any, progress: Progress) -> Any:
            self.progress = progress
            progress.listeners.append(self._hold)
            return real(pipe, kinds, calibration, progress)

        monkeypatch.setattr(startup_module, "calibrated", held)

    def _hold(self, progress: Progress) -> None:
        if progress.done == 2 and not self.release.is_set():
            self.reached.set()
            assert self.release.wait(60), "calibration never released"


@pytest.fixture
def held_calibration(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldCalibration]:
    held = HeldCalibration(monkeypatch)
    yield held
    held.release.set()  # a failed test must not leave the calibration thread waiting


def wait_for(what: str, check: Callable[[], bool], limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def variant_entry(client: TestClient, name: str) -> dict[str, Any]:
    return next(v for v in client.get("/models").json()["variants"] if v["name"] == name)


def test_the_baseline_serves_while_litevar_calibrates_then_litevar_serves_with_its_plans_saved(
    demo_without_plans: Path,
    held_calibration: HeldCalibration,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.05)
    caplog.set_level(logging.INFO, logger="app.serve.startup")
    scales = len(DEMO.var.patch_nums)  # the cheap calibration runs one batch: a step per scale
    settings = serve_settings(demo_without_plans, variants=["baseline", "litevar-eager"], calibrate_missing_plans=True)
    with TestClient(create_app(settings)) as c:
        assert held_calibration.reached.wait(60)
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["variants"]["litevar-eager"]["state"] == "calibrating"
        assert c.post("/generate", json=BODY).status_code == 200
        refused = c.post("/generate", json=BODY | {"variant": "litevar-eager"})
        assert refused.status_code == 503 and 5 <= int(refused.headers["retry-after"]) <= 60
        waits_for = f"variant litevar-eager is calibrating its window and sharing plans (step 3/{scales}, "
        assert refused.json()["detail"].startswith(waits_for)
        litevar = variant_entry(c, "litevar-eager")
        assert litevar["state"] == "calibrating" and litevar["doing"] == "calibrating its window and sharing plans"
        assert litevar["progress"]["step"] == 3 and litevar["progress"]["steps"] == scales
        assert 0 < litevar["progress"]["fraction"] < 1 and litevar["progress"]["left_s"] > 0
        assert litevar["weight_bytes"] is None and litevar["window_plan"] is None
        assert by_label(scrape(c), "var_variant_ready", "variant") == {"baseline": 1.0, "litevar-eager": 0.0}
        heartbeat = f"litevar-eager: calibrating its window and sharing plans: step 3/{scales}, "
        wait_for("a progress line in the log", lambda: any(heartbeat in r.getMessage() for r in caplog.records))
        assert not (demo_without_plans / PLAN_FILE).exists()
        held_calibration.release.set()
        wait_ready(c)
        answer = c.post("/generate", json=BODY | {"variant": "litevar-eager"})
        assert answer.status_code == 200 and answer.json()["variant"] == "litevar-eager"
        litevar = variant_entry(c, "litevar-eager")
        assert (litevar["state"], litevar["progress"]) == ("ready", None)
        assert litevar["window_plan"] == litevar["sharing_plan"] == "calibrated at load"
        assert by_label(scrape(c), "var_variant_ready", "variant") == {"baseline": 1.0, "litevar-eager": 1.0}
    sums = (demo_without_plans / SUMS_FILE).read_text()
    assert PLAN_FILE in sums and SHARING_PLAN_FILE in sums and sums_mismatches(demo_without_plans) == []
    again = load_model(demo_without_plans, ["litevar-eager"], CPU).variants["litevar-eager"]
    assert (again.window_plan, again.sharing_plan) == (PlanOrigin.FILE,) * 2  # the next start calibrates nothing


def test_plans_that_cannot_be_saved_still_serve_and_the_log_says_the_next_start_calibrates_again(
    demo_without_plans: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def read_only(*args: Any) -> list[Path]:
        raise PermissionError(13, "Read-only file system", str(demo_without_plans / PLAN_FILE))

    monkeypatch.setattr(startup_module, "save_plans", read_only)
    settings = serve_settings(demo_without_plans, variants=["baseline", "windows"], calibrate_missing_plans=True)
    with serving(settings) as c:
        assert c.post("/generate", json=BODY | {"variant": "windows"}).status_code == 200
    warning = next(r.getMessage() for r in caplog.records if "could not save" in r.getMessage())
    assert "Read-only file system" in warning and "the next start calibrates them again" in warning
    assert f"python -m app.compress calibrate --model {demo_without_plans}" in warning


def failing_build(monkeypatch: pytest.MonkeyPatch) -> None:
    real = startup_module.build_variant

    def build(model: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bf16":
            raise RuntimeError("injected: the compiler lacks Python's headers")
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(startup_module, "build_variant", build)


def failing_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    real = warmup_module.compute

    def compute(pipe: Any, *args: Any) -> Any:
        if pipe.autocast_dtype is torch.bfloat16:  # the bf16 variant's pipeline
            raise RuntimeError("injected: the compiler lacks Python's headers")
        return real(pipe, *args)

    monkeypatch.setattr(warmup_module, "compute", compute)


@pytest.mark.parametrize("inject", [failing_build, failing_warmup], ids=["build", "warm-up"])
def test_a_variant_that_fails_to_start_is_reported_failed_while_the_others_serve(
    demo_folder: Path, monkeypatch: pytest.MonkeyPatch, inject: Callable[[pytest.MonkeyPatch], None]
) -> None:
    inject(monkeypatch)
    settings = serve_settings(demo_folder, variants=["baseline", "bf16", "vqvae-bf16"], warmup=True)
    with TestClient(create_app(settings)) as c:
        wait_until_settled(c)
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        bf16 = variant_entry(c, "bf16")
        assert bf16["state"] == "failed"
        assert bf16["error"] == "RuntimeError: injected: the compiler lacks Python's headers"
        refused = c.post("/generate", json=BODY | {"variant": "bf16"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "60"
        assert refused.json()["detail"] == f"variant bf16 failed to start: {bf16['error']}"
        for served in ("baseline", "vqvae-bf16"):  # the one after the failure started too
            assert c.post("/generate", json=BODY | {"variant": served}).status_code == 200
        ready = {"baseline": 1.0, "bf16": 0.0, "vqvae-bf16": 1.0}
        assert by_label(scrape(c), "var_variant_ready", "variant") == ready


@pytest.mark.parametrize("batching", ["whole", "scale"])
def test_a_variant_that_joins_the_running_engine_computes_its_own_images(demo_folder: Path, batching: str) -> None:
    """Under the scale policy a joining variant also gets its KV pool before its first request. Once every
    variant has started, the checkpoint's own pipeline, which they were copied from, is let go."""
    settings = serve_settings(demo_folder, variants=["baseline", "bf16"], batching=batching, overlap_decode=True)
    with serving(settings) as c:
        service = c.app.state.service
        assert service.model.base is None
        assert service.engine is not None and set(service.engine.pipelines) == {"baseline", "bf16"}
        if batching == "scale":
            assert set(service.engine.batching.pools) == {"baseline", "bf16"}
        for variant in ("bf16", "baseline"):
            answer = c.post("/generate", json=BODY | {"variant": variant, "seed": 5})
            assert answer.status_code == 200 and answer.json()["variant"] == variant
            params = dataclasses.replace(service.model.defaults, top_k=0)  # as BODY asks
            alone = service.model.variants[variant].pipeline.generate([1], params, seeds=[5])
            assert base64.b64decode(answer.json()["images"][0]["data"]) == encode_images(alone.images, "png")[0]


def test_eager_variants_are_warmed_once_at_batch_1_not_at_every_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, int]] = []
    real = warmup_module.compute

    def counted(pipe: Any, labels: list[int], *args: Any) -> Any:
        calls.append((pipe, len(labels)))
        return real(pipe, labels, *args)

    monkeypatch.setattr(warmup_module, "compute", counted)
    settings = serve_settings(DEMO_FOLDER, variants=["baseline", "litevar-eager"], warmup=True, max_batch_size=8)
    with serving(settings) as c:
        by_pipe = {id(v.pipeline): name for name, v in c.app.state.service.model.variants.items()}
        assert c.post("/generate", json=BODY | {"variant": "litevar-eager"}).status_code == 200
    assert [(by_pipe[id(pipe)], size) for pipe, size in calls] == [("baseline", 1), ("litevar-eager", 1)]


@pytest.mark.parametrize("saved_before", [False, True], ids=["no file yet", "file there"])
def test_the_compile_cache_file_is_loaded_before_the_first_compiled_warm_up_and_saved_once_when_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saved_before: bool
) -> None:
    """The warm-up is stood in for (compiling is tested in tests/compress/test_compile_cache.py): what is
    checked is when the file is read and written, around which variants."""
    events: list[str] = []
    cache = tmp_path / "compiled.bin"
    if saved_before:
        cache.write_bytes(b"made earlier")

    def warmed(pipe: Any, sizes: Any, params: Any, progress: Progress) -> list[Any]:
        events.append("warm " + by_pipe[id(pipe)])
        return []

    def loaded(path: Path) -> bool:
        events.append("load")
        return path.exists()

    def saved(path: Path) -> int:
        events.append("save")
        raise OSError("read-only file system")  # logged: the variants serve all the same

    by_pipe: dict[int, str] = {}
    real_build = startup_module.build_variant

    def built(*args: Any, **kwargs: Any) -> Any:
        variant = real_build(*args, **kwargs)
        by_pipe[id(variant.pipeline)] = variant.name
        return variant

    for name, fn in [
        ("warm_up", warmed),
        ("load_compiled", loaded),
        ("save_compiled", saved),
        ("build_variant", built),
    ]:
        monkeypatch.setattr(startup_module, name, fn)
    variants = ["baseline", "compiled", "autotuned"]
    saving = [] if saved_before else ["save"]
    with serving(serve_settings(DEMO_FOLDER, variants=variants, warmup=True, compile_cache=cache)) as c:
        assert all(v["state"] == "ready" for v in c.get("/readyz").json()["variants"].values())
        end = time.monotonic() + 10
        while events[-1:] != saving[-1:] and time.monotonic() < end:  # the file is saved after the last start
            time.sleep(0.01)
    assert events == ["warm baseline", "load", "warm compiled", "warm autotuned", *saving]


def test_compiled_variants_warm_the_batch_sizes_that_get_graphs_of_their_own() -> None:
    """Which sizes those are is checked against Dynamo in tests/compress/test_compiled.py."""
    steps, eager, compiled = scale_steps(DEMO.var.patch_nums), VARIANTS["litevar-eager"], VARIANTS["fastest"]
    assert warmup_batch_sizes(eager, CPU, 8, steps) == [1]
    # batch 1, the symbolic batch from 2, and 8, where the first scale's rows (two per image) reach 16
    assert warmup_batch_sizes(compiled, CPU, 8, steps) == [1, 2, 8]
    assert warmup_batch_sizes(compiled, CPU, 7, steps) == [1, 2]
    assert warmup_batch_sizes(compiled, CUDA, 4, steps) == [1, 2, 3, 4]
    assert warmup_batch_sizes(eager, CUDA, 4, steps) == [1, 2, 3, 4]  # its FlexAttention compiles per shape
    assert warmup_batch_sizes(VARIANTS["baseline"], CUDA, 4, steps) == [1]


def test_a_drain_while_calibrating_stops_the_calibration_at_its_next_step(
    demo_without_plans: Path, held_calibration: HeldCalibration
) -> None:
    service = Service(
        serve_settings(demo_without_plans, variants=["baseline", "litevar-eager"], calibrate_missing_plans=True)
    )

    async def scenario() -> None:
        service.start()
        assert await asyncio.to_thread(held_calibration.reached.wait, 60)
        await service.drain()
        held_calibration.release.set()
        await service.wait_loaded()
        await service.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    progress = held_calibration.progress
    assert progress is not None and progress.done == 2 and progress.ended is None  # no step after the hold
    litevar = service.variants["litevar-eager"]
    assert litevar.state is VariantState.FAILED and litevar.error == "not started: the service is shutting down"
    assert not (demo_without_plans / PLAN_FILE).exists()
