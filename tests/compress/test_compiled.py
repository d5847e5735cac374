"""compiled_step and autotuned_step: the compiled step and decoder reproduce the eager pipeline, per pipeline,
in one process."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import app.compress.compiled as compiled_module
from app.compress import VARIANTS, apply_variant
from app.compress.attention_passes import cfg_attention_sharing, windowed_attention
from app.compress.compiled import (
    ACCUMULATED_RECOMPILE_LIMIT,
    RECOMPILE_LIMIT,
    autotuned_step,
    compiled_step,
    compiled_where_faster,
    graph_batch_sizes,
    with_dynamo_budgets,
)
from app.compress.guidance import guidance_off_last
from app.compress.plans import Plans
from app.compress.quantize import layer_kernels, quantize_linears
from app.compress.sharing import SharingPlan, SharingSettings
from app.compress.windows import DROP, WindowPlan, WindowSettings
from app.model.pipeline import VARPipeline
from tests.spread_weights import small_pipeline

pytestmark = pytest.mark.compile

LABELS, SEEDS = [0, 3], [21, 22]
COLD_INDUCTOR = {"fx_graph_cache": False, "autotune_local_cache": False}  # nothing reused from earlier runs


@pytest.fixture(scope="module")
def small() -> VARPipeline:
    """Three scales, two blocks (they share the last scale's workspace), a 16x16 decoder: compiling it
    takes seconds, not minutes, on 2 cores."""
    return small_pipeline(depth=2, embed_dim=128, seed=3)


def narrow_plan(pipe: VARPipeline) -> WindowPlan:
    cfg = pipe.config.var
    plan = WindowPlan.full(cfg.depth, cfg.num_heads, cfg.patch_nums, WindowSettings(dense_scales=1))
    last = len(cfg.patch_nums) - 1
    plan.windows[:, last, :last] = DROP  # the last scale sees only itself
    plan.windows[:, last, last] = 1
    return plan


def narrow_windows(pipe: VARPipeline) -> VARPipeline:
    return windowed_attention(pipe, plan=narrow_plan(pipe))


def assert_same_generation(eager: VARPipeline, compiled: VARPipeline, labels: list[int], seeds: list[int]) -> None:
    a, b = eager.generate(labels, seeds=seeds), compiled.generate(labels, seeds=seeds)
    for si, (ta, tb) in enumerate(zip(a.tokens, b.tokens, strict=True)):
        assert ta.equal(tb), f"tokens differ at scale {si}"
    # GEMMs and convolutions are the same kernels; fused GroupNorm and softmax may round differently
    assert (a.images - b.images).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_pipelines_match_their_eager_twins_side_by_side(small: VARPipeline) -> None:
    """Two differently compressed pipelines compiled in one process: each must run its own graphs. Dynamo
    keeps its cache on the code object and the pass skips module guards, so without a code object per
    pipeline the second one runs the first one's graphs and this test fails (checked)."""
    plain, windowed = copy.deepcopy(small), narrow_windows(copy.deepcopy(small))
    plain_c, windowed_c = compiled_step(copy.deepcopy(plain)), compiled_step(copy.deepcopy(windowed))
    keys = set(small.var.state_dict())
    assert set(plain_c.var.state_dict()) == keys and set(windowed_c.var.state_dict()) == keys
    assert plain.generate(LABELS, seeds=SEEDS).tokens[-1].ne(windowed.generate(LABELS, seeds=SEEDS).tokens[-1]).any()
    for eager, compiled in ((plain, plain_c), (windowed, windowed_c)):
        assert_same_generation(eager, compiled, LABELS, SEEDS)
    assert_same_generation(plain, plain_c, [1, 2, 3], [5, 6, 7])  # a new batch size recompiles with its own graphs


@pytest.mark.slow
def test_compiled_guidance_off_and_sharing_match_eager(small: VARPipeline) -> None:
    """Guidance off at the last scale halves the rows (the cache becomes a view of its first rows) and
    sharing reads the conditional rows' probabilities: both must trace to the eager tokens."""
    eager = guidance_off_last(narrow_windows(copy.deepcopy(small)), scales=1)
    eager = cfg_attention_sharing(eager, scales=(0, 1, 2))  # every scale: random weights have no sharing plan
    assert_same_generation(eager, compiled_step(copy.deepcopy(eager)), LABELS, SEEDS)


@pytest.mark.slow
def test_litevar_compiles_where_the_table_says_with_the_tokens_of_eager_litevar(
    small: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the hardware table says compiled is faster (AVX-512 BF16: int8 on torch._int_mm, fc2 in native
    bfloat16, forced here) `litevar` is `litevar-eager` with its step compiled. Tolerance on this model: every
    token equal (the GEMMs are the same kernels and the int32 sums exact), images within 1e-5, an image
    independent of its batch; on the demo model a fused kernel's rounding changes a token now and then (the
    distance measured: docs/benchmarks.md, "litevar compiled"). On AVX2 (fbgemm's int8 layers) it stays eager."""
    cfg = small.config.var
    shares_last = torch.ones(cfg.depth, len(cfg.patch_nums), dtype=torch.float64)
    shares_last[:, -1] = 0.0
    plans = Plans(narrow_plan(small), SharingPlan(cfg.patch_nums, shares_last, SharingSettings(threshold=0.5)))
    monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
    eager = apply_variant("litevar-eager", copy.deepcopy(small), plans=plans)
    compiled = apply_variant("litevar", copy.deepcopy(small), plans=plans)
    assert compiled.step_fn != compiled.var.step and eager.step_fn == eager.var.step
    assert layer_kernels(compiled) == layer_kernels(eager) and "int8/int_mm" in layer_kernels(compiled).values()
    assert_same_generation(eager, compiled, [0, 3, 7], [21, 22, 23])
    alone = compiled.generate([7], seeds=[23]).tokens
    together = compiled.generate([0, 3, 7], seeds=[21, 22, 23]).tokens
    assert all(t3[2].equal(t1[0]) for t3, t1 in zip(together, alone, strict=True))
    monkeypatch.setenv("VAR_CPU_ISA", "avx2")
    on_avx2 = apply_variant("litevar", copy.deepcopy(small), plans=plans)
    assert on_avx2.step_fn == on_avx2.var.step and "int8/fbgemm" in layer_kernels(on_avx2).values()


def test_litevar_stays_eager_on_a_machine_that_cannot_build_compiled_code(
    small: VARPipeline, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a C++ compiler or Python's headers a compiled step fails at its first call: litevar, compiled
    only for speed, serves eager instead, says why, and is not warmed as a compiled variant."""
    monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
    assert compiled_module.cpu_compiler_missing() is None  # this machine builds compiled code (its tests do)
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++",)}):
        assert "C++ compiler" in str(compiled_module.cpu_compiler_missing())
    with monkeypatch.context() as m:
        m.setattr(compiled_module.sysconfig, "get_paths", lambda: {"include": "/nonexistent"})
        assert compiled_module.cpu_compiler_missing() == "Python's headers (Python.h)"
        cpu = torch.device("cpu")
        assert not VARIANTS["litevar"].compiled(cpu) and VARIANTS["fastest"].compiled(cpu)
        pipe = compiled_where_faster(quantize_linears(copy.deepcopy(small)))
    assert pipe.step_fn == pipe.var.step
    assert "the step stays eager" in caplog.text and "Python.h" in caplog.text


def test_compiling_fills_the_pipeline_hooks_and_fixed_budgets_leaving_modules_untouched(small: VARPipeline) -> None:
    """The compiled step and decoder live in the pipeline's hooks; the modules keep their own forward, and
    Dynamo's process-wide budgets are the same fixed numbers however many pipelines are compiled."""
    pipes = [compiled_step(copy.deepcopy(small)) for _ in range(3)]
    for pipe in pipes:
        assert pipe.step_fn != pipe.var.step and pipe.decoder_fn is not pipe.vqvae.decoder
        assert not any("forward" in vars(m) for m in (*pipe.var.modules(), *pipe.vqvae.modules()))
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert torch._dynamo.config.accumulated_recompile_limit == ACCUMULATED_RECOMPILE_LIMIT


def test_a_compiled_function_sets_dynamos_budgets_in_the_thread_that_calls_it() -> None:
    """Dynamo's settings are per thread; the service compiles in its worker and warm-up threads, never in the
    thread that built the variant."""
    config = torch._dynamo.config
    read = with_dynamo_budgets(lambda: (config.recompile_limit, config.accumulated_recompile_limit))
    seen: list[object] = []
    bare = threading.Thread(target=lambda: seen.append(config.recompile_limit))
    bare.start()
    bare.join()
    assert seen == [8]  # Dynamo's default in a new thread, whatever this one set
    worker = threading.Thread(target=lambda: seen.append(read()))
    worker.start()
    worker.join()
    assert seen[1] == (RECOMPILE_LIMIT, ACCUMULATED_RECOMPILE_LIMIT)


def test_compiled_step_refuses_packed_int8_layers(small: VARPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "avx2")  # the hardware table's int8 kernel there: fbgemm
    quantized = quantize_linears(copy.deepcopy(small))
    with pytest.raises(ValueError, match="fbgemm"):
        compiled_step(quantized)


@pytest.mark.slow
def test_autotuned_step_freezes_weights_matches_eager_and_stays_batch_invariant(
    small: VARPipeline, capfd: pytest.CaptureFixture[str]
) -> None:
    """The settings must reach Dynamo's tracing: given as compile options only, nothing is frozen and no
    GEMM is autotuned (checked), so the counters below would stay at zero. Inductor's caches are off here:
    a graph or timing from an earlier run would skip the work the counters count. Autotuning stays out of
    the log."""
    before = dict(counters["inductor"])
    eager, tuned = copy.deepcopy(small), autotuned_step(copy.deepcopy(small))
    with torch._inductor.config.patch(COLD_INDUCTOR):
        assert_same_generation(eager, tuned, LABELS, SEEDS)
    frozen = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - before.get(
        "mkldnn_linear_weight_pack_matcher_count", 0
    )
    assert frozen > 0, "no linear layer was frozen into the graphs"
    assert counters["inductor"]["select_algorithm_autotune"] > before.get("select_algorithm_autotune", 0)
    with torch._inductor.config.patch(COLD_INDUCTOR):
        together = tuned.generate([0, 3, 7], seeds=[21, 22, 23]).tokens
        alone = tuned.generate([7], seeds=[23]).tokens
    for si, (t3, t1) in enumerate(zip(together, alone, strict=True)):
        assert t3[2].equal(t1[0]), f"scale {si}: an image depends on its batch"
    assert "AUTOTUNE" not in capfd.readouterr().err


@pytest.mark.slow
def test_the_batch_sizes_that_get_graphs_of_their_own_are_those_the_service_warms(small: VARPipeline) -> None:
    """Batch sizes 1 to 8 in turn through a fresh compiled pipeline: new graphs appear exactly at the sizes
    `graph_batch_sizes` names (the service warms those), and the sizes between them reuse their graphs. Size 8
    is where the first scale's 16 rows (two per image) reach the row-stable linear's other branch."""
    compiled = compiled_step(copy.deepcopy(small))
    grew = []
    for size in range(1, 9):
        before = counters["stats"]["unique_graphs"]
        compiled.generate([size % 10] * size, seeds=list(range(size)))
        if counters["stats"]["unique_graphs"] > before:
            grew.append(size)
    assert grew == graph_batch_sizes(8, compiled.steps) == [1, 2, 8]
