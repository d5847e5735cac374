"""Mixed-precision quantization: int8 and bfloat16-weight linears, the pass on whole pipelines."""

from __future__ import annotations

import copy
import ctypes
import gc

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from app.compress.compiled import compiled_step
from app.compress.hardware import Int8Kernel
from app.compress.int4 import Int4SharedAdaLin, Int4WeightLinear, pack_int4, unpack_int4
from app.compress.quantize import (
    DEFAULT_INT8,
    LAYER_TYPES,
    BF16WeightLinear,
    BF16WeightSharedAdaLin,
    Int8Linear,
    Int8SharedAdaLin,
    int_mm_linear,
    layer_kernels,
    quantize_linears,
    quantize_weight,
)
from app.model.blocks import QKVLinear
from app.model.checkpoint import random_pipeline
from app.model.config import PRESETS, PipelineConfig, VARConfig, VQVAEConfig
from app.model.memory import module_bytes
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from tests.compress.test_compiled import assert_same_generation
from tests.spread_weights import small_pipeline

KERNELS: list[Int8Kernel] = ["fbgemm", "int_mm"]  # either runs on any x86 CPU, whatever the hardware table picks


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


MALLINFO2 = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"  # all size_t


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2.split()]


def malloc_bytes() -> int:
    """Bytes in use from glibc's malloc (chunks in use plus mmapped chunks): torch's CPU tensors and fbgemm's
    packed weights are both allocated there."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def linear(n_in: int, n_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    nn.init.normal_(lin.bias, std=0.1)
    return lin


@pytest.fixture(scope="module")
def tiny() -> VARPipeline:
    return random_pipeline(PRESETS["tiny"])


@pytest.fixture(scope="module")
def tiny_quantized(tiny: VARPipeline) -> VARPipeline:
    return quantize_linears(copy.deepcopy(tiny))


# ---- Int8Linear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_within_2_percent_of_float(kernel: Int8Kernel) -> None:
    lin = linear(256, 512)
    x = torch.randn(2, 40, 256)
    y = Int8Linear.from_linear(lin, kernel)(x)
    assert y.shape == (2, 40, 512) and y.dtype == torch.float32
    assert rel_err(y, lin(x).detach()) < 0.02


@pytest.mark.parametrize("kernel", KERNELS)
def test_qkv_linear_takes_its_bias_per_call(kernel: Int8Kernel) -> None:
    torch.manual_seed(0)
    qkv = QKVLinear(64)
    q = Int8Linear.from_linear(qkv, kernel)
    assert q.bias is None
    x, bias = torch.randn(3, 5, 64), torch.randn(192)
    assert rel_err(q(x, bias), qkv(x, bias).detach()) < 0.02
    assert torch.allclose(q(x, bias), q(x) + bias, atol=1e-6)


def test_int_mm_matches_fbgemm_at_any_shape() -> None:
    # odd sizes and fewer than 17 rows: cuBLAS would need padding, the CPU's torch._int_mm takes them as they are
    for n_in, n_out, rows in [(256, 512, 50), (30, 21, 3), (30, 21, 1)]:
        lin = linear(n_in, n_out)
        x = torch.randn(rows, n_in)
        fbgemm, twin = Int8Linear.from_linear(lin, "fbgemm"), Int8Linear.from_linear(lin, "int_mm")
        assert torch.equal(fbgemm.weight, twin.weight)
        assert rel_err(twin(x), fbgemm(x)) < 0.03
        assert rel_err(twin(x), lin(x).detach()) < 0.02


def test_int_mm_linear_is_exact_int8_arithmetic_on_cpu() -> None:
    """Unpadded on CPU, at shapes cuBLAS refuses: the int32 sums equal int64 ones, dequantized elementwise; the
    last shape's output is large enough to be converted and scaled by several threads."""
    gen = torch.Generator().manual_seed(2)
    for rows, n_in, n_out in [(1, 30, 21), (5, 1024, 40), (17, 24, 16), (300, 64, 1100)]:
        x = torch.randn(rows, n_in, generator=gen) * 3
        weight, weight_scale = quantize_weight(torch.randn(n_out, n_in, generator=gen))
        x_scale = x.abs().amax(dim=1, keepdim=True) / 127
        xq = torch.round(x / x_scale).clamp(-127, 127)
        # the exact sums scaled per row, then per column
        exact = (xq.long() @ weight.long().t()).float() * x_scale * weight_scale
        assert torch.equal(int_mm_linear(x, weight, weight_scale), exact), (rows, n_in, n_out)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_does_not_depend_on_the_other_rows_bitwise(kernel: Int8Kernel) -> None:
    q = Int8Linear.from_linear(linear(128, 256), kernel)
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 128, generator=gen)
    alone = q(row)[0]
    for n in range(1, 41):
        others = torch.randn(n, 128, generator=gen) * torch.rand(n, 1, generator=gen).mul(20)
        for pos in {0, n // 2, n}:
            batch = torch.cat((others[:pos], row, others[pos:]))
            assert torch.equal(q(batch)[pos], alone), f"{n} other rows, row at {pos}"
    # leading dims (B, L, C): one token among the tokens of several sequences
    seqs = torch.randn(3, 7, 128, generator=gen)
    seqs[1, 4] = row[0]
    assert torch.equal(q(seqs)[1, 4], alone)


@pytest.mark.parametrize("kernel", KERNELS)
def test_weights_are_stored_in_int8_with_the_original_keys(kernel: Int8Kernel) -> None:
    lin = linear(64, 96)
    q = Int8Linear.from_linear(lin, kernel)
    floats = [t for t in [*q.parameters(), *q.buffers()] if t.is_floating_point() and t.numel() >= 64 * 96]
    assert floats == []
    sd = q.state_dict()
    assert set(sd) == {*lin.state_dict(), "weight_scale"}
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (96, 64)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (96,)
    assert sd["bias"].dtype == torch.float32
    # round trip, into a module quantized from other weights, with either kernel
    x = torch.randn(20, 64)
    for other_kernel in KERNELS:
        loaded = Int8Linear.from_linear(linear(64, 96, seed=1), other_kernel)
        loaded.load_state_dict(sd)
        assert torch.equal(loaded.weight, sd["weight"])
        if other_kernel == kernel:
            assert torch.equal(loaded(x), q(x))


def test_a_float_state_dict_is_quantized_on_load() -> None:
    lin = linear(64, 96)
    q = Int8Linear.from_linear(linear(64, 96, seed=1))
    q.load_state_dict(lin.state_dict())
    x = torch.randn(20, 64)
    assert torch.equal(q(x), Int8Linear.from_linear(lin)(x))


def test_a_misshapen_state_dict_is_refused() -> None:
    q = Int8Linear.from_linear(linear(64, 96))
    with pytest.raises(RuntimeError, match="weight"):
        q.load_state_dict(Int8Linear.from_linear(linear(64, 48)).state_dict())


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_weights_take_about_a_quarter_of_float32_as_held_in_memory(kernel: Int8Kernel) -> None:
    """The bytes reported for int8 layers against the memory they hold: what malloc has in use grows by that
    much while they are built. fbgemm keeps its packed weight outside any tensor (only this sees it), padded
    to its cache blocks; the demo model's 256-wide layers show the padding most."""
    shapes = [(1024, 1024), (1024, 512), (256, 768)]  # (in, out)
    floats = [linear(k, n, seed=i) for i, (k, n) in enumerate(shapes)]
    float_bytes = module_bytes(*floats)
    for lin in floats:  # the first packing of a shape allocates fbgemm's own lasting buffers: not the layers'
        Int8Linear.from_linear(lin, kernel)
    gc.collect()
    before = malloc_bytes()
    layers = [Int8Linear.from_linear(lin, kernel) for lin in floats]
    gc.collect()
    held = malloc_bytes() - before
    reported = module_bytes(*layers)
    assert abs(held - reported) < 0.005 * reported, (held, reported)
    assert 0.25 <= reported / float_bytes < (0.27 if kernel == "int_mm" else 0.4)  # int8 weights, padded by fbgemm


# ---- under torch.compile ---------------------------------------------------------------------------


@pytest.mark.compile
def test_int_mm_and_native_bf16_layers_trace_into_one_graph() -> None:
    """What a compiled step needs of its layers; fbgemm's packed weight, opaque to Dynamo, breaks the graph."""
    lin, x = linear(256, 512), torch.randn(2, 40, 256)
    for module in (Int8Linear.from_linear(lin, "int_mm"), BF16WeightLinear.from_linear(lin, native=True)):
        explained = torch._dynamo.explain(module)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch._dynamo.explain(Int8Linear.from_linear(lin, "fbgemm"))(x).graph_break_count > 0


@pytest.fixture(scope="module")
def small() -> VARPipeline:
    """Three scales, two blocks, a 16x16 decoder: compiling it takes seconds on 2 cores."""
    return small_pipeline(depth=2, embed_dim=128, seed=3)


@pytest.mark.compile
@pytest.mark.slow
def test_a_compiled_int8_pipeline_matches_its_eager_twin(small: VARPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 on torch._int_mm and fc2 in native bfloat16 (forced: the table's picks on AVX-512 BF16 and AMX),
    compiled without a graph break: one graph per scale plus the decoder. Tolerance: every token equal (the
    GEMMs are the same kernels, the int32 sums exact), images within 1e-5 (fused element-wise kernels may
    round differently), and a row still independent of its batch."""
    monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
    eager = quantize_linears(copy.deepcopy(small), int4=(), compilable=True)
    assert {"int8/int_mm", "bf16/native"} <= set(layer_kernels(eager).values())
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    compiled = compiled_step(copy.deepcopy(eager))
    assert_same_generation(eager, compiled, [0, 3, 7], [21, 22, 23])
    assert sum(counters["graph_break"].values()) == breaks
    assert counters["stats"]["unique_graphs"] - graphs == len(small.config.var.patch_nums) + 1
    alone = compiled.generate([7], seeds=[23]).tokens
    together = compiled.generate([0, 3, 7], seeds=[21, 22, 23]).tokens
    assert all(t3[2].equal(t1[0]) for t3, t1 in zip(together, alone, strict=True))


# ---- BF16WeightLinear ------------------------------------------------------------------------------


def test_bf16_weight_linear_stores_bfloat16_and_returns_float32() -> None:
    lin = linear(256, 128)
    b = BF16WeightLinear.from_linear(lin)
    assert b.weight.dtype == torch.bfloat16 and b.bias is not None and b.bias.dtype == torch.float32
    x = torch.randn(4, 9, 256)
    y = b(x)
    assert y.dtype == torch.float32 and rel_err(y, lin(x).detach()) < 0.01
    bias = torch.randn(128)
    assert torch.allclose(b(x, bias), y - lin.bias.detach() + bias, atol=1e-5)
    assert set(b.state_dict()) == set(lin.state_dict())


# ---- the pass on pipelines -------------------------------------------------------------------------


def test_the_pass_replaces_every_targeted_linear(tiny: VARPipeline, tiny_quantized: VARPipeline) -> None:
    float_modules = dict(tiny.var.named_modules())
    int8_names = []
    packed_names = []
    for name, m in tiny_quantized.var.named_modules():
        if name.endswith("ffn.fc2"):
            assert isinstance(m, BF16WeightLinear) and m.weight.dtype == torch.bfloat16, name
        elif name.endswith("ada_lin.1"):
            assert isinstance(m, Int4WeightLinear) and m.weight.dtype == torch.uint8, name
            assert m.weight.shape[1] * 2 == float_modules[name].weight.shape[1]  # two 4-bit codes per byte
            packed_names.append(name)
        elif name == "word_embed":
            assert type(m) is type(float_modules[name]), name  # float32: the study found it sensitive
        elif isinstance(float_modules[name], nn.Linear):
            assert isinstance(m, Int8Linear), name
            int8_names.append(name)
    float_left = [n for n, m in tiny_quantized.var.named_modules() if isinstance(m, nn.Linear)]
    assert float_left == ["word_embed"]
    covered = {t for t in LAYER_TYPES for n in int8_names if n == t or n.endswith("." + t)}
    assert covered == set(DEFAULT_INT8)
    scales = {f"{n}.weight_scale" for n in int8_names + packed_names}
    assert set(tiny_quantized.var.state_dict()) == {*tiny.var.state_dict(), *scales}


def test_the_quantized_pipeline_generates_and_loads_float_checkpoints(
    tiny: VARPipeline, tiny_quantized: VARPipeline
) -> None:
    gen = tiny_quantized.generate([3], seeds=[7])
    side = tiny.config.vqvae.image_size
    assert gen.images.shape == (1, 3, side, side) and gen.images.dtype == torch.float32
    assert [t.shape[1] for t in gen.tokens] == [pn * pn for pn in tiny.config.var.patch_nums]
    # a float checkpoint loads strictly into the quantized model, quantized on the way in
    reloaded = quantize_linears(random_pipeline(PRESETS["tiny"], seed=1))
    reloaded.var.load_state_dict(tiny.var.state_dict())
    labels, x = torch.tensor([3, 5]), torch.randn(2, tiny.config.var.seq_len - 1, tiny.config.var.z_channels)
    assert torch.equal(reloaded.var(labels, x), tiny_quantized.var(labels, x))


def test_shared_adaln_keeps_its_output_view() -> None:
    cfg = PipelineConfig("shared", VARConfig(depth=2, shared_aln=True), VQVAEConfig(ch=32))
    pipe = random_pipeline(cfg)
    labels = torch.tensor([1, 2, 1000])
    ref = pipe.var.condition(labels).block_mods[0]
    cases = [
        (("shared_ada_lin.1",), (), (), Int8SharedAdaLin),
        ((), ("shared_ada_lin.1",), (), BF16WeightSharedAdaLin),
        ((), (), ("shared_ada_lin.1",), Int4SharedAdaLin),
    ]
    for int8, bf16, int4, cls in cases:
        q = quantize_linears(copy.deepcopy(pipe), int8=int8, bf16=bf16, int4=int4)
        assert isinstance(q.var.get_submodule("shared_ada_lin.1"), cls)
        mod = q.var.condition(labels).block_mods[0]
        assert mod.shape == ref.shape == (3, 1, 6, cfg.var.embed_dim)
        assert rel_err(mod, ref) < 0.02


def test_a_layer_in_both_precisions_is_refused(tiny: VARPipeline) -> None:
    with pytest.raises(ValueError, match="several precisions"):
        quantize_linears(copy.deepcopy(tiny), int8=("head",), bf16=("head",))


@pytest.mark.slow
def test_greedy_tokens_of_the_first_scales_mostly_agree_with_float(demo: VARPipeline) -> None:
    """The trained demo model, greedy: scale 0 depends on the class only, later scales compound differences
    (bf16 autocast alone changes ~5% of the tokens at scales 1-2; W8A8 measured 95% / 87% agreement)."""
    params = demo.config.default_sampling.overridden(top_k=1)
    labels, seeds = list(range(10)) * 2, list(range(20))
    ref = demo.generate(labels, params, seeds=seeds).tokens
    got = quantize_linears(copy.deepcopy(demo)).generate(labels, params, seeds=seeds).tokens
    agree = [(a == b).float().mean().item() for a, b in zip(ref[:3], got[:3], strict=True)]
    assert agree[0] >= 0.9, agree
    first = torch.cat([(a == b).flatten() for a, b in zip(ref[:3], got[:3], strict=True)])
    assert first.float().mean().item() >= 0.8, agree


def test_a_quantized_image_equals_its_request_alone(demo: VARPipeline) -> None:
    pipe = quantize_linears(copy.deepcopy(demo))
    rows = [(1, 11, SamplingParams(cfg=3.0, top_k=0, top_p=0.0)), (7, 12, SamplingParams(cfg=1.5, top_k=50, top_p=0.9))]
    rows.append((4, 13, SamplingParams(cfg=0.0, top_k=1, top_p=0.0)))
    labels, seeds, params = zip(*rows, strict=True)
    batch = pipe.generate(labels, params, seeds=seeds)
    for i, (label, seed, p) in enumerate(rows):
        alone = pipe.generate([label], p, seeds=[seed])
        assert all(torch.equal(b[i], a[0]) for b, a in zip(batch.tokens, alone.tokens, strict=True)), i
        assert torch.equal(batch.images[i], alone.images[0]), i


def test_int4_weights_pack_two_per_byte_within_a_group_step() -> None:
    w = linear(128, 24).weight.detach()
    packed, scale = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 64) and scale.shape == (24, 2)
    step = scale.float().repeat_interleave(64, dim=1)
    assert ((unpack_int4(packed, scale) - w).abs() <= step / 2 + 1e-6).all()
