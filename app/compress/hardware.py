"""The machine's matrix hardware and the kernel each compressed layer kind runs on it.

`detect()` reads the CPU's instruction sets (/proc/cpuinfo flags, torch's own checks where that file is
missing) and the GPU, and names the highest ISA level that matters for int8 and bfloat16 matmuls. The
level can be forced, for tests and what-if runs, with `VAR_CPU_ISA=<level>` or `detect(isa=...)`: the
kernels chosen are then those of that level, whatever the CPU has (forcing a level above the CPU's runs
slow fallbacks, but the same arithmetic).

`INT8_KERNELS` and `BF16_NATIVE` are the fixed tables the layers read (via `int8_kernel`, `bf16_native`);
each entry carries the measurement behind it, taken with `python -m app.bench kernels` (app/bench/kernels.py).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ISA_ENV = "VAR_CPU_ISA"

# ISA levels, lowest first; each implies the ones below it (true of every x86 CPU with these units).
# generic: no AVX2 (or not x86); avx512: F/BW/DQ/VL, what fbgemm's AVX-512 kernels need; avx512_vnni: int8
# dot products (Cascade Lake, Zen 4); avx512_bf16: bfloat16 dot products (Cooper Lake, Zen 4); amx: tile
# matrix units with int8 and bfloat16 (Sapphire Rapids).
Level = Literal["generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"]
LEVELS: tuple[Level, ...] = ("generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
AVX512 = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
AMX = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# the /proc/cpuinfo flags each level adds to the one below it
LEVEL_FLAGS: dict[Level, frozenset[str]] = {
    "generic": frozenset(),
    "avx2": frozenset({"avx2", "fma"}),
    "avx512": AVX512,
    "avx512_vnni": frozenset({"avx512_vnni"}),
    "avx512_bf16": frozenset({"avx512_bf16"}),
    "amx": AMX,
}
RECORDED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")  # what benchmark records keep


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers int8 and bfloat16 matmuls: CPU model, ISA flags, GPU, and whether forced."""

    cpu_model: str
    flags: frozenset[str]
    gpu: str | None = None
    forced: bool = False

    @property
    def level(self) -> Level:
        """The highest ISA level whose flags (and those of every level below) the CPU has."""
        best: Level = "generic"
        for level in LEVELS[1:]:
            if not self.flags >= LEVEL_FLAGS[level]:
                break
            best = level
        return best

    def recorded_flags(self) -> dict[str, bool]:
        """The flags benchmark records keep; `amx` stands for its three flags together."""
        return {f: (self.flags >= AMX if f == "amx" else f in self.flags) for f in RECORDED_FLAGS}

    def describe(self) -> str:
        """One line: CPU model, ISA level (and whether forced), GPU."""
        forced = f", forced by {ISA_ENV}" if self.forced else ""
        gpu = f"; GPU {self.gpu}" if self.gpu else ""
        return f"{self.cpu_model} ({self.level}{forced}){gpu}"


