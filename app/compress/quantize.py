"""Mixed-precision quantization (LiteVAR): W8A8 int8 linears, bfloat16-stored weights where int8 hurts.

Int8Linear keeps weights as symmetric per-output-channel int8 and quantizes activations per token, so one
row's result never depends on the other rows of the call (the service promises an image does not depend
on its batch, bitwise). Two kernels, chosen per machine by the table in `app.compress.hardware`:
- `int_mm`: `torch._int_mm` on an int8 weight tensor (cuBLAS on CUDA, oneDNN's VNNI/AMX GEMM on such CPUs);
  it traces under torch.compile;
- `fbgemm`: fbgemm's dynamic int8 linear on its packed weight (the only copy of the weight kept), the fast
  int8 kernel of AVX2 and AVX-512 CPUs without VNNI; opaque to torch.compile.
BF16WeightLinear computes in bfloat16 where the table says bfloat16 matmuls are native.

State dicts keep the original keys (`weight` as int8, `bias` float32) plus `weight_scale`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.compress.hardware import COMPILABLE_INT8, Int8Kernel, bf16_native, fbgemm_blocks, int8_kernel
from app.compress.int4 import Int4SharedAdaLin, Int4WeightLinear
from app.model.blocks import SharedAdaLin
from app.model.pipeline import VARPipeline
from app.model.row_stable import row_stable_linear

# The linear layer types of LiteVAR's sensitivity study, as suffixes of module names in VAR. `head` gives
# the logits; int8 is allowed there (the authors quantize it) but it is one of the studied layer types.
LAYER_TYPES = (
    "word_embed",
    "attn.mat_qkv",
    "attn.proj",
    "ffn.fc1",
    "ffn.fc2",
    "ada_lin.1",
    "shared_ada_lin.1",
    "head",
)
# LiteVAR's W8A8 recipe, corrected by our sensitivity study on the demo model (docs/compression.md):
# fc2 (the most sensitive, as in the authors' study) keeps 16-bit weights; word_embed (the second most
# sensitive, and a 32 x C matmul that int8 cannot speed up) stays float32; the AdaLN linears run once per
# generation, so 4-bit weights there save a third of a block's bytes at no cost in time.
DEFAULT_INT4 = ("ada_lin.1", "shared_ada_lin.1")
DEFAULT_INT8 = ("attn.mat_qkv", "attn.proj", "ffn.fc1", "head")
DEFAULT_BF16 = ("ffn.fc2",)

_TINY = torch.finfo(torch.float32).tiny
_CUBLAS_INT_MM_MIN_ROWS = 17  # cuBLAS's int8 GEMM in torch._int_mm needs more than 16 rows (the CPU's does not)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale = row absmax / 127)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(_TINY)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float times the int8 weight (N, K) -> (M, N) float32, with per-token int8 activations.

    The int32 accumulation is exact (any summation order gives the same sums) and the dequantization
    elementwise, so each row is batch-invariant.
    """
    M, K = x.shape
    N = weight.shape[0]
    # max |x| per row without an |x| copy, and the quotient rounded in place: at d16's batch 8 the activations
    # are MBs, and each copy is a pass over them
    x_scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(_TINY).div_(127)
    xq = torch.div(x, x_scale).round_().clamp_(-127, 127).to(torch.int8)
    if x.device.type != "cpu":
        # cuBLAS: M > 16, K and N multiples of 8; zero padding adds nothing to any sum. The CPU kernel takes any
        # shape, and padding there would cost a copy of the activations per call.
        xq = F.pad(xq, (0, -K % 8, 0, max(_CUBLAS_INT_MM_MIN_ROWS - M, 0)))
        if K % 8 or N % 8:
            weight = F.pad(weight, (0, -K % 8, 0, -N % 8))
    acc = torch._int_mm(xq, weight.t())[:M, :N]
    # The int32 sums become float32 in their own memory (same size, element for element), then scale in place:
    # `acc * x_scale` would allocate an (M, N) output and cast inside a mixed-dtype multiply, together as long
    # as the GEMM itself at d16's batch 8 on a 2-core CPU; `x_scale * weight_scale` would build an (M, N) matrix
    y = acc.view(torch.float32).copy_(acc)
    return y.mul_(x_scale).mul_(weight_scale)


