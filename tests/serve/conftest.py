"""Fixtures of the service tests: a random-weight demo-shaped checkpoint folder, pipeline wrappers that
record, block or fail, and a TestClient of a ready service."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import app.serve.service as service_module
import app.serve.startup as startup_module
from app.bench.launcher import ServerProcess, launched
from app.compress.plans import Calibration
from app.compress.sharing import SHARING_PLAN_FILE, SharingSettings
from app.compress.windows import PLAN_FILE, WindowSettings
from app.model.checkpoint import load_folder, random_pipeline
from app.model.checksums import write_sums
from app.model.config import DEMO
from app.model.kv_cache import KVLease, KVPool, ScaleStep
from app.model.pipeline import Generation, VARPipeline
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams
from app.model.timing import StageTimer
from app.serve.app import create_app
from app.serve.engine import POLICIES
from app.serve.engine.queue import RequestQueue
from app.serve.settings import ServeSettings
from app.train.export import export_folder
from tests.conftest import DEMO as DEMO_FOLDER

# one calibration batch of two images: the demo model's plans in about half a second instead of six
CHEAP_CALIBRATION = Calibration(WindowSettings(batches=1, batch_size=2), SharingSettings(batches=1, batch_size=2))


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's shape with random weights, written as a checkpoint folder."""
    pipe = random_pipeline(DEMO)
    out = tmp_path_factory.mktemp("demo_random")
    export_folder(DEMO, pipe.var, pipe.vqvae, out)
    return out


@pytest.fixture
def demo_without_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained demo model without its window and sharing plans, as released weights come, its
    checksums rewritten; services calibrate missing plans with CHEAP_CALIBRATION."""
    folder = tmp_path / "demo"
    shutil.copytree(DEMO_FOLDER, folder, ignore=shutil.ignore_patterns(PLAN_FILE, SHARING_PLAN_FILE, "*.png"))
    write_sums(folder)
    monkeypatch.setattr(startup_module, "CALIBRATION", CHEAP_CALIBRATION)
    return folder


@pytest.fixture(scope="session")
def demo_pipeline(demo_folder: Path) -> VARPipeline:
    return load_folder(demo_folder)


def serve_settings(folder: Path, **overrides: Any) -> ServeSettings:
    """Settings for tests: no warm-up unless asked (it is tested on its own), small limits, and the test
    process's own thread count (a service sets torch's threads process-wide). Missing plans are not calibrated
    unless asked: a service saves the plans it calibrates beside the checkpoint, and the session's folders are
    shared by every test (those that calibrate serve a copy: `demo_without_plans`). Shadow fidelity is off
    unless asked (tests/serve/test_fidelity.py): its random share of requests would add work at random."""
    values: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "model_dir": folder,
        "variants": ["baseline"],
        "warmup": False,
        "max_batch_size": 4,
        "max_wait_ms": 0,
        "calibrate_missing_plans": False,
        "fidelity_rate": 0.0,
    }
    return ServeSettings(**(values | overrides))


@contextmanager
def serving(settings: ServeSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def wait_ready(client: TestClient, limit_s: float = 120) -> None:
    """Until /readyz answers 200 and every variant serves (the service is ready once its default one does)."""
    end = time.monotonic() + limit_s
    while not every_variant_ready(r := client.get("/readyz")):
        assert r.json()["status"] in ("loading", "ready"), r.json()
        failed = {name: v["error"] for name, v in r.json()["variants"].items() if v["state"] == "failed"}
        assert not failed, f"variants failed to start: {failed}"
        assert time.monotonic() < end, "service not ready in time"
        time.sleep(0.02)


def wait_until_settled(client: TestClient, limit_s: float = 120) -> None:
    """Until the load failed, or every variant is ready or failed."""
    end = time.monotonic() + limit_s
    while not settled(client.get("/readyz").json()):
        assert time.monotonic() < end, "variants still starting"
        time.sleep(0.02)


def settled(readyz: dict[str, Any]) -> bool:
    variants = readyz.get("variants", {}).values()
    return readyz["status"] == "failed" or all(v["state"] in ("ready", "failed") for v in variants)


def every_variant_ready(readyz: Any) -> bool:
    return bool(readyz.status_code == 200 and all(v["state"] == "ready" for v in readyz.json()["variants"].values()))


POLICY = {"name": "whole"}  # the batching policy of engines that tests make; the `policy` fixture sets it


@pytest.fixture(params=[*POLICIES, "scale+overlap"])
def policy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test under each batching policy (`POLICY`); `scale+overlap`: scale with decoding overlapped."""
    monkeypatch.setitem(POLICY, "name", request.param)
    return str(request.param)


