"""Synthetic band plans (`band_plan`, `python -m app.compress band-plan`) and the sparse kernels on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.compress import attention
from app.compress.__main__ import main
from app.compress.attention import KeyTiles, PlannedAttention, key_tiles, route_for, tiled_attention
from app.compress.windows import DROP, FULL, WindowPlan, WindowSettings, band, band_pairs, band_plan, candidates
from app.model.config import DEMO_PATCH_NUMS, PATCH_NUMS_256, PRESETS
from app.model.kv_cache import ScaleStep, scale_steps
from tests.conftest import DEMO

TOL = {"atol": 2e-5, "rtol": 1e-4}  # float32 kernels against the float64 reference
# (patch_nums, tolerance on the kept share): the demo's scales are small, so its block shares are coarse
SHAPES = {"demo": (DEMO_PATCH_NUMS, 0.01), "d16": (PATCH_NUMS_256, 0.002)}


def kept_share_from_masks(plan: WindowPlan) -> float:
    """The windowed query scales' kept share, counted on the masks themselves (slow, the reference)."""
    kept = total = 0
    for layer in range(plan.depth):
        for step in scale_steps(plan.patch_nums):
            if plan.windowed(step.si):
                mask = plan.kept(layer, step)
                kept, total = kept + int(mask.sum()), total + mask.numel()
    return kept / total


# ---- the plan ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_q", "n_k"), [(256, 256), (256, 169), (16, 256), (169, 16), (9, 4)])
def test_band_pairs_counts_the_pairs_of_the_band_mask(n_q: int, n_k: int) -> None:
    for w in (DROP, 1, 2, 3, 5, 17, 40, 300, FULL):
        assert band_pairs(n_q, n_k, w) == int(band(n_q, n_k, w).sum()), w


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("keep", [0.15, 0.4])
def test_a_band_plan_keeps_the_target_share_of_the_windowed_pairs(shape: str, keep: float) -> None:
    patch_nums, tolerance = SHAPES[shape]
    plan = band_plan(2, 3, patch_nums, keep)
    assert plan.kept_fraction(windowed_only=True) == pytest.approx(keep, abs=tolerance)
    assert plan.kept_fraction(windowed_only=True) == pytest.approx(kept_share_from_masks(plan), abs=1e-12)


def test_a_band_plan_at_the_d16_shape_keeps_the_paper_budget() -> None:
    cfg = PRESETS["d16"].var
    plan = band_plan(cfg.depth, cfg.num_heads, cfg.patch_nums, 0.15)
    assert plan.windows.shape == (16, 10, 10, 16)
    assert plan.kept_fraction(windowed_only=True) == pytest.approx(0.15, abs=0.002)
    assert plan.kept_fraction() > plan.kept_fraction(windowed_only=True)  # the dense first scales count too


def test_a_band_plan_uses_the_calibration_windows_the_same_in_every_layer_and_head() -> None:
    plan = band_plan(2, 3, DEMO_PATCH_NUMS, 0.3)
    assert plan.settings.shape == "band"
    ds = plan.settings.dense_scales
    for s in range(ds, len(DEMO_PATCH_NUMS)):
        for b in range(ds, s + 1):
            block = plan.windows[:, s, b]
            assert (block == block[0, 0]).all()
            allowed = {DROP, FULL, *candidates("band", DEMO_PATCH_NUMS[b])}
            assert int(block[0, 0]) in allowed, (s, b)
    shares = [band_plan(2, 3, DEMO_PATCH_NUMS, k).kept_fraction(windowed_only=True) for k in (0.2, 0.4, 0.8)]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_a_target_below_the_always_kept_keys_drops_every_windowed_block() -> None:
    plan = band_plan(2, 3, DEMO_PATCH_NUMS, 0.0)
    ds = plan.settings.dense_scales
    for s in range(ds, len(DEMO_PATCH_NUMS)):
        assert (plan.windows[:, s, ds : s + 1] == DROP).all()
    assert plan.kept_fraction(windowed_only=True) > 0  # the first scales' keys stay: no row without keys
    with pytest.raises(ValueError, match="share"):
        band_plan(2, 3, DEMO_PATCH_NUMS, 1.5)


def test_a_band_plan_fits_its_model_and_round_trips(tmp_path: Path) -> None:
    cfg = PRESETS["d16"].var
    plan = band_plan(cfg.depth, cfg.num_heads, cfg.patch_nums, 0.15)
    plan.check_fits(cfg.depth, cfg.num_heads, cfg.patch_nums)
    plan.save(tmp_path / "band.safetensors")
    loaded = WindowPlan.load(tmp_path / "band.safetensors")
    assert torch.equal(loaded.windows, plan.windows) and loaded.settings == plan.settings
    with pytest.raises(ValueError, match="heads"):
        loaded.check_fits(cfg.depth, cfg.num_heads + 1, cfg.patch_nums)
    (tmp_path / "not-a-plan.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a window plan"):
        WindowPlan.load(tmp_path / "not-a-plan.safetensors")


