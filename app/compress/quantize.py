"""Mixed-precision quantization (LiteVAR): W8A8 int8 linears, bfloat16-stored weights where int8 hurts.

Int8Linear keeps weights as symmetric per-output-channel int8 and quantizes activations per token, so one
row's result never depends on the other rows of the call (the service promises an image does not depend
on its batch, bitwise). Two kernels:
- CPU: fbgemm's dynamic int8 linear on its packed weight (the only copy of the weight kept);
- CUDA (or a CPU without fbgemm): `torch._int_mm` on an int8 weight tensor.

State dicts keep the original keys (`weight` as int8, `bias` float32) plus `weight_scale`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

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
_INT_MM_MIN_ROWS = 17  # cuBLAS int8 GEMM in torch._int_mm needs more than 16 rows

Kernel = Literal["fbgemm", "int_mm"]


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are native (CUDA, AVX512-BF16 or AMX); elsewhere they are emulated, ~7x slower."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale = row absmax / 127)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(_TINY)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float times the int8 weight (N, K) -> (M, N) float32, with per-token int8 activations.

    The int32 accumulation is exact and the dequantization elementwise, so each row is batch-invariant.
    """
    M, K = x.shape
    N = weight.shape[0]
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(_TINY) / 127
    xq = torch.round(x / x_scale).clamp_(-127, 127).to(torch.int8)
    # torch._int_mm on CUDA: M > 16, K and N multiples of 8; zero padding adds nothing to any sum
    xq = F.pad(xq, (0, -K % 8, 0, max(_INT_MM_MIN_ROWS - M, 0)))
    if K % 8 or N % 8:
        weight = F.pad(weight, (0, -K % 8, 0, -N % 8))
    acc = torch._int_mm(xq, weight.t())[:M, :N]
    return acc.float().mul_(x_scale * weight_scale)


def default_kernel(device: torch.device) -> Kernel:
    """fbgemm on CPU (the x86 engine packs linear weights with fbgemm too), torch._int_mm elsewhere."""
    fbgemm = device.type == "cpu" and torch.backends.quantized.engine in ("fbgemm", "x86")
    return "fbgemm" if fbgemm else "int_mm"


def _prepack(weight: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's packed form of an int8 weight with per-channel scales (no bias: it is added in float32)."""
    with warnings.catch_warnings():
        # quantized tensors are deprecated, but they are the only way into fbgemm's packed linear weights
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        zero_points = torch.zeros(scale.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(weight.cpu(), scale.cpu().double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


# fbgemm's cache blocks (KCB, NCB) of an int8 weight per instruction set (its PackingTraits-inl.h): the packed
# weight is padded to whole blocks, K to a multiple of KCB and N to one of NCB. At the demo model's 256 input
# features that doubles the int8 bytes; at d16's 1024 it adds a few percent.
FBGEMM_BLOCKS = {"avx512_vnni": (512, 48), "avx512": (256, 32), "avx2": (512, 8)}
AVX512 = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})  # what fbgemm's AVX-512 kernels need


@functools.cache
def fbgemm_blocks() -> tuple[int, int]:
    """(KCB, NCB) of the instruction set fbgemm picks on this CPU (read from /proc/cpuinfo; AVX2 elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().partition("flags")[2].partition("\n")[0].split())
    except OSError:
        flags = set()
    if flags >= AVX512:
        return FBGEMM_BLOCKS["avx512_vnni" if "avx512_vnni" in flags else "avx512"]
    return FBGEMM_BLOCKS["avx2"]


class Int8Linear(nn.Module):
    """W8A8 linear: int8 weights (per output channel), int8 activations (per token), float32 bias and output.

    `forward(x, bias)` takes an optional per-call bias in place of its own, as QKVLinear does. The kernel
    is fixed at construction, by default from the weight's device (`default_kernel`): quantize after moving
    the pipeline. `kernel="int_mm"` on CPU runs the CUDA kernel's arithmetic (slowly), for tests.
    """

    weight: torch.Tensor  # int8 (out, in): a buffer on the _int_mm path, unpacked on demand with fbgemm
    weight_scale: torch.Tensor
    bias: nn.Parameter | None
    _guard: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, kernel: Kernel | None = None
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_scale", weight_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._packed: Any = None
        kernel = kernel or default_kernel(weight.device)
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
    def from_linear(cls, linear: nn.Linear, kernel: Kernel | None = None) -> Int8Linear:
        return cls(*quantize_weight(linear.weight), linear.bias, kernel)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        # fbgemm keeps the only copy of the weight; unpacking costs ~20 ms for 4096x1024, keep it off hot paths
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

    def extra_repr(self) -> str:
        kernel = "fbgemm" if self._packed is not None else "int_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={kernel}"


class BF16WeightLinear(nn.Module):
    """Linear with its weight stored in bfloat16 (half the bytes); float32 bias and output.

    Computed in bfloat16 where that is native (CUDA, AVX512-BF16, AMX), else in float32 from the weight upcast
    per call: emulated bfloat16 matmuls are ~7x slower than float32 on AVX2.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.native = native_bf16(weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16WeightLinear:
        return cls(linear.weight, linear.bias)

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
    """Options of `quantize_linears`: the layer types (LAYER_TYPES) stored at each precision."""

    int8: tuple[str, ...] = DEFAULT_INT8
    bf16: tuple[str, ...] = DEFAULT_BF16
    int4: tuple[str, ...] = DEFAULT_INT4


@torch.no_grad()
def quantize_linears(
    pipe: VARPipeline,
    *,
    int8: str | Iterable[str] = DEFAULT_INT8,
    bf16: str | Iterable[str] = DEFAULT_BF16,
    int4: str | Iterable[str] = DEFAULT_INT4,
) -> VARPipeline:
    """LiteVAR mixed precision: W8A8 int8 for the `int8` layer types, bfloat16-stored weights for `bf16`,
    int4 weights for `int4` (layers that run once per generation).

    Patterns match the end of a module name in `pipe.var` (see LAYER_TYPES); run after moving the pipeline
    to its device.
    """
    plans = {"int8": _as_patterns(int8), "bf16": _as_patterns(bf16), "int4": _as_patterns(int4)}
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


class BF16WeightConv2d(nn.Conv2d):
    """Conv2d whose weight is stored in bfloat16: computed in the input's dtype, or in autocast's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


@torch.no_grad()
def bf16_vqvae(pipe: VARPipeline) -> VARPipeline:
    """VQVAE convolution weights stored in bfloat16 (the encoder's too: generation never runs it); the
    decoder computes in bfloat16 only where that is native.

    On CPUs without native bfloat16 (AVX2) the weights are upcast per call and the decoder runs in float32.
    """
    for conv in pipe.vqvae.modules():
        if type(conv) is nn.Conv2d:
            conv.__class__ = BF16WeightConv2d  # same parameters and state-dict keys, only the forward differs
            conv.weight = nn.Parameter(conv.weight.to(torch.bfloat16), requires_grad=False)
    if native_bf16(pipe.device):
        pipe.decode_dtype = torch.bfloat16
    return pipe
