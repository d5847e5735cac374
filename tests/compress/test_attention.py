"""Windowed attention, attention sharing across CFG, guidance switched off late: exactness and real savings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from app.compress.attention import PlannedAttention, route_for
from app.compress.attention_passes import attention_flops, cfg_attention_sharing, windowed_attention
from app.compress.calibrate import AttentionMass, calibrate
from app.compress.guidance import guidance_off_last
from app.compress.windows import DROP, FULL, WindowPlan, WindowSettings, band, square
from app.model.checkpoint import load_folder
from app.model.kv_cache import ScaleStep, scale_steps
from app.model.pipeline import VARPipeline

DEMO = Path("model_store/demo")
LABELS, SEEDS = [0, 3, 7], [11, 12, 13]
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
    assert attention_flops(windowed, 1) == attention_flops(demo, 1)


@pytest.mark.parametrize("min_skipped", [2.0, 0.0])  # masked route, block-sparse route
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


def test_the_block_sparse_route_really_computes_fewer_pairs(demo: VARPipeline, narrow_plan: WindowPlan) -> None:
    step = scale_steps(narrow_plan.patch_nums)[6]
    kept = narrow_plan.kept(0, step)
    route = route_for(kept, 0.0)
    # whole 32x32 blocks: more than the kept pairs, fewer than all pairs
    assert route.computed_pairs is not None and int(kept.sum()) < route.computed_pairs < 0.9 * kept.numel()
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
    kernel.share_outputs = True
    shared = kernel(q, k, v, scale=0.7, attn_bias=None, step=step)
    assert torch.equal(shared[2:], shared[:2])
    unguided = kernel(q, k, v, scale=0.7, attn_bias=None, step=ScaleStep(4, 30, 55, False, guided=False))
    torch.testing.assert_close(unguided.double(), reference(q, k, v, all_keys, 0.7), **TOL)


def test_sharing_skips_a_quarter_or_half_of_the_attention_flops(demo: VARPipeline) -> None:
    dense = attention_flops(demo, 3)
    assert attention_flops(cfg_attention_sharing(copy.deepcopy(demo)), 3) == 0.75 * dense
    assert attention_flops(cfg_attention_sharing(copy.deepcopy(demo), outputs=True), 3) == 0.5 * dense
    some = cfg_attention_sharing(copy.deepcopy(demo), scales=(6,), layers=(0, 1))
    assert 0.75 * dense < attention_flops(some, 3) < dense


def test_shared_generation_stays_close_to_the_baseline(demo: VARPipeline) -> None:
    shared = cfg_attention_sharing(copy.deepcopy(demo))
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
