"""Sharing plans of attention sharing across CFG: calibration, the file, and the pass sharing exactly where the
plan says."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from app.compress import VARIANTS, apply_variant
from app.compress.attention import PlannedAttention
from app.compress.attention_passes import cfg_attention_sharing
from app.compress.calibrate import calibrate, calibrate_plans, calibrate_sharing
from app.compress.plans import MissingSharingPlan, PlanNotGiven, PlanOrigin, load_sharing_plan, plans_for
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan, SharingSettings, guidance_ramp
from app.compress.windows import WindowSettings
from app.model.checkpoint import load_folder
from app.model.checksums import write_sums
from app.model.pipeline import VARPipeline
from app.serve.models import load_model
from tests.conftest import DEMO
from tests.spread_weights import small_pipeline

LABELS, SEEDS = [0, 3, 7], [11, 12, 13]
FEW = SharingSettings(batches=1, batch_size=3)


@pytest.fixture(scope="module")
def demo() -> VARPipeline:
    return load_folder(DEMO)


def shipped_plan(demo: VARPipeline) -> SharingPlan:
    return load_sharing_plan(DEMO / SHARING_PLAN_FILE, demo.config.var)


@pytest.fixture(scope="module")
def small() -> VARPipeline:
    """Three layers, scales (1, 2, 4), weights spread so that attention is far from uniform."""
    return small_pipeline(depth=3, embed_dim=64, seed=5)


def blind_to_the_class(pipe: VARPipeline) -> VARPipeline:
    """Every class, the null class included, embedded alike: the unconditional rows compute what the
    conditional rows compute."""
    with torch.no_grad():
        pipe.var.class_emb.weight.copy_(pipe.var.class_emb.weight[:1].expand_as(pipe.var.class_emb.weight))
    return pipe


def perturb_unconditional_input(pipe: VARPipeline, layer: int) -> None:
    """The attention of `layer` sees the unconditional rows' input rotated along the channels."""

    def rotate(module, args, kwargs):
        step = kwargs.get("step")
        if step is None or not step.guided:
            return None
        x = args[0].clone()
        half = x.shape[0] // 2
        x[half:] = x[half:].roll(1, dims=-1)
        return (x, *args[1:]), kwargs

    pipe.var.block_list[layer].attn.register_forward_pre_hook(rotate, with_kwargs=True)


def plan_for(pipe: VARPipeline, shared: list[tuple[int, int]]) -> SharingPlan:
    """A plan sharing exactly the given (layer, scale) pairs: distance 0 there, 1 elsewhere, threshold 0.5."""
    cfg = pipe.config.var
    distances = torch.ones(cfg.depth, len(cfg.patch_nums), dtype=torch.float64)
    for layer, scale in shared:
        distances[layer, scale] = 0.0
    return SharingPlan(cfg.patch_nums, distances, SharingSettings(threshold=0.5))


def shared_scales(pipe: VARPipeline) -> list[frozenset[int]]:
    kernels = [blk.attn.kernel for blk in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) for k in kernels)
    return [k.share_scales for k in kernels]


# ---- calibration --------------------------------------------------------------------------------------
def test_identical_conditional_and_unconditional_attention_is_shared_everywhere(small: VARPipeline) -> None:
    plan = calibrate_sharing(blind_to_the_class(copy.deepcopy(small)), FEW)
    assert plan.distances.shape == (3, 3)
    assert plan.distances.abs().max() < 1e-6
    assert plan.shared.all()


def test_a_perturbed_layer_is_not_shared_and_the_layers_before_it_are(small: VARPipeline) -> None:
    """Layer 1's unconditional rows attend differently; layer 0 never sees the perturbation. Scale 0 has one
    key, so equal probabilities, and no guidance: shared in every layer."""
    pipe = blind_to_the_class(copy.deepcopy(small))
    perturb_unconditional_input(pipe, 1)
    plan = calibrate_sharing(pipe, FEW)
    assert plan.distances[0].abs().max() < 1e-6
    assert (plan.distances[1, 1:] > 0.01).all()
    assert plan.shared[:, 0].all()
    assert plan.with_threshold(0.01).scales(1) == {0} and plan.with_threshold(0.01).scales(0) == {0, 1, 2}