def policy_settings() -> dict[str, Any]:
    """The Engine arguments of `POLICY`."""
    name, _, overlap = POLICY["name"].partition("+")
    return {"policy": name, "overlap_decode": overlap == "overlap"}


class Recording:
    """A pipeline that records the rows of every batch (under the scale policy: every cohort) it computes."""

    def __init__(self, pipe: VARPipeline):
        self.pipe = pipe
        self.calls: list[tuple[list[int], list[SamplingParams], list[int]]] = []
        self.labels: dict[int, list[int]] = {}  # per rollout (id): its class labels

    @property
    def device(self) -> Any:
        return self.pipe.device

    @property
    def steps(self) -> list[ScaleStep]:
        return self.pipe.steps

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation:
        self.calls.append((list(labels), list(params), list(seeds)))
        return self.pipe.generate(labels, params, seeds=seeds, timer=timer)

    def new_pool(self, images: int) -> KVPool:
        return self.pipe.new_pool(images)

    def start(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], lease: KVLease | None
    ) -> Rollout:
        self.calls.append((list(labels), list(params), list(seeds)))
        rollout = self.pipe.start(labels, params, seeds=seeds, lease=lease)
        self.labels[id(rollout)] = list(labels)
        return rollout

    def step_all(self, rollouts: Sequence[Rollout], timer: StageTimer) -> None:
        self.pipe.step_all(rollouts, timer)

    def finish(self, rollout: Rollout, timer: StageTimer) -> torch.Tensor:
        return self.pipe.finish(rollout, timer)

    def computed_seeds(self) -> list[int]:
        return [s for _, _, seeds in self.calls for s in seeds]


class Gated(Recording):
    """Each batch (scale policy: each cohort) waits for `release` before computing; `entered` is set when one is
    waiting."""

    def __init__(self, pipe: VARPipeline):
        super().__init__(pipe)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _wait(self) -> None:
        self.entered.set()
        assert self.release.wait(30), "gate never released"

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation:
        self._wait()
        return super().generate(labels, params, seeds=seeds, timer=timer)

    def start(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], lease: KVLease | None
    ) -> Rollout:
        self._wait()
        return super().start(labels, params, seeds=seeds, lease=lease)


class Failing(Recording):
    """Raises for any batch that holds the class `bad_label`; under the scale policy, in the middle of the
    generation: at the step of any rollout that holds it, after its first scale."""

    def __init__(self, pipe: VARPipeline, bad_label: int):
        super().__init__(pipe)
        self.bad_label = bad_label

    def generate(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], timer: StageTimer
    ) -> Generation:
        if self.bad_label in labels:
            raise RuntimeError(f"simulated failure on class {self.bad_label}")
        return super().generate(labels, params, seeds=seeds, timer=timer)

    def step_all(self, rollouts: Sequence[Rollout], timer: StageTimer) -> None:
        if any(self.bad_label in self.labels[id(r)] and r.si > 0 for r in rollouts):
            raise RuntimeError(f"simulated failure on class {self.bad_label}")
        super().step_all(rollouts, timer)


LiveServer = ServerProcess  # url, proc, log


@contextmanager
def live_server_process(folder: Path, log: Path, **env: str) -> Iterator[LiveServer]:
    """`python -m app.serve` in a subprocess on a free 127.0.0.1 port, ready when entered; SIGTERM on exit.
    Missing plans are not calibrated unless asked, as in `serve_settings`."""
    values = {"VAR_MODEL_DIR": str(folder), "VAR_WARMUP": "false", "VAR_MAX_BATCH_SIZE": "4", "OMP_NUM_THREADS": "1"}
    values["VAR_CALIBRATE_MISSING_PLANS"] = "false"
    with launched(values | env, log) as server:
        yield server


@pytest.fixture(scope="session")
def live_server(demo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("live_server") / "server.log"
    with live_server_process(demo_folder, log, VAR_VARIANTS="baseline,bf16") as server:
        yield server


def gated_load(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Loading the model waits (up to 30 s) until the returned event is set."""
    release = threading.Event()
    real = service_module.load_checkpoint

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "load_checkpoint", slow_load)
    return release


def crash_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's scheduler raises "injected scheduler bug" as soon as anything is queued."""
    real = RequestQueue.next_batch

    def crashing(queue: RequestQueue, *args: Any, **kwargs: Any) -> Any:
        if queue.rows_waiting():
            raise RuntimeError("injected scheduler bug")
        return real(queue, *args, **kwargs)

    monkeypatch.setattr(RequestQueue, "next_batch", crashing)