def test_the_band_plan_command_writes_a_plan_for_a_preset_or_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "band.safetensors"
    assert main(["band-plan", "--preset", "d16", "--keep", "0.15", "--out", str(out)]) == 0
    cfg = PRESETS["d16"].var
    WindowPlan.load(out).check_fits(cfg.depth, cfg.num_heads, cfg.patch_nums)
    assert "keeping 15.00% of the windowed" in capsys.readouterr().out
    assert main(["band-plan", "--checkpoint", str(DEMO), "--keep", "0.3", "--out", str(out)]) == 0
    demo = PRESETS["demo"].var
    WindowPlan.load(out).check_fits(demo.depth, demo.num_heads, demo.patch_nums)
    assert main(["band-plan", "--keep", "2", "--out", str(out)]) == 2


# ---- the sparse kernels on band plans --------------------------------------------------------------------
def cache_like_qkv(rows: int, heads: int, step: ScaleStep, seq_len: int, dim: int = 16) -> tuple[torch.Tensor, ...]:
    """Queries of the scale; keys and values sliced from a longer buffer, strided as the KV cache hands them."""
    g = torch.Generator().manual_seed(step.si)
    q = torch.randn(rows, heads, step.num_tokens, dim, generator=g)
    k, v = (torch.randn(rows, heads, seq_len, dim, generator=g)[:, :, : step.end] for _ in range(2))
    return q, k, v