def test_the_distance_is_the_ramp_weighted_relative_error_of_the_unconditional_output(small: VARPipeline) -> None:
    """Checked against an independent computation at the last scale of layer 2 on one batch."""
    pipe = copy.deepcopy(small)
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, kwargs, out):
        if kwargs["step"].si == 2:
            seen["q"], seen["k"], seen["v"] = args[0], args[1], args[2]

    hook = pipe.var.block_list[2].attn.kernel.register_forward_hook(keep, with_kwargs=True)
    pipe.generate([0, 1, 2], seeds=[0, 1, 2])  # calibration's first batch: classes 0-2, seeds from 0
    hook.remove()
    q, k, v = (seen[x].double() for x in "qkv")
    scale = pipe.var.block_list[2].attn.scale
    p = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    own, shared = p[3:] @ v[3:], p[:3] @ v[3:]
    expected = ((shared - own).norm() / own.norm()).item() * guidance_ramp((1, 2, 4))[2].item()
    plan = calibrate_sharing(copy.deepcopy(small), FEW)
    assert plan.distances[2, 2].item() == pytest.approx(expected, rel=1e-5)


def test_one_run_gives_both_plans_as_the_separate_calibrations_do(small: VARPipeline) -> None:
    windows = WindowSettings(dense_scales=1, batches=1, batch_size=3)
    both_windows, both_sharing = calibrate_plans(copy.deepcopy(small), windows, FEW)
    assert torch.equal(both_windows.windows, calibrate(copy.deepcopy(small), windows).windows)
    assert torch.equal(both_sharing.distances, calibrate_sharing(copy.deepcopy(small), FEW).distances)
    with pytest.raises(ValueError, match="must agree"):
        calibrate_plans(copy.deepcopy(small), windows, SharingSettings(batches=2, batch_size=3))


# ---- the file -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.05, math.inf])
def test_a_plan_round_trips_through_its_file(tmp_path: Path, threshold: float) -> None:
    distances = torch.tensor([[0.0, 0.02, math.inf], [0.0, 0.3, 0.07]], dtype=torch.float64)
    plan = SharingPlan((1, 2, 4), distances, SharingSettings(threshold=threshold, batches=2, seed=9))
    plan.save(tmp_path / "plan.safetensors")
    loaded = SharingPlan.load(tmp_path / "plan.safetensors")
    assert torch.equal(loaded.distances, distances) and loaded.settings == plan.settings
    assert loaded.patch_nums == (1, 2, 4) and torch.equal(loaded.shared, plan.shared)
    assert loaded.scales(0) == {0, 1}  # inf: calibration saw no guided rows there, never shared
    assert loaded.scales(1) == ({0} if threshold == 0.05 else {0, 1, 2})


def test_a_plan_for_another_model_is_refused_naming_what_differs() -> None:
    plan = SharingPlan((1, 2, 4), torch.zeros(3, 3, dtype=torch.float64), SharingSettings())
    plan.check_fits(3, (1, 2, 4))
    with pytest.raises(
        ValueError, match=re.escape("depth 3 (the model: 4); patch_nums (1, 2, 4) (the model: (1, 2, 3))")
    ):
        plan.check_fits(4, (1, 2, 3))
    with pytest.raises(ValueError, match=r"^the sharing plan does not fit the model: patch_nums"):
        plan.check_fits(3, (1, 2, 3, 4))


