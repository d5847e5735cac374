"""Variants as data: every named variant keeps its passes and options, the registry describes itself as plain
data, typed options reach the pass functions, and the passes take the checkpoint's plans from the caller: windowed
attention never calibrates behind the caller's back."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import pytest
import torch

from app.compress import (
    GUIDANCE_OFF_LAST,
    PASSES,
    VARIANTS,
    WINDOWED_ATTENTION,
    apply_variant,
    describe,
    variant_spec,
)
from app.compress.attention import PlannedAttention
from app.compress.guidance import GuidanceOff, guidance_off_last
from app.compress.plans import PlanNotGiven, Plans
from app.compress.registry import PassSpec, PlanKind, Step
from app.compress.windows import WindowPlan, WindowSettings
from app.model.checkpoint import random_pipeline
from app.model.config import DEMO
from app.model.pipeline import VARPipeline

DEFAULT = "device_default_precision"
ATTENTION = ["windowed_attention", "cfg_attention_sharing"]
LITEVAR = [DEFAULT, *ATTENTION, "quantize_linears", "int8_vqvae"]
PASSES_OF = {
    "baseline": [DEFAULT],
    "bf16": ["autocast_bf16"],
    "litevar": [*LITEVAR, "compiled_where_faster"],
    "litevar-eager": LITEVAR,
    "windows": [DEFAULT, "windowed_attention"],
    "cfg-share": [DEFAULT, "cfg_attention_sharing"],
    "w8a8": [DEFAULT, "quantize_linears"],
    "vqvae-bf16": [DEFAULT, "bf16_vqvae"],
    "vqvae-int8": [DEFAULT, "int8_vqvae"],
    "guidance-off": [DEFAULT, "guidance_off_last"],
    "litevar-float": [DEFAULT, *ATTENTION],
    "compiled": [DEFAULT, "compiled_step"],
    "autotuned": [DEFAULT, "autotuned_step"],
    "fastest": [DEFAULT, *ATTENTION, "quantize_linears", "int8_vqvae", "guidance_off_last", "compiled_step"],
    "fastest-int8": [*LITEVAR, "guidance_off_last"],
}


@pytest.fixture(scope="module")
def demo_shaped() -> VARPipeline:
    """Random weights of the demo's shape, with no checkpoint folder (so no saved window plan)."""
    return random_pipeline(DEMO, seed=0)


def test_every_variant_keeps_its_passes_in_order() -> None:
    assert {name: [p["name"] for p in v.describe()] for name, v in VARIANTS.items()} == PASSES_OF
    unguided = {name for name, v in VARIANTS.items() if v.uses(GUIDANCE_OFF_LAST)}
    assert unguided == {"guidance-off", "fastest", "fastest-int8"}
    for name in unguided:
        options = [step.options for step in VARIANTS[name].steps if step.spec is GUIDANCE_OFF_LAST]
        assert options == [GuidanceOff(scales=1)], name
    windowed = {name for name, v in VARIANTS.items() if v.uses(WINDOWED_ATTENTION)}
    assert windowed == {"litevar", "litevar-eager", "windows", "litevar-float", "fastest", "fastest-int8"}


def test_the_registry_describes_itself_as_plain_data() -> None:
    described = describe()
    assert json.loads(json.dumps(described)) == described  # nothing but JSON values
    assert set(described) == set(VARIANTS) and all(v["purpose"] for v in described.values())
    quantize = described["litevar"]["passes"][3]
    assert quantize["options"]["bf16"] == ["ffn.fc2"] and quantize["summary"] == PASSES["quantize_linears"].summary
    assert described["fastest-int8"]["passes"][-1]["options"] == {"scales": 1}
    assert described["baseline"]["passes"] == [{"name": DEFAULT, "options": {}, "summary": PASSES[DEFAULT].summary}]
    assert all(spec.summary and "\n" not in spec.summary for spec in PASSES.values())


def test_an_unknown_variant_names_the_known_ones(demo_shaped: VARPipeline) -> None:
    with pytest.raises(ValueError, match="unknown variant 'turbo'; known variants: baseline, bf16, litevar"):
        apply_variant("turbo", demo_shaped)
    with pytest.raises(ValueError, match="fastest-int8"):
        variant_spec("turbo")