def _prepack(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of an int8 weight with per-channel scales (no bias: it is added in float32)."""
    with warnings.catch_warnings():
        # quantized tensors are deprecated, but they are the only way into fbgemm's packed linear weights
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        zero_points = torch.zeros(scale.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(weight.cpu(), scale.cpu().double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


class Int8Linear(nn.Module):
    """W8A8 linear: int8 weights (per output channel), int8 activations (per token), float32 bias and output.

    `forward(x, bias)` takes an optional per-call bias in place of its own, as QKVLinear does. The kernel
    is fixed at construction, by default the hardware table's for the weight's device (`int8_kernel`):
    quantize after moving the pipeline. Either kernel runs on any x86 CPU, at the table's speed or slowly.
    """

    weight: torch.Tensor  # int8 (out, in): a buffer on the _int_mm path, unpacked on demand with fbgemm
    weight_scale: torch.Tensor
    bias: nn.Parameter | None
    _guard: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: Int8Kernel | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_scale", weight_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._packed: Any = None
        kernel = kernel or int8_kernel(weight.device)
        if kernel == "fbgemm" and weight.device.type != "cpu":
            raise ValueError(f"the fbgemm kernel runs on CPU, the weight is on {weight.device}")
        if kernel == "fbgemm":
            self._packed = _prepack(weight, self.weight_scale)
            # a row holding +1 and -1 (two rows when K = 1) pins the tensor's min/max, hence fbgemm's activation scale
            K = self.in_features
            guard = torch.tensor([[1.0, -1.0] + [0.0] * (K - 2)]) if K >= 2 else torch.tensor([[1.0], [-1.0]])
            self.register_buffer("_guard", guard, persistent=False)
        else:
            self.register_buffer("weight", weight.to(torch.int8))

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Int8Kernel | None = None) -> Int8Linear:
        return cls(*quantize_weight(linear.weight), linear.bias, kernel)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        # fbgemm keeps the only copy of the weight; unpacking it is slow (docs/benchmarks.md, "Single
        # operations"): keep it off hot paths
        if name == "weight" and self.__dict__.get("_packed") is not None:
            return self._packed.unpack()[0].int_repr()
        return super().__getattr__(name)

    @property
    def packed_bytes(self) -> int:
        """Weight bytes outside parameters and buffers: fbgemm's int8 weight padded to its cache blocks, int32
        column offsets, and its own per-channel scale and zero point (4 + 4 bytes)."""
        if self._packed is None:
            return 0
        n, k = self.out_features, self.in_features
        kcb, ncb = fbgemm_blocks()
        return -(-k // kcb) * kcb * -(-n // ncb) * ncb + 4 * n + 8 * n

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias
        x2 = x.reshape(-1, self.in_features).float()
        y = self._fbgemm(x2) if self._packed is not None else int_mm_linear(x2, self.weight, self.weight_scale)
        if b is not None:
            y = y.add_(b)
        return y.view(*x.shape[:-1], self.out_features)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # Each row divided by its absmax lies in [-1, 1]; with the guard rows, fbgemm's dynamic scale is constant,
        # so a row's int8 values, its exact int32 sums and its output never depend on the other rows.
        # reduce_range: 7-bit activations, which keep AVX2's vpmaddubsw from saturating its int16 pair sums.
        amax = x.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
        xn = torch.cat((x / amax, self._guard))
        y = torch.ops.quantized.linear_dynamic(xn, self._packed, True)
        return y[: x.shape[0]].mul_(amax)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Loads an int8 state dict (`weight`, `weight_scale`) or a float one (`weight`, quantized here)."""
        state_dict = dict(state_dict)
        wkey, skey = prefix + "weight", prefix + "weight_scale"
        w = state_dict.get(wkey)
        if w is not None and w.is_floating_point():
            state_dict[wkey], state_dict[skey] = quantize_weight(w)
        if self._packed is None:  # `weight` is a buffer
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        w = state_dict.pop(wkey, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        expected = (self.out_features, self.in_features)
        if w is None:
            missing_keys.append(wkey)
        elif tuple(w.shape) != expected or w.dtype != torch.int8:
            error_msgs.append(f"{wkey}: expected int8 {expected}, got {w.dtype} {tuple(w.shape)}")
        else:
            self._packed = _prepack(w, self.weight_scale)

    @property
    def kernel(self) -> Int8Kernel:
        return "fbgemm" if self._packed is not None else "int_mm"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class BF16WeightLinear(nn.Module):
    """Linear with its weight stored in bfloat16 (half the bytes); float32 bias and output.

    Computed in bfloat16 where the hardware table says that is native (CUDA, AVX512-BF16, AMX), else in float32
    from the weight upcast per call: emulated bfloat16 matmuls are several times slower than float32 on AVX2
    (hardware.py, BF16_NATIVE). `native`
    overrides the table (tests, the kernel benchmark).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.native = bf16_native(weight.device) if native is None else native

    @classmethod
    def from_linear(cls, linear: nn.Linear, native: bool | None = None) -> BF16WeightLinear:
        return cls(linear.weight, linear.bias, native)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b = self.bias if bias is None else bias
        if not self.native:
            return row_stable_linear(x.float(), self.weight.float(), b)
        y = row_stable_linear(x.to(torch.bfloat16), self.weight, None).float()
        return y if b is None else y.add_(b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, native={self.native}"


class Int8SharedAdaLin(Int8Linear):
    """SharedAdaLin in int8: output viewed as (B, 1, 6, C)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, bias).view(-1, 1, 6, self.out_features // 6)


class BF16WeightSharedAdaLin(BF16WeightLinear):
    """SharedAdaLin with bfloat16 weights: output viewed as (B, 1, 6, C)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, bias).view(-1, 1, 6, self.out_features // 6)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _as_patterns(patterns: str | Iterable[str]) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _replacement(linear: nn.Linear, precision: str) -> nn.Module:
    shared = isinstance(linear, SharedAdaLin)
    if precision == "int8":
        return (Int8SharedAdaLin if shared else Int8Linear).from_linear(linear)
    if precision == "int4":
        return (Int4SharedAdaLin if shared else Int4WeightLinear).from_linear(linear)
    return (BF16WeightSharedAdaLin if shared else BF16WeightLinear).from_linear(linear)


@dataclass(frozen=True)
class MixedPrecision:
    """Options of `quantize_linears`: the layer types (LAYER_TYPES) stored at each precision, and whether only
    the precisions a compiled step runs fast are applied."""

    int8: tuple[str, ...] = DEFAULT_INT8
    bf16: tuple[str, ...] = DEFAULT_BF16
    int4: tuple[str, ...] = DEFAULT_INT4
    compilable: bool = False


def compilable_precisions(device: torch.device) -> set[str]:
    """The precisions whose layers a compiled step runs faster than float32 on `device`, by the hardware table:
    int8 where its kernel traces (torch._int_mm: VNNI, AMX, CUDA; fbgemm would split the graph at every layer),
    bf16 where bfloat16 matmuls are native (upcasting its weights at every call only adds work to float32);
    int4 always, since its layers (AdaLN) run once per generation, outside the step."""
    kept = {"int4"}
    if int8_kernel(device) in COMPILABLE_INT8:
        kept.add("int8")
    if bf16_native(device):
        kept.add("bf16")
    return kept


@torch.no_grad()
def quantize_linears(
    pipe: VARPipeline,
    *,
    int8: str | Iterable[str] = DEFAULT_INT8,
    bf16: str | Iterable[str] = DEFAULT_BF16,
    int4: str | Iterable[str] = DEFAULT_INT4,
    compilable: bool = False,
) -> VARPipeline:
    """LiteVAR mixed precision: W8A8 int8 for the `int8` layer types, bfloat16-stored weights for `bf16`,
    int4 weights for `int4` (layers that run once per generation).

    Patterns match the end of a module name in `pipe.var` (see LAYER_TYPES); run after moving the pipeline
    to its device. `compilable`: for a pipeline whose step is compiled next, a precision is applied only where
    `compilable_precisions` keeps it; its layers stay float32 elsewhere. On an AVX2 CPU that leaves the int8
    and bf16 layers float32: its fast int8 kernel (fbgemm) cannot be traced, and torch._int_mm, which can, is a
    slow fallback there; so a compiled pipeline there is never slower than the float one.
    """
    plans = {"int8": _as_patterns(int8), "bf16": _as_patterns(bf16), "int4": _as_patterns(int4)}
    if compilable:
        kept = compilable_precisions(pipe.device)
        plans = {p: patterns if p in kept else () for p, patterns in plans.items()}
    targets: list[tuple[str, str]] = []
    for name, module in pipe.var.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        chosen = [p for p, patterns in plans.items() if _matches(name, patterns)]
        if len(chosen) > 1:
            raise ValueError(f"{name} matches patterns of several precisions: {chosen}")
        if chosen:
            targets.append((name, chosen[0]))
    for name, precision in targets:
        parent, _, child = name.rpartition(".")
        linear = pipe.var.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        setattr(pipe.var.get_submodule(parent), child, _replacement(linear, precision))
    return pipe


def _kernel_of(module: nn.Module, autocast: torch.dtype | None) -> str:
    if isinstance(module, Int8Linear):
        return f"int8/{module.kernel}"
    if isinstance(module, BF16WeightLinear):
        return "bf16/native" if module.native else "bf16/float32"  # float32: the weight upcast per call
    if isinstance(module, Int4WeightLinear):
        return "int4/float32"  # unpacked to float32 per call
    return "float32" if autocast is None else f"{str(autocast).removeprefix('torch.')}/autocast"


def layer_kernels(pipe: VARPipeline) -> dict[str, str]:
    """Per layer type (LAYER_TYPES) present in the transformer, the kernel its installed modules run, e.g.
    {"attn.mat_qkv": "int8/int_mm", "ffn.fc2": "bf16/native", "word_embed": "float32"}; read from the modules
    themselves, so it reports what a variant really installed (several kernels: joined by "+")."""
    found: dict[str, set[str]] = {}
    for name, module in pipe.var.named_modules():
        layer_type = next((t for t in LAYER_TYPES if _matches(name, (t,))), None)
        if layer_type is not None:
            found.setdefault(layer_type, set()).add(_kernel_of(module, pipe.autocast_dtype))
    return {t: "+".join(sorted(found[t])) for t in LAYER_TYPES if t in found}