# ---- the pass -----------------------------------------------------------------------------------------
def test_the_pass_shares_exactly_where_the_plan_says(demo: VARPipeline) -> None:
    """Counted as the kernels ran: scores of the unconditional rows are skipped at the planned pairs only."""
    where = [(0, 6), (0, 2), (1, 4), (3, 6)]
    shared = cfg_attention_sharing(copy.deepcopy(demo), plan=plan_for(demo, where))
    dense = cfg_attention_sharing(copy.deepcopy(demo), plan=plan_for(demo, []))
    assert shared_scales(shared) == [frozenset({2, 6}), frozenset({4}), frozenset(), frozenset({6})]
    assert shared_scales(dense) == [frozenset()] * 4
    shared.generate(LABELS, seeds=SEEDS)
    dense.generate(LABELS, seeds=SEEDS)
    kernels = zip(shared.var.block_list, dense.var.block_list, strict=True)
    for layer, (k, ref) in enumerate((a.attn.kernel, b.attn.kernel) for a, b in kernels):
        for si in range(len(demo.steps)):
            full = ref.ran[si].scores
            assert k.ran[si].scores == (full // 2 if (layer, si) in where else full), (layer, si)


def test_sharing_nowhere_reproduces_the_baseline_tokens(demo: VARPipeline) -> None:
    a = cfg_attention_sharing(copy.deepcopy(demo), plan=plan_for(demo, [])).generate(LABELS, seeds=SEEDS)
    b = demo.generate(LABELS, seeds=SEEDS)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))


def test_explicit_scales_and_layers_override_the_plan(demo: VARPipeline) -> None:
    pipe = cfg_attention_sharing(copy.deepcopy(demo), plan=plan_for(demo, [(0, 6)]), scales=(5,), layers=(1, 2))
    assert shared_scales(pipe) == [frozenset(), frozenset({5}), frozenset({5}), frozenset()]


def test_the_sharing_variants_use_the_plan_saved_beside_the_checkpoint(demo: VARPipeline) -> None:
    plan = shipped_plan(demo)
    assert 0 < int(plan.shared.sum()) < plan.shared.numel()  # the demo's calibrated scope: neither end
    expected = [plan.scales(layer) for layer in range(plan.depth)]
    for name in ("cfg-share", "litevar-float", "litevar"):
        plans = plans_for(demo, DEMO, [VARIANTS[name]])
        assert plans.sharing_origin is PlanOrigin.FILE, name
        assert shared_scales(apply_variant(name, copy.deepcopy(demo), plans=plans)) == expected, name


def test_without_a_saved_plan_sharing_refuses_naming_the_command(tmp_path: Path, small: VARPipeline) -> None:
    cfg_share = [VARIANTS["cfg-share"]]
    with pytest.raises(MissingSharingPlan, match=re.escape("calibrate --model <folder> --sharing-only`")):
        plans_for(small, None, cfg_share)
    command = f"`python -m app.compress calibrate --model {tmp_path} --sharing-only`"
    with pytest.raises(MissingSharingPlan, match=re.escape(command)):
        plans_for(small, tmp_path, cfg_share)
    with pytest.raises(PlanNotGiven, match="variant 'cfg-share' takes a sharing plan"):
        apply_variant("cfg-share", copy.deepcopy(small))
    with pytest.raises(ValueError, match="takes a sharing plan, or explicit scales or layers"):
        cfg_attention_sharing(copy.deepcopy(small))


def test_the_service_loads_the_sharing_plan_and_says_where_it_came_from(tmp_path: Path, demo: VARPipeline) -> None:
    cpu = torch.device("cpu")
    model = load_model(DEMO, ["baseline", "cfg-share", "litevar-float"], cpu)
    origins = {name: v.sharing_plan for name, v in model.variants.items()}
    assert origins == {"baseline": None, "cfg-share": PlanOrigin.FILE, "litevar-float": PlanOrigin.FILE}
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns(SHARING_PLAN_FILE))
    write_sums(folder)
    with pytest.raises(MissingSharingPlan):
        load_model(folder, ["cfg-share"], cpu)
    calibrated = load_model(folder, ["cfg-share"], cpu, calibrate_missing_plans=True).variants["cfg-share"]
    assert calibrated.sharing_plan is PlanOrigin.CALIBRATED
    plan = shipped_plan(demo)  # the same calibration settings give the shipped plan's scope
    assert shared_scales(calibrated.pipeline) == [plan.scales(layer) for layer in range(plan.depth)]