def test_typed_options_reach_the_pass_function(demo_shaped: VARPipeline) -> None:
    pipe = apply_variant("guidance-off", copy.deepcopy(demo_shaped))
    assert pipe.guided_scales == len(DEMO.var.patch_nums) - 1  # scales=1, not the function's default of 2
    assert Step(GUIDANCE_OFF_LAST).options == GuidanceOff()  # no options given: the defaults


def test_options_must_match_the_function_and_its_defaults() -> None:
    @dataclass(frozen=True)
    class Renamed:
        last: int = 2

    @dataclass(frozen=True)
    class OtherDefault:
        scales: int = 1

    for options_type in (Renamed, OtherDefault):
        with pytest.raises(TypeError, match="not keyword options of guidance_off_last"):
            PassSpec("guidance_off_last", guidance_off_last, options_type, "summary")
    with pytest.raises(TypeError, match="takes GuidanceOff options"):
        Step(GUIDANCE_OFF_LAST, OtherDefault())
    with pytest.raises(TypeError, match="takes no options"):
        Step(PASSES[DEFAULT], GuidanceOff())


def test_windowed_attention_refuses_without_a_plan_and_uses_a_given_one(demo_shaped: VARPipeline) -> None:
    untouched = copy.deepcopy(demo_shaped)
    with pytest.raises(PlanNotGiven, match=re.escape("variant 'windows' takes a window plan and none was given")):
        apply_variant("windows", untouched)
    assert not any(isinstance(blk.attn.kernel, PlannedAttention) for blk in untouched.var.block_list)
    cfg = DEMO.var
    plan = WindowPlan.full(cfg.depth, cfg.num_heads, cfg.patch_nums, WindowSettings(dense_scales=5))
    with pytest.raises(PlanNotGiven, match="variant 'litevar-float' takes a sharing plan"):
        apply_variant("litevar-float", copy.deepcopy(demo_shaped), plans=Plans(windows=plan))
    pipe = apply_variant("windows", copy.deepcopy(demo_shaped), plans=Plans(windows=plan))
    kernels = [blk.attn.kernel for blk in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) and set(k.routes) == {5, 6} for k in kernels)


def test_every_variant_takes_the_plans_of_its_attention_passes() -> None:
    takes = {name: v.plans() for name, v in VARIANTS.items()}
    windows, sharing = PlanKind.WINDOWS, PlanKind.SHARING
    both = {"litevar", "litevar-eager", "litevar-float", "fastest", "fastest-int8"}
    assert {name for name, kinds in takes.items() if kinds == {windows, sharing}} == both
    assert takes["windows"] == {windows} and takes["cfg-share"] == {sharing}
    assert all(not kinds for name, kinds in takes.items() if name not in {*both, "windows", "cfg-share"})


def test_a_pass_said_to_take_a_plan_must_have_a_plan_argument() -> None:
    with pytest.raises(TypeError, match="guidance_off_last takes a window plan but has no keyword argument `plan`"):
        PassSpec("guidance_off_last", guidance_off_last, GuidanceOff, "summary", PlanKind.WINDOWS)


@pytest.mark.parametrize("level", ["avx2", "avx512_bf16"])
def test_the_variants_that_compile_are_known_per_device(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """compiled_step and autotuned_step compile everywhere; litevar's step where the hardware table says that is
    faster (not on AVX2, where its int8 kernel is fbgemm's); windowed attention on CUDA (FlexAttention)."""
    monkeypatch.setenv("VAR_CPU_ISA", level)
    on_cpu = {name for name, v in VARIANTS.items() if v.compiled(torch.device("cpu"))}
    on_cuda = {name for name, v in VARIANTS.items() if v.compiled(torch.device("cuda"))}
    always = {"compiled", "autotuned", "fastest"}
    assert on_cpu == (always if level == "avx2" else always | {"litevar"})
    assert on_cuda == always | {"litevar", "litevar-eager", "litevar-float", "windows", "fastest-int8"}


@pytest.mark.parametrize("level", ["avx2", "avx512_bf16"])
def test_bf16_warns_where_bfloat16_is_emulated(
    level: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`bf16` keeps its precision everywhere; where the hardware table says bfloat16 is not native (4x slower than
    float32 at d16 held to AVX2) the operator is told so."""
    monkeypatch.setenv("VAR_CPU_ISA", level)
    with caplog.at_level("WARNING", logger="app.compress"):
        pipe = apply_variant("bf16", random_pipeline(DEMO, seed=0))
    assert pipe.autocast_dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "bfloat16 is not native" in r.getMessage()]
    assert len(warned) == (1 if level == "avx2" else 0)
