"""Rollouts: rows that join others at a later scale, leave early, and lease their KV cache from a pool still
compute exactly the image they compute alone (CPU, bitwise)."""

from __future__ import annotations

import copy

import torch

from app.model.kv_cache import KVPool
from app.model.pipeline import VARPipeline
from app.model.rollout import Rollout
from app.model.sampling import SamplingParams
from app.model.timing import StageTimer

P1 = SamplingParams(cfg=1.5, top_k=900, top_p=0.96)
P2 = SamplingParams(cfg=4.0, top_k=50, top_p=0.0, more_smooth=True)


def alone(pipe: VARPipeline, label: int, seed: int, params: SamplingParams) -> torch.Tensor:
    return pipe.generate([label], params, seeds=[seed]).images[0]


def start(
    pipe: VARPipeline, labels: list[int], params: SamplingParams | list[SamplingParams], seeds: list[int], pool: KVPool
) -> Rollout:
    lease = pool.lease(2 * len(labels))
    assert lease is not None, "no room in the pool"
    return pipe.start(labels, params, seeds=seeds, lease=lease)


def run_to_end(pipe: VARPipeline, rollouts: list[Rollout]) -> None:
    while any(not r.done for r in rollouts):
        pipe.step_all([r for r in rollouts if not r.done])


def test_rollouts_joining_at_later_scales_equal_each_image_alone(tiny_pipeline: VARPipeline) -> None:
    pipe = tiny_pipeline
    pool = pipe.new_pool(6)
    a = start(pipe, [207, 980], [P1, P2], [1, 2], pool)
    pipe.step_all([a])
    pipe.step_all([a])
    b = start(pipe, [33], P2, [3], pool)  # joins while a is at its third scale
    pipe.step_all([a, b])
    c = start(pipe, [500, 1, 207], P1, [4, 5, 6], pool)
    timer = StageTimer()
    while not a.done:
        pipe.step_all([a, b, c], timer)
    assert timer.seconds["transformer.grouped"] > 0  # the three went through the transformer together
    images_a = pipe.finish(a)
    run_to_end(pipe, [b, c])
    got = torch.cat((images_a, pipe.finish(b), pipe.finish(c)))
    rows = [(207, 1, P1), (980, 2, P2), (33, 3, P2), (500, 4, P1), (1, 5, P1), (207, 6, P1)]
    for i, (label, seed, params) in enumerate(rows):
        assert torch.equal(got[i], alone(pipe, label, seed, params)), f"image {i} differs from its request alone"
    assert pool.free_rows == pool.rows  # every rollout's rows went back


def test_rows_that_leave_free_their_cache_rows_and_the_rest_are_unchanged(tiny_pipeline: VARPipeline) -> None:
    pipe = tiny_pipeline
    pool = pipe.new_pool(4)
    r = start(pipe, [207, 980, 33], P1, [7, 8, 9], pool)
    other = start(pipe, [1], P1, [10], pool)  # holds the two rows after r's
    pipe.step_all([r, other])
    pipe.step_all([r, other])
    assert pool.free_rows == 0
    r.keep_rows([0, 2])
    assert pool.free_rows == 2 and r.batch_size == 2
    run_to_end(pipe, [r, other])
    images = pipe.finish(r)
    assert torch.equal(images[0], alone(pipe, 207, 7, P1))
    assert torch.equal(images[1], alone(pipe, 33, 9, P1))
    assert r.seeds == [7, 9]
    assert torch.equal(pipe.finish(other)[0], alone(pipe, 1, 10, P1))


def test_guidance_stopping_returns_the_unconditional_rows_and_mixes_with_guided_rollouts(
    tiny_pipeline: VARPipeline,
) -> None:
    pipe = copy.copy(tiny_pipeline)  # a shallow copy: same modules, its own hooks and settings
    K = len(pipe.steps)
    pipe.guided_scales = K - 1  # the last scale runs unguided
    pool = pipe.new_pool(2)
    first = start(pipe, [207], P1, [1], pool)
    for _ in range(K - 1):
        pipe.step_all([first])
    second = start(pipe, [980], P1, [2], pool)
    pipe.step_all([first, second])  # first's last, unguided scale beside second's first, guided one
    assert first.done and pool.free_rows == 1  # first's unconditional row left before its last scale
    images = pipe.finish(first)
    run_to_end(pipe, [second])
    assert torch.equal(images[0], alone(pipe, 207, 1, P1))
    assert torch.equal(pipe.finish(second)[0], alone(pipe, 980, 2, P1))


def test_a_full_pool_refuses_and_leases_contiguous_rows(tiny_pipeline: VARPipeline) -> None:
    pool = tiny_pipeline.new_pool(3)  # six cache rows
    a = start(tiny_pipeline, [1], P1, [1], pool)  # rows 0-1
    b = start(tiny_pipeline, [2], P1, [2], pool)  # rows 2-3
    c = start(tiny_pipeline, [3], P1, [3], pool)  # rows 4-5
    a.release()
    c.release()
    assert pool.free_rows == 4 and pool.largest_free() == 2  # free, but not in one run
    assert pool.lease(4) is None
    b.release()
    d = start(tiny_pipeline, [4, 5, 6], P1, [4, 5, 6], pool)
    assert d.lease is not None and d.lease.start == 0 and pool.free_rows == 0