def _cpuinfo_field(text: str, name: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def _torch_flags() -> frozenset[str]:
    """torch's own ISA checks, where /proc/cpuinfo cannot be read (they report the same units)."""
    flags: set[str] = set()
    if torch.cpu._is_avx2_supported():
        flags |= LEVEL_FLAGS["avx2"]
    if torch.cpu._is_avx512_supported():
        flags |= AVX512
    if torch.cpu._is_vnni_supported():
        flags.add("avx512_vnni")
    if torch.cpu._is_avx512_bf16_supported():
        flags.add("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        flags |= AMX
    return frozenset(flags)


@functools.cache
def detected() -> Capabilities:
    """The real machine, never forced (cached: it does not change while the process runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = frozenset(_cpuinfo_field(text, "flags").split())
        model = _cpuinfo_field(text, "model name")
    except OSError:
        flags, model = _torch_flags(), ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Capabilities(model or platform.processor() or "unknown CPU", flags, gpu)


def forced(level: str, real: Capabilities) -> Capabilities:
    """`real` with the ISA flags of `level` exactly (those of the levels up to it), marked as forced."""
    if level not in LEVELS:
        raise ValueError(f"unknown ISA level {level!r} (from {ISA_ENV} or an argument); known: {', '.join(LEVELS)}")
    flags = frozenset().union(*(LEVEL_FLAGS[lv] for lv in LEVELS[: LEVELS.index(level) + 1]))
    return Capabilities(real.cpu_model, flags, real.gpu, forced=True)


def detect(isa: str | None = None) -> Capabilities:
    """The machine's capabilities; `isa` (else the environment's VAR_CPU_ISA) forces the CPU's ISA level."""
    level = isa or os.environ.get(ISA_ENV)
    return forced(level, detected()) if level else detected()


Int8Kernel = Literal["fbgemm", "int_mm"]

# The W8A8 linear's kernel per ISA level (CUDA: torch._int_mm, cuBLAS's int8 GEMM, always). The figures behind
# each row are in docs/benchmarks.md, "Kernels chosen by the hardware" (`python -m app.bench kernels`):
# - avx512_vnni and up: torch._int_mm (oneDNN's s8 GEMM with VNNI): the fastest there, and it traces under
#   torch.compile; fbgemm does not.
# - avx512, avx2: fbgemm's dynamic int8 linear (7-bit activations, `reduce_range`), the fast int8 kernel of
#   AVX2 EPYCs, where torch._int_mm measured as a slow fallback (issue 17). Not remeasured on a real AVX2 CPU:
#   an AVX-512 EPYC held to AVX2 put int_mm between float32 and fbgemm, so int_mm may pay compiled on AVX2
#   too; a real AVX2 run of the kernels benchmark decides whether this row turns to int_mm.
# - generic (no fbgemm: not x86): torch._int_mm, the only int8 kernel left.
INT8_KERNELS: dict[Level, Int8Kernel] = {
    "amx": "int_mm",
    "avx512_bf16": "int_mm",
    "avx512_vnni": "int_mm",
    "avx512": "fbgemm",
    "avx2": "fbgemm",
    "generic": "int_mm",
}
# Kernels torch.compile traces into its graphs (fbgemm's packed weights are opaque: a graph break per layer).
COMPILABLE_INT8: frozenset[Int8Kernel] = frozenset({"int_mm"})

# Whether bfloat16 matmuls (the bf16-stored linears, `ffn.fc2`; the bf16 VQVAE decoder) compute in bfloat16,
# else in float32 from the weights upcast per call. CUDA: native, always. Same runs as INT8_KERNELS:
# - avx512_bf16, amx: native, several times faster than float32; the upcast alternative costs more than
#   float32.
# - below: emulated, slower than float32 (on AVX2 EPYCs, issue 17, and on the EPYC held to AVX2).
BF16_NATIVE: dict[Level, bool] = {
    "amx": True,
    "avx512_bf16": True,
    "avx512_vnni": False,
    "avx512": False,
    "avx2": False,
    "generic": False,
}


# Whether static int8 convolutions (oneDNN's qconv: u8 activations, s8 weights) run natively, so that the
# VQVAE decoder's large convolutions pay in int8 (`int8_vqvae`). VNNI's dot products take four int8 pairs
# where AVX-512 BF16's take two bfloat16 pairs; below VNNI, int8 products take three instructions. Measured on
# avx512_bf16 only (docs/benchmarks.md, "The int8 decoder": 0.58-0.65x the bf16 decoder's time at d16); the
# avx512_vnni row (float32 around the int8 convolutions) and amx follow from the instructions, unmeasured.
INT8_CONV: dict[Level, bool] = {
    "amx": True,
    "avx512_bf16": True,
    "avx512_vnni": True,
    "avx512": False,
    "avx2": False,
    "generic": False,
}


# Whether a pipeline that keeps its int8 layers (`litevar`) runs its step faster compiled than eager
# (`compiled_where_faster`), per ISA level; CUDA: yes (torch._int_mm traces, and compiling removes the launch of
# each small kernel; unmeasured until a GPU run of `make gpu-check`). Measured on avx512_bf16 (docs/benchmarks.md,
# "litevar compiled": 1.17x / 1.07x eager at d16, batch 1 / 8; 1.6x / 1.3x on the demo model): compiled fuses the
# quantization and dequantization around each int8 GEMM, the norms and GELU into generated kernels. avx512_vnni
# and amx follow (the same int8 kernel, torch._int_mm, which traces); where it is fbgemm (avx2, avx512)
# compiling would split the graph at every int8 layer, so the step stays eager.
COMPILED_FASTER: dict[Level, bool] = {
    "amx": True,
    "avx512_bf16": True,
    "avx512_vnni": True,
    "avx512": False,
    "avx2": False,
    "generic": False,  # not x86: unmeasured, so eager
}


def int8_kernel(device: torch.device | str, caps: Capabilities | None = None) -> Int8Kernel:
    """The int8 linear kernel for `device` from INT8_KERNELS; CPUs without fbgemm get torch._int_mm."""
    if torch.device(device).type != "cpu":
        return "int_mm"
    kernel = INT8_KERNELS[(caps or detect()).level]
    if kernel == "fbgemm" and torch.backends.quantized.engine not in ("fbgemm", "x86"):
        return "int_mm"
    return kernel


def bf16_native(device: torch.device | str, caps: Capabilities | None = None) -> bool:
    """Whether bfloat16 matmuls are native on `device` (BF16_NATIVE; CUDA always)."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and BF16_NATIVE[(caps or detect()).level])


def compiled_faster(device: torch.device | str, caps: Capabilities | None = None) -> bool:
    """Whether a step with int8 layers runs faster compiled on `device` (COMPILED_FASTER; CUDA always)."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and COMPILED_FASTER[(caps or detect()).level])


def int8_conv_native(device: torch.device | str, caps: Capabilities | None = None) -> bool:
    """Whether int8 convolutions are native on `device` (INT8_CONV; CPUs only: oneDNN's kernel)."""
    return torch.device(device).type == "cpu" and INT8_CONV[(caps or detect()).level]


# fbgemm's cache blocks (KCB, NCB) of an int8 weight per instruction set (its PackingTraits-inl.h): the packed
# weight is padded to whole blocks, K to a multiple of KCB and N to one of NCB. At the demo model's 256 input
# features that doubles the int8 bytes; at d16's 1024 it adds a few percent.
FBGEMM_BLOCKS = {"avx512_vnni": (512, 48), "avx512": (256, 32), "avx2": (512, 8)}


def fbgemm_blocks() -> tuple[int, int]:
    """(KCB, NCB) of the instruction set fbgemm picks on this CPU: the real one, never a forced level, since
    fbgemm reads the CPU itself."""
    flags = detected().flags
    if flags >= AVX512:
        return FBGEMM_BLOCKS["avx512_vnni" if "avx512_vnni" in flags else "avx512"]
    return FBGEMM_BLOCKS["avx2"]
