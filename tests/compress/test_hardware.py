"""The machine's capabilities, forcing them, and the kernel each layer kind gets from the hardware table."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from app.compress.hardware import (
    AMX,
    AVX512,
    COMPILABLE_INT8,
    LEVELS,
    Capabilities,
    bf16_native,
    compiled_faster,
    detect,
    detected,
    fbgemm_blocks,
    forced,
    int8_kernel,
)
from app.compress.quantize import BF16WeightLinear, Int8Linear, compilable_precisions, layer_kernels, quantize_linears
from app.model.checkpoint import random_pipeline
from app.model.config import PRESETS
from app.model.pipeline import VARPipeline

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> VARPipeline:
    return random_pipeline(PRESETS["tiny"])


def test_detected_flags_agree_with_torchs_own_checks() -> None:
    """/proc/cpuinfo's flags, as parsed, against torch's independent cpuid checks of the same units."""
    caps = detected()
    assert not caps.forced and caps.cpu_model and caps.cpu_model in Path("/proc/cpuinfo").read_text()
    assert ("avx2" in caps.flags) == torch.cpu._is_avx2_supported()
    assert (caps.flags >= AVX512) == torch.cpu._is_avx512_supported()
    assert ("avx512_vnni" in caps.flags) == torch.cpu._is_vnni_supported()
    assert ("avx512_bf16" in caps.flags) == torch.cpu._is_avx512_bf16_supported()
    assert (caps.flags >= AMX) == torch.cpu._is_amx_tile_supported()
    assert caps.gpu == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_a_level_needs_every_level_below_it() -> None:
    """VNNI without the AVX-512 base units is no AVX-512 machine: the ladder stops at the first gap."""
    vnni_only = Capabilities("x", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}))
    assert vnni_only.level == "avx2"
    assert Capabilities("x", frozenset()).level == "generic"
    full = forced("amx", detected())
    assert full.level == "amx" and full.recorded_flags() == dict.fromkeys(full.recorded_flags(), True)


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level_gives_exactly_its_flags(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", level)
    caps = detect()
    assert caps.level == level and caps.forced and caps.cpu_model == detected().cpu_model
    above = LEVELS[LEVELS.index(level) + 1 :]
    assert not any(detect(isa=lv).flags <= caps.flags for lv in above)  # no flag of a higher level
    assert detect(isa="avx2").level == "avx2"  # the argument wins over the environment


def test_an_unknown_level_is_refused_with_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "avx3")
    with pytest.raises(ValueError, match="avx512_vnni"):
        detect()


EXPECTED = {  # level -> (int8 kernel, native bf16, precisions a compiled step keeps, litevar compiled)
    "generic": ("int_mm", False, {"int4", "int8"}, False),
    "avx2": ("fbgemm", False, {"int4"}, False),
    "avx512": ("fbgemm", False, {"int4"}, False),
    "avx512_vnni": ("int_mm", False, {"int4", "int8"}, True),
    "avx512_bf16": ("int_mm", True, {"int4", "int8", "bf16"}, True),
    "amx": ("int_mm", True, {"int4", "int8", "bf16"}, True),
}


@pytest.mark.parametrize("level", LEVELS)
def test_kernel_choice_per_forced_level(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, native, compilable, compiled = EXPECTED[level]
    monkeypatch.setenv("VAR_CPU_ISA", level)
    assert int8_kernel(CPU) == kernel and bf16_native(CPU) == native
    assert compilable_precisions(CPU) == compilable
    assert compiled_faster(CPU) == compiled and compiled_faster("cuda")
    # compiled only where the int8 kernel traces: fbgemm's packed layers would split the graph at every layer
    assert not compiled or kernel in COMPILABLE_INT8
    lin = torch.nn.Linear(64, 32)
    assert Int8Linear.from_linear(lin).kernel == kernel  # the layers' defaults come from the table
    assert BF16WeightLinear.from_linear(lin).native == native
    assert int8_kernel("cuda") == "int_mm" and bf16_native("cuda")  # whatever the CPU


def test_fbgemm_blocks_follow_the_real_cpu_even_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """fbgemm picks its kernels from the CPU itself, so its padding never follows a forced level."""
    real = fbgemm_blocks()
    monkeypatch.setenv("VAR_CPU_ISA", "avx2" if detected().level != "avx2" else "amx")
    assert fbgemm_blocks() == real


@pytest.mark.parametrize(
    ("level", "int8", "fc2"),
    [("avx2", "float32", "float32"), ("avx512_vnni", "int8/int_mm", "float32"), ("amx", "int8/int_mm", "bf16/native")],
)
def test_a_compilable_quantization_keeps_float_what_would_not_pay_compiled(
    level: str, int8: str, fc2: str, tiny: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", level)
    kernels = layer_kernels(quantize_linears(copy.deepcopy(tiny), int4=(), compilable=True))
    assert kernels["attn.mat_qkv"] == kernels["attn.proj"] == kernels["ffn.fc1"] == kernels["head"] == int8
    assert kernels["ffn.fc2"] == fc2 and kernels["ada_lin.1"] == "float32"


def test_layer_kernels_read_the_installed_modules(tiny: VARPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "avx2")
    eager = layer_kernels(quantize_linears(copy.deepcopy(tiny)))
    assert eager == {
        "word_embed": "float32",
        "attn.mat_qkv": "int8/fbgemm",
        "attn.proj": "int8/fbgemm",
        "ffn.fc1": "int8/fbgemm",
        "ffn.fc2": "bf16/float32",
        "ada_lin.1": "int4/float32",
        "head": "int8/fbgemm",
    }
    autocast = copy.deepcopy(tiny)
    autocast.autocast_dtype = torch.bfloat16
    assert set(layer_kernels(autocast).values()) == {"bfloat16/autocast"}


def test_int8_on_int_mm_matches_int8_on_fbgemm(tiny: VARPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same transformer quantized on an AVX2 machine's kernel and on a VNNI machine's: both quantize
    activations per token to int8 (fbgemm to 7 bits), so logits agree to about a 7-bit activation step."""
    pipes = {}
    for level in ("avx2", "avx512_vnni"):
        monkeypatch.setenv("VAR_CPU_ISA", level)
        pipes[level] = quantize_linears(copy.deepcopy(tiny), bf16=(), int4=())
    assert layer_kernels(pipes["avx2"])["ffn.fc1"] == "int8/fbgemm"
    assert layer_kernels(pipes["avx512_vnni"])["ffn.fc1"] == "int8/int_mm"
    labels = torch.tensor([3, 5])
    x = torch.randn(
        2, tiny.config.var.seq_len - 1, tiny.config.var.z_channels, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        ref, fb, mm = tiny.var(labels, x), pipes["avx2"].var(labels, x), pipes["avx512_vnni"].var(labels, x)
    rel = ((fb - mm).norm() / ref.norm()).item()
    assert 0 < rel < 0.03, rel
