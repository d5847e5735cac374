"""The `scale` batching policy: requests join generations in flight at the next scale, rows leave at a scale
boundary when their request is gone, and every image is still bitwise the one computed alone. (The engine's
other behaviour, under both policies, is in test_engine.py and test_faults.py.)"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from app.bench.prometheus_text import NO_LABELS, parse
from app.model.kv_cache import KVLease
from app.model.pipeline import VARPipeline
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams
from app.model.timing import StageTimer
from app.serve.engine import BatchFailed, DeadlineExceeded, Engine, auto_policy
from app.serve.engine.requests import BatchRow
from app.serve.engine.scale_batching import ScaleBatching
from app.serve.engine.whole_batching import WholeBatching
from app.serve.http.encoding import encode_images
from app.serve.metrics import ServeMetrics
from tests.conftest import DEMO, load_variant
from tests.serve.conftest import Recording, serve_settings, serving
from tests.serve.test_engine import FAST, request, run


class Pausing(Recording):
    """Records the scale of every rollout in each step; pauses the worker once, when a rollout holding the
    class `label` is about to run scale `at` (`paused` set), until `resume` is set."""

    def __init__(self, pipe: VARPipeline, label: int, at: int):
        super().__init__(pipe)
        self.label, self.at = label, at
        self.paused, self.resume = threading.Event(), threading.Event()
        self.steps_seen: list[list[tuple[int, int]]] = []  # per step: (scale, images) of each rollout
        self.leased: list[list[int | None]] = []  # per step: the cache rows each rollout holds

    def step_all(self, rollouts: Sequence[Rollout], timer: StageTimer) -> None:
        if not self.paused.is_set() and any(self.label in self.labels[id(r)] and r.si == self.at for r in rollouts):
            self.paused.set()
            assert self.resume.wait(30), "never resumed"
        self.steps_seen.append([(r.si, r.batch_size) for r in rollouts])
        self.leased.append([r.lease.rows if r.lease else None for r in rollouts])
        super().step_all(rollouts, timer)


def scale_engine(pipe: Recording, **kw: Any) -> Engine:
    values = {"max_batch_size": 4, "max_wait_s": 0.0, "queue_capacity": 16, "policy": "scale"} | kw
    e = Engine({"baseline": pipe}, **values)
    e.start()
    return e


def alone(pipe: VARPipeline, label: int, seed: int) -> torch.Tensor:
    return pipe.generate([label], FAST, seeds=[seed]).images[0]


def test_requests_join_a_generation_in_flight_at_the_next_scale_and_equal_their_images_alone(
    demo_pipeline: VARPipeline,
) -> None:
    pausing = Pausing(demo_pipeline, label=1, at=3)

    async def scenario() -> list[Any]:
        e = scale_engine(pausing)
        first = asyncio.create_task(e.generate(request(1, (10,))))
        assert await asyncio.to_thread(pausing.paused.wait, 30)  # the first is about to run its scale 3
        later = [asyncio.create_task(e.generate(request(label, (seed,)))) for label, seed in ((2, 20), (3, 30))]
        await asyncio.sleep(0.05)  # both queued while the worker is busy
        pausing.resume.set()
        results = await asyncio.gather(first, *later)
        await e.stop()
        return results

    results = run(scenario())
    assert pausing.steps_seen[3:5] == [[(3, 1)], [(4, 1), (0, 2)]]  # joined beside it, at their first scale
    for r, (label, seed) in zip(results, ((1, 10), (2, 20), (3, 30)), strict=True):
        assert torch.equal(r.images[0], alone(demo_pipeline, label, seed)), f"seed {seed} differs from alone"
        assert r.seeds == (seed,)


def test_a_deadline_passing_mid_generation_frees_the_rows_cache_and_its_cohort_goes_on(
    demo_pipeline: VARPipeline,
) -> None:
    pausing = Pausing(demo_pipeline, label=4, at=2)

    async def scenario() -> tuple[BaseException, Any, int, int]:
        e = scale_engine(pausing, max_wait_s=60.0, max_batch_size=2)  # the two start as one cohort
        short = asyncio.create_task(e.generate(request(4, (40,), timeout_s=0.5)))
        kept = asyncio.create_task(e.generate(request(5, (50,))))
        assert await asyncio.to_thread(pausing.paused.wait, 30)
        try:
            await short
            raise AssertionError("the short request was answered")
        except DeadlineExceeded as error:
            expired: BaseException = error
        assert isinstance(e.batching, ScaleBatching)
        pool = e.batching.pools["baseline"]
        pausing.resume.set()
        result = await kept
        free_after = pool.free_rows
        await e.stop()
        return expired, result, free_after, pool.rows

    expired, kept, free_after, rows = run(scenario())
    assert isinstance(expired, DeadlineExceeded) and expired.computed
    assert pausing.steps_seen[2] == [(2, 2)] and pausing.steps_seen[3] == [(3, 1)]  # it left at the boundary
    assert pausing.leased[2] == [4] and pausing.leased[3] == [2]  # and its two cache rows went back then
    assert free_after == rows  # every cache row is back once the other was decoded
    assert torch.equal(kept.images[0], alone(demo_pipeline, 5, 50))


def test_step_metrics_count_admissions_and_rows_by_scale(demo_pipeline: VARPipeline) -> None:
    pausing = Pausing(demo_pipeline, label=1, at=2)
    metrics = ServeMetrics(["baseline"], 4, 16)

    async def scenario() -> float | None:
        e = scale_engine(pausing, metrics=metrics)
        first = asyncio.create_task(e.generate(request(1, (10,))))
        assert await asyncio.to_thread(pausing.paused.wait, 30)  # after two steps, before the third
        by_scale = {"variant": "baseline", "scale": "2"}
        assert metrics.registry.get_sample_value("var_inflight_images_by_scale", by_scale) == 1
        second = asyncio.create_task(e.generate(request(2, (20, 21))))
        await asyncio.sleep(0.05)
        pausing.resume.set()
        await asyncio.gather(first, second)
        await e.stop()
        return metrics.registry.get_sample_value("var_step_admitted_images_sum")

    admitted = run(scenario())
    steps = len(demo_pipeline.steps)
    assert admitted == 3
    count = metrics.registry.get_sample_value("var_step_duration_seconds_count")
    assert count == steps + 3  # the second joined at the first's fourth step and ran its seven
    waits = metrics.registry.get_sample_value("var_queue_wait_seconds_count", {"variant": "baseline"})
    assert waits == 2


def test_through_the_api_requests_arriving_during_generations_join_them_bitwise_as_alone() -> None:
    """Requests sent 15 ms apart to the real demo model under `scale`: they join generations in flight (fewer
    steps than one generation each), and each image equals its request computed alone."""
    bodies = [{"class_label": c, "seed": 70 + c, "variant": v} for c, v in ((1, "litevar-eager"), (2, "baseline"))]
    bodies += [
        {"class_label": c, "seed": 70 + c, "variant": v} for c, v in ((3, "litevar-eager"), (4, "litevar-eager"))
    ]
    bodies += [{"class_label": 5, "seed": 75, "variant": "baseline", "num_images": 2}]
    settings = serve_settings(DEMO, variants=["baseline", "litevar-eager"], batching="scale", max_wait_ms=0)

    def post(i_body: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        time.sleep(0.015 * i_body[0])
        r = c.post("/generate", json=i_body[1])
        assert r.status_code == 200, r.text
        return dict(r.json())

    with serving(settings) as c, ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, enumerate(bodies)))
        text = c.get("/metrics").text
    pipes = {v: load_variant(v) for v in ("baseline", "litevar-eager")}
    for body, answer in zip(bodies, answers, strict=True):
        pipe = pipes[str(body["variant"])]
        n = int(body.get("num_images", 1))
        ref = pipe.generate([body["class_label"]] * n, seeds=[body["seed"] + i for i in range(n)])
        got = [base64.b64decode(im["data"]) for im in answer["images"]]
        assert got == encode_images(ref.images, "png"), f"{body} differs from its request alone"
    samples = parse(text)
    steps = len(pipes["baseline"].steps)
    assert samples["var_step_duration_seconds_count", NO_LABELS] < steps * len(bodies)  # generations overlapped


class SignalsDone(Recording):
    """Sets `done` once a rollout holding the class `label` has run its last scale."""

    def __init__(self, pipe: VARPipeline, label: int):
        super().__init__(pipe)
        self.label, self.done = label, threading.Event()

    def step_all(self, rollouts: Sequence[Rollout], timer: StageTimer) -> None:
        super().step_all(rollouts, timer)
        if any(r.done and self.label in self.labels[id(r)] for r in rollouts):
            self.done.set()


def test_with_decoding_overlapped_the_next_steps_run_while_a_cohort_decodes(demo_pipeline: VARPipeline) -> None:
    """The first image's decode is held; the second, admitted meanwhile, runs all its scales before the hold
    ends (its decode then waits its turn in the one decode thread). Both equal their requests alone."""
    hold, decoding = threading.Event(), threading.Event()
    signals = SignalsDone(demo_pipeline, label=2)

    def held(rows: list[BatchRow], images: torch.Tensor) -> torch.Tensor:
        if rows[0].pending.request.seeds == (10,):
            decoding.set()
            assert hold.wait(30), "never released"
        return images

    async def scenario() -> tuple[bool, list[Any]]:
        e = scale_engine(signals, fault=held, overlap_decode=True)
        first = asyncio.create_task(e.generate(request(1, (10,))))
        assert await asyncio.to_thread(decoding.wait, 30)
        second = asyncio.create_task(e.generate(request(2, (20,))))
        stepped = await asyncio.to_thread(signals.done.wait, 30)  # all its scales while the first is held
        hold.set()
        results = list(await asyncio.gather(first, second))
        await e.stop()
        return stepped, results

    stepped, (first, second) = run(scenario())
    assert stepped
    assert torch.equal(first.images[0], alone(demo_pipeline, 1, 10))
    assert torch.equal(second.images[0], alone(demo_pipeline, 2, 20))


class FailingStart(Recording):
    """Starting a rollout that holds the class `bad_label` raises."""

    def __init__(self, pipe: VARPipeline, bad_label: int):
        super().__init__(pipe)
        self.bad_label = bad_label

    def start(
        self, labels: list[int], params: list[SamplingParams], *, seeds: list[int], lease: KVLease | None
    ) -> Rollout:
        if self.bad_label in labels:
            raise RuntimeError(f"simulated failure starting class {self.bad_label}")
        return super().start(labels, params, seeds=seeds, lease=lease)


def test_a_cohort_that_fails_to_start_fails_only_the_request_that_fails_alone(demo_pipeline: VARPipeline) -> None:
    failing = FailingStart(demo_pipeline, bad_label=9)
    metrics = ServeMetrics(["baseline"], 4, 16)

    async def scenario() -> list[Any]:
        e = scale_engine(failing, metrics=metrics, max_wait_s=60.0, max_batch_size=2)  # one cohort of the two
        outcomes = await asyncio.gather(
            e.generate(request(9, (1,))), e.generate(request(1, (2,))), return_exceptions=True
        )
        after = await e.generate(request(3, (3, 4)))  # two images: a full cohort starts at once
        healthy = e.health() is None
        await e.stop()
        return [*outcomes, after, healthy]

    bad, good, after, healthy = run(scenario())
    assert isinstance(bad, BatchFailed) and healthy
    assert torch.equal(good.images[0], alone(demo_pipeline, 1, 2))
    assert torch.equal(after.images[1], alone(demo_pipeline, 3, 4))
    assert metrics.registry.get_sample_value("var_batch_failures_total", {"variant": "baseline"}) == 2


def test_auto_picks_scale_for_wide_transformers_and_the_setting_reaches_the_engine(demo_folder: Path) -> None:
    assert auto_policy(256) == "whole" and auto_policy(1023) == "whole"
    assert auto_policy(1024) == "scale" and auto_policy(2304) == "scale"  # d16 .. d36
    for setting, expected in (("auto", "whole"), ("scale", "scale")):  # the demo shape is 256 wide
        with serving(serve_settings(demo_folder, batching=setting)) as c:
            engine = c.app.state.service.engine
            assert engine.policy == expected
            assert isinstance(engine.batching, ScaleBatching if expected == "scale" else WholeBatching)
