"""Windowed attention, attention sharing across CFG, guidance switched off late: exactness and real savings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import EagerAndRecordGraphs

from app.compress import attention
from app.compress.attention import ROUTES, PlannedAttention, route_for
from app.compress.attention_passes import attention_flops, cfg_attention_sharing, windowed_attention
from app.compress.calibrate import AttentionMass, calibrate
from app.compress.guidance import guidance_off_last
from app.compress.windows import DROP, FULL, WindowPlan, WindowSettings, band, square
from app.model.checkpoint import load_folder
from app.model.kv_cache import ScaleStep, scale_steps
from app.model.pipeline import VARPipeline
from tests.conftest import DEMO

LABELS, SEEDS = [0, 3, 7], [11, 12, 13]
EVERY_SCALE = tuple(range(7))  # the demo model's scales: sharing everywhere, as the authors do
TOL = {"atol": 2e-5, "rtol": 1e-4}  # float32 kernels against the float64 reference


@pytest.fixture(scope="module")
def demo() -> VARPipeline:
    return load_folder(DEMO)


@pytest.fixture(scope="module")
def narrow_plan(demo: VARPipeline) -> WindowPlan:
    """Narrow windows everywhere: 3 tokens on the own scale, 2 on the one before, the rest dropped."""
    cfg = demo.config.var
    plan = WindowPlan.full(cfg.depth, cfg.num_heads, cfg.patch_nums, WindowSettings())
    for s in range(3, len(cfg.patch_nums)):
        plan.windows[:, s, 3:s] = DROP
        plan.windows[:, s, s] = 2
        plan.windows[:, s, s - 1] = 1
    return plan


def reference(q, k, v, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense masked form: softmax over kept pairs only (-inf elsewhere), in float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.masked_fill(~kept, float("-inf")).softmax(-1) @ v.double()


def qkv(rows: int, heads: int, step: ScaleStep, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, step.num_tokens, 16, generator=g)
    return q, torch.randn(rows, heads, step.end, 16, generator=g), torch.randn(rows, heads, step.end, 16, generator=g)


def counting(pipe: VARPipeline) -> VARPipeline:
    """The pipeline with a PlannedAttention without routes or sharing in every layer: dense, but counted."""
    for blk in pipe.var.block_list:
        blk.attn.kernel = PlannedAttention()
    return pipe


def kernels(pipe: VARPipeline) -> list[PlannedAttention]:
    out = [blk.attn.kernel for blk in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) for k in out)
    return out  # type: ignore[return-value]


def ran(pipe: VARPipeline, scales: set[int] | None = None) -> dict[str, int]:
    """Calls per route and (query, key) pairs that the pipeline's kernels counted, over all layers (and the
    given query scales, default all)."""
    total = dict.fromkeys((*ROUTES, "scores", "weighted"), 0)
    for k in kernels(pipe):
        for si, r in k.ran.items():
            if scales is None or si in scales:
                for key in total:
                    total[key] += getattr(r, key)
    return total


def measured_flops(pipe: VARPipeline) -> int:
    """FLOPs of QK^T and PV from the counted pairs: 2 per multiply-add, head_dim of them per pair."""
    cfg = pipe.config.var
    counts = ran(pipe)
    return 2 * (cfg.embed_dim // cfg.num_heads) * (counts["scores"] + counts["weighted"])


# ---- window geometry ---------------------------------------------------------------------------------
def test_a_band_of_half_width_one_on_the_same_scale_is_the_diagonal() -> None:
    assert torch.equal(band(16, 16, 1), torch.eye(16, dtype=torch.bool))
    assert band(4, 16, FULL).all()
    assert int(band(4, 16, 3).sum(1)[1]) == 5  # query 1 maps to key 4: keys 2..6


def test_a_square_window_maps_the_query_cell_onto_the_coarser_grid() -> None:
    assert torch.equal(square(4, 4, 1), torch.eye(16, dtype=torch.bool))
    kept = square(4, 2, 1).view(4, 4, 2, 2)  # 4x4 queries onto 2x2 keys
    assert kept[0, 0, 0, 0] and not kept[0, 0, 1, 1]
    assert kept[3, 3, 1, 1] and not kept[3, 3, 0, 0]


def test_a_plan_round_trips_through_its_file_and_refuses_another_model(tmp_path: Path, narrow_plan) -> None:
    narrow_plan.save(tmp_path / "plan.safetensors")
    loaded = WindowPlan.load(tmp_path / "plan.safetensors")
    assert torch.equal(loaded.windows, narrow_plan.windows) and loaded.settings == narrow_plan.settings
    with pytest.raises(ValueError, match="depth"):
        loaded.check_fits(narrow_plan.depth + 1, narrow_plan.heads, narrow_plan.patch_nums)


# ---- calibration ----------------------------------------------------------------------------------------
def synthetic_mass(probs_of: str) -> AttentionMass:
    """Mass statistics of one head at the last scale of a (1, 2, 3, 4) schedule from chosen probabilities."""
    patch_nums = (1, 2, 3, 4)
    mass = AttentionMass(1, 1, patch_nums, WindowSettings(tau=0.99, drop_mass=0.05))
    step = scale_steps(patch_nums)[3]
    p = torch.zeros(1, 1, 16, 30)
    if probs_of == "diagonal":
        p[0, 0, :, 14:] = torch.eye(16) * 0.97
        p[0, 0, :, 0] = 0.03
    elif probs_of == "uniform":
        p[0, 0, :, 14:] = 1 / 16
    else:  # "prefix": nearly everything on the always-kept class token
        p[0, 0, :, 0], p[0, 0, :, 14:] = 0.99, 0.01 / 16
    mass.add(0, step, p)
    return mass


@pytest.mark.parametrize(("probs_of", "window"), [("diagonal", 1), ("uniform", FULL), ("prefix", DROP)])
def test_calibration_chooses_the_narrowest_window_holding_tau(probs_of: str, window: int) -> None:
    assert int(synthetic_mass(probs_of).plan().windows[0, 3, 3, 0]) == window


def test_calibration_of_a_real_model_keeps_fewer_pairs_the_lower_tau(demo: VARPipeline) -> None:
    small = WindowSettings(batches=1, batch_size=4)
    strict = calibrate(copy.deepcopy(demo), small)
    loose = calibrate(copy.deepcopy(demo), WindowSettings(tau=0.6, drop_mass=0.2, batches=1, batch_size=4))
    assert loose.kept_fraction() < strict.kept_fraction() < 1.0
    assert loose.windows.shape == (4, 7, 7, 4)


# ---- the kernel -------------------------------------------------------------------------------------
def test_a_plan_that_keeps_everything_reproduces_the_baseline_tokens(demo: VARPipeline) -> None:
    cfg = demo.config.var
    full = WindowPlan.full(cfg.depth, cfg.num_heads, cfg.patch_nums, WindowSettings())
    windowed = windowed_attention(copy.deepcopy(demo), plan=full)
    a, b = windowed.generate(LABELS, seeds=SEEDS), demo.generate(LABELS, seeds=SEEDS)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    counts = ran(windowed)
    assert counts["masked"] == counts["sparse"] == 0  # nothing left out: every scale takes the dense route
    assert counts["dense"] == cfg.depth * len(cfg.patch_nums)
    assert measured_flops(windowed) == attention_flops(windowed, len(LABELS)) == attention_flops(demo, len(LABELS))


@pytest.mark.compile
@pytest.mark.slow
def test_a_whole_windowed_plan_runs_the_masked_and_the_sparse_route_and_matches_the_masked_reference(
    demo: VARPipeline, narrow_plan: WindowPlan
) -> None:
    """Scales 3-5 (16 to 36 queries) take the masked route, scale 6 (64 queries) the block-sparse one; the
    reference computes every windowed scale on the masked route (dense scores, -inf outside the windows)."""
    both = windowed_attention(copy.deepcopy(demo), plan=narrow_plan, min_skipped=0.0, min_queries=64)
    masked = windowed_attention(copy.deepcopy(demo), plan=narrow_plan, min_skipped=2.0)
    dense = counting(copy.deepcopy(demo))
    a = both.generate(LABELS, seeds=SEEDS)
    ref = masked.generate(LABELS, seeds=SEEDS)
    base = dense.generate(LABELS, seeds=SEEDS)
    depth = demo.config.var.depth
    for k in kernels(both):
        assert [si for si in sorted(k.ran) if k.ran[si].sparse] == [6]
        assert [si for si in sorted(k.ran) if k.ran[si].masked] == [3, 4, 5]
    assert ran(masked)["sparse"] == 0 and ran(masked)["masked"] == 4 * depth
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, ref.tokens, strict=True))
    assert (a.images - ref.images).abs().max() < 1e-4
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, base.tokens, strict=True))  # the windows matter
    # pairs counted as they ran: the masked route computes every pair, the sparse route skips key blocks
    last = {6}
    assert ran(masked, last)["scores"] == ran(dense, last)["scores"]
    assert ran(both, last)["scores"] < 0.9 * ran(masked, last)["scores"]
    kept = sum(int(narrow_plan.kept(layer, demo.steps[6]).sum()) for layer in range(depth))
    assert ran(both, last)["scores"] > 2 * len(LABELS) * kept  # whole blocks: more than the kept pairs
    assert ran(both)["scores"] < ran(masked)["scores"] == ran(dense)["scores"]
    # the accounting that the benchmark reports agrees with what ran
    for pipe in (both, masked, dense):
        assert measured_flops(pipe) == attention_flops(pipe, len(LABELS))


@pytest.mark.parametrize(
    "min_skipped",
    [2.0, pytest.param(0.0, marks=[pytest.mark.compile, pytest.mark.slow])],  # masked route, block-sparse route
)
def test_windowed_attention_equals_the_dense_masked_reference(narrow_plan: WindowPlan, min_skipped: float) -> None:
    step = scale_steps(narrow_plan.patch_nums)[6]
    kept = narrow_plan.kept(0, step)
    route = route_for(kept, min_skipped)
    assert (route.blocks is not None) == (min_skipped == 0.0)
    kernel = PlannedAttention()
    kernel.routes[step.si] = route
    q, k, v = qkv(4, narrow_plan.heads, step)
    out = kernel(q, k, v, scale=0.5, attn_bias=None, step=step)
    torch.testing.assert_close(out.double(), reference(q, k, v, kept, 0.5), **TOL)
    ran = kernel.ran[step.si]
    assert (ran.dense, ran.masked, ran.sparse) == ((0, 0, 1) if min_skipped == 0.0 else (0, 1, 0))
    all_pairs, kept_pairs = 4 * kept.numel(), 4 * int(kept.sum())
    if min_skipped == 0.0:  # whole 32x32 blocks: more than the kept pairs, fewer than all pairs
        assert kept_pairs < ran.scores == ran.weighted < 0.9 * all_pairs
    else:
        assert ran.scores == ran.weighted == all_pairs


def test_the_accounting_of_a_sparse_plan_counts_whole_blocks(demo: VARPipeline, narrow_plan: WindowPlan) -> None:
    step = scale_steps(narrow_plan.patch_nums)[6]
    kept = narrow_plan.kept(0, step)
    route = route_for(kept, 0.0)
    # whole 32x32 blocks: more than the kept pairs, fewer than all pairs; the same pairs the kernel visits
    assert route.computed_pairs is not None and int(kept.sum()) < route.computed_pairs < 0.9 * kept.numel()
    assert route.computed_pairs == route.visited_pairs
    sparse = windowed_attention(copy.deepcopy(demo), plan=narrow_plan, min_skipped=0.0, min_queries=1)
    masked = windowed_attention(copy.deepcopy(demo), plan=narrow_plan)  # small scales: masked, nothing skipped
    assert attention_flops(masked, 2) == attention_flops(demo, 2)
    assert attention_flops(sparse, 2) < 0.95 * attention_flops(masked, 2)


def test_sharing_gives_the_unconditional_rows_the_conditional_probabilities() -> None:
    step = ScaleStep(4, 30, 55, False)
    q, k, v = qkv(4, 2, step, seed=1)
    kernel = PlannedAttention()
    kernel.share_scales = frozenset({4})
    out = kernel(q, k, v, scale=0.7, attn_bias=None, step=step)
    all_keys = torch.ones(step.num_tokens, step.end, dtype=torch.bool)
    probs = ((q[:2] @ k[:2].transpose(-1, -2)) * 0.7).softmax(-1)
    torch.testing.assert_close(out[2:], probs @ v[2:])
    torch.testing.assert_close(out[:2].double(), reference(q[:2], k[:2], v[:2], all_keys, 0.7), **TOL)
    row_pairs = 2 * step.num_tokens * step.end  # one row, both heads
    assert (kernel.ran[4].scores, kernel.ran[4].weighted) == (2 * row_pairs, 4 * row_pairs)  # scores: 2 rows
    kernel.reset_counts()
    kernel.share_outputs = True
    shared = kernel(q, k, v, scale=0.7, attn_bias=None, step=step)
    assert torch.equal(shared[2:], shared[:2])
    assert (kernel.ran[4].scores, kernel.ran[4].weighted) == (2 * row_pairs, 2 * row_pairs)
    kernel.reset_counts()
    unguided = kernel(q, k, v, scale=0.7, attn_bias=None, step=ScaleStep(4, 30, 55, False, guided=False))
    torch.testing.assert_close(unguided.double(), reference(q, k, v, all_keys, 0.7), **TOL)
    assert (kernel.ran[4].scores, kernel.ran[4].weighted) == (4 * row_pairs, 4 * row_pairs)


@pytest.mark.compile
@pytest.mark.parametrize("guided", [True, False], ids=["shared", "masked"])
def test_compiled_the_explicit_routes_run_the_eager_code_row_by_row(guided: bool, monkeypatch) -> None:
    """Traced, the row loop would become one call over all rows (slower at d16); the graph holds the routes as
    one opaque operator instead, so compiled and eager agree bit for bit."""
    monkeypatch.setattr(attention, "TILE_CHUNK", 64)  # every call here is over it: one row at a time
    step = ScaleStep(4, 30, 55, False, guided=guided)
    q, k, v = qkv(4, 2, step, seed=2)
    kept = torch.rand(2, step.num_tokens, step.end, generator=torch.Generator().manual_seed(3)) < 0.5
    kept[..., 0] = True
    kernel = PlannedAttention()
    kernel.routes[4] = route_for(kept, min_skipped=1.0)  # nothing skips everything: the masked route
    kernel.share_scales = frozenset({4})
    graphs = EagerAndRecordGraphs()

    def attend(q, k, v):
        return kernel(q, k, v, scale=0.7, attn_bias=None, step=step)

    torch.compile(attend, backend=graphs, fullgraph=True)(q, k, v)
    targets = [node.target for graph in graphs.graphs for node in graph.graph.nodes]
    assert torch.ops.var.explicit_attention.default in targets
    assert not any("softmax" in str(t) for t in targets)
    eager = attend(q, k, v)
    assert torch.equal(torch.compile(attend, fullgraph=True)(q, k, v), eager)
    probs = ((q[:2] @ k[:2].transpose(-1, -2)) * 0.7).masked_fill(~kept, float("-inf")).softmax(-1)
    torch.testing.assert_close(eager[:2], probs @ v[:2])


def test_sharing_skips_the_unconditional_rows_scores_at_the_shared_scales(demo: VARPipeline) -> None:
    """Counted as the kernels ran: at a shared scale of a shared layer the unconditional rows compute no
    scores (probabilities shared) or nothing at all (outputs shared); elsewhere every row computes both."""
    dense = counting(copy.deepcopy(demo))
    probs = cfg_attention_sharing(copy.deepcopy(demo), scales=EVERY_SCALE)
    outputs = cfg_attention_sharing(copy.deepcopy(demo), scales=EVERY_SCALE, outputs=True)
    some = cfg_attention_sharing(counting(copy.deepcopy(demo)), scales=(6,), layers=(0, 1))  # 2 of 4 layers
    for pipe in (dense, probs, outputs, some):
        pipe.generate(LABELS, seeds=SEEDS)
    full = ran(dense)
    assert full["scores"] == full["weighted"] > 0
    assert (ran(probs)["scores"], ran(probs)["weighted"]) == (full["scores"] // 2, full["weighted"])
    assert (ran(outputs)["scores"], ran(outputs)["weighted"]) == (full["scores"] // 2, full["weighted"] // 2)
    for layer, (k, ref) in enumerate(zip(kernels(some), kernels(dense), strict=True)):
        for si in range(len(demo.steps)):
            half = layer < 2 and si == 6
            assert k.ran[si].scores == (ref.ran[si].scores // 2 if half else ref.ran[si].scores), (layer, si)
            assert k.ran[si].weighted == ref.ran[si].weighted, (layer, si)
    for pipe in (dense, probs, outputs, some):  # the accounting that the benchmark reports agrees with what ran
        assert measured_flops(pipe) == attention_flops(pipe, len(LABELS))


def test_shared_generation_stays_close_to_the_baseline(demo: VARPipeline) -> None:
    shared = cfg_attention_sharing(copy.deepcopy(demo), scales=EVERY_SCALE)
    a, b = shared.generate(LABELS, seeds=SEEDS), demo.generate(LABELS, seeds=SEEDS)
    assert torch.equal(a.tokens[0], b.tokens[0])
    assert (a.images - b.images).abs().mean() < 0.2  # same classes and seeds: similar images, not equal


# ---- guidance switched off late -------------------------------------------------------------------------
def test_guidance_off_runs_the_last_scales_on_the_conditional_rows_only(demo: VARPipeline) -> None:
    late = guidance_off_last(copy.deepcopy(demo), scales=2)
    rows: list[int] = []
    hook = late.var.head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    a = late.generate(LABELS, seeds=SEEDS)
    hook.remove()
    b = demo.generate(LABELS, seeds=SEEDS)
    assert rows == [6] * 5 + [3] * 2
    assert all(torch.equal(x, y) for x, y in zip(a.tokens[:5], b.tokens[:5], strict=True))  # guided scales
    assert a.images.shape == b.images.shape
    assert attention_flops(late, 1) < attention_flops(demo, 1)
    with pytest.raises(ValueError, match="scales"):
        guidance_off_last(copy.deepcopy(demo), scales=7)


def test_guidance_off_drops_the_unconditional_half_of_the_work(demo: VARPipeline) -> None:
    late = guidance_off_last(copy.deepcopy(demo), scales=2)
    steps = late.steps
    assert [s.guided for s in steps] == [True] * 5 + [False] * 2
    expected = sum(
        (2 if s.guided else 1) * 4 * s.num_tokens * s.end * 64 * demo.config.var.num_heads * demo.config.var.depth
        for s in steps
    )
    assert attention_flops(late, 1) == expected