def reference(q, k, v, kept: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense masked form: softmax over kept pairs only (-inf elsewhere), in float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.masked_fill(~kept, float("-inf")).softmax(-1) @ v.double()


@pytest.fixture(scope="module")
def d16_band() -> WindowPlan:
    """A band plan at the d16 sequence lengths, two heads with different windows (as calibrated plans have)."""
    plan = band_plan(1, 2, PATCH_NUMS_256, 0.15)
    wider = band_plan(1, 2, PATCH_NUMS_256, 0.3)
    plan.windows[:, :, :, 1] = wider.windows[:, :, :, 1]
    return plan


@pytest.mark.parametrize("si", [8, 9])  # 169 queries (tiles padded), 256 queries by 680 keys
def test_the_key_tiles_route_equals_the_masked_dense_computation(d16_band: WindowPlan, si: int) -> None:
    step = scale_steps(d16_band.patch_nums)[si]
    kept = d16_band.kept(0, step)
    route = route_for(kept, 0.0)
    assert isinstance(route.blocks, KeyTiles)
    kernel = PlannedAttention()
    kernel.routes[si] = route
    q, k, v = cache_like_qkv(4, 2, step, seq_len=680)
    out = kernel(q, k, v, scale=0.3, attn_bias=None, step=step)
    torch.testing.assert_close(out.double(), reference(q, k, v, kept, 0.3), **TOL)
    # what the tiles compute: more than the kept pairs, well under all of them, and counted as run
    assert int(kept.sum()) < route.blocks.pairs < 0.6 * kept.numel()
    assert kernel.ran[si].sparse == 1 and kernel.ran[si].scores == 4 * route.blocks.pairs


def test_key_tiles_cover_every_kept_pair_once_and_nothing_else(d16_band: WindowPlan) -> None:
    step = scale_steps(d16_band.patch_nums)[8]
    kept = d16_band.kept(0, step)
    tiles = key_tiles(kept)
    heads, n, p = kept.shape
    assert tiles.size * tiles.keys.shape[1] - n < tiles.keys.shape[1]  # balanced: less than a row per tile padded
    rebuilt = torch.zeros(heads, tiles.keys.shape[1] * tiles.size, p, dtype=torch.int64)
    where = tiles.keys[:, :, None, :].expand_as(tiles.bias).flatten(1, 2)
    rebuilt.scatter_add_(2, where, (tiles.bias == 0).flatten(1, 2).long())
    assert torch.equal(rebuilt[:, :n] == 1, kept) and rebuilt.max() == 1


def test_key_tiles_one_head_at_a_time_equal_all_heads_at_once(
    d16_band: WindowPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row over the gather budget goes by groups of heads (here one head each): the same result."""
    step = scale_steps(d16_band.patch_nums)[9]
    kept = d16_band.kept(0, step)
    tiles = key_tiles(kept)
    q, k, v = cache_like_qkv(3, 2, step, seq_len=680)
    all_heads = tiled_attention(q, k, v, tiles, 0.3)
    monkeypatch.setattr(attention, "TILE_CHUNK", 1)
    torch.testing.assert_close(tiled_attention(q, k, v, tiles, 0.3), all_heads, **TOL)
    torch.testing.assert_close(all_heads.double(), reference(q, k, v, kept, 0.3), **TOL)


def test_the_masked_route_row_by_row_equals_all_rows_at_once(
    d16_band: WindowPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = scale_steps(d16_band.patch_nums)[9]
    kept = d16_band.kept(0, step)
    kernel = PlannedAttention()
    kernel.routes[step.si] = route_for(kept, 2.0)  # 2.0: never sparse
    q, k, v = cache_like_qkv(3, 2, step, seq_len=680)
    at_once = kernel(q, k, v, scale=0.3, attn_bias=None, step=step)
    monkeypatch.setattr(attention, "TILE_CHUNK", 1)
    by_row = kernel(q, k, v, scale=0.3, attn_bias=None, step=step)
    torch.testing.assert_close(by_row, at_once, **TOL)
    torch.testing.assert_close(by_row.double(), reference(q, k, v, kept, 0.3), **TOL)
    assert kernel.ran[step.si].masked == 2 and kernel.ran[step.si].scores == 2 * 3 * kept.numel()


@pytest.mark.parametrize("windowed", [False, True])
def test_shared_probabilities_row_by_row_equal_all_rows_at_once(
    d16_band: WindowPlan, monkeypatch: pytest.MonkeyPatch, windowed: bool
) -> None:
    """Sharing at the d16 shape's last scale: conditional row r's probabilities weight rows r and B + r, the
    same whether the conditional rows go together or one at a time (over the score budget)."""
    step = scale_steps(d16_band.patch_nums)[9]
    kept = d16_band.kept(0, step) if windowed else torch.ones(2, step.num_tokens, step.end, dtype=torch.bool)
    kernel = PlannedAttention()
    kernel.routes[step.si] = route_for(kept, 2.0)  # 2.0: never sparse
    kernel.share_scales = frozenset({step.si})
    q, k, v = cache_like_qkv(4, 2, step, seq_len=680)
    at_once = kernel(q, k, v, scale=0.3, attn_bias=None, step=step)
    monkeypatch.setattr(attention, "TILE_CHUNK", 1)
    by_row = kernel(q, k, v, scale=0.3, attn_bias=None, step=step)
    torch.testing.assert_close(by_row, at_once, **TOL)
    conditional = reference(q[:2], k[:2], v[:2], kept, 0.3)
    torch.testing.assert_close(by_row[:2].double(), conditional, **TOL)
    unconditional_values = reference(q[:2], k[:2], v[2:], kept, 0.3)  # the conditional q and k, their own values
    torch.testing.assert_close(by_row[2:].double(), unconditional_values, **TOL)
    assert kernel.ran[step.si].scores == 2 * 2 * kept.numel() and kernel.ran[step.si].weighted == 4 * 2 * kept.numel()


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tiles compiled", "flex"])
def test_the_compiled_sparse_kernels_equal_the_masked_dense_computation(d16_band: WindowPlan, kernel: str) -> None:
    """The key tiles under torch.compile (the compiled step's form) and FlexAttention (the GPU's kernel),
    both on CPU."""
    step = scale_steps(d16_band.patch_nums)[8]
    kept = d16_band.kept(0, step)
    q, k, v = cache_like_qkv(2, 2, step, seq_len=680)
    if kernel == "flex":
        route = route_for(kept, 0.0, sparse_kernel="flex")
        assert route.blocks is not None and not isinstance(route.blocks, KeyTiles)
        planned = PlannedAttention()
        planned.routes[step.si] = route
        out = planned(q, k, v, scale=0.3, attn_bias=None, step=step)
    else:
        out = torch.compile(tiled_attention, fullgraph=True)(q, k, v, key_tiles(kept), 0.3)
    torch.testing.assert_close(out.double(), reference(q, k, v, kept, 0.3), **TOL)


def test_a_scale_where_tiles_skip_too_little_takes_the_masked_route() -> None:
    plan = band_plan(1, 2, PATCH_NUMS_256, 0.9)
    step = scale_steps(PATCH_NUMS_256)[9]
    route = route_for(plan.kept(0, step), 0.5)
    assert route.blocks is None and route.bias is not None
    with pytest.raises(ValueError, match="sparse kernel"):
        route_for(plan.kept(0, step), 0.5, sparse_kernel="blocks")


def test_window_settings_of_a_band_plan_keep_the_dense_scales_asked_for() -> None:
    plan = band_plan(1, 2, DEMO_PATCH_NUMS, 0.3, WindowSettings(dense_scales=4, shape="square"))
    assert plan.settings.dense_scales == 4 and plan.settings.shape == "band"
    assert (plan.windows[:, 3] == FULL).all()  # scale 3 is dense now
