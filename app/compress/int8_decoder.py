"""`int8_vqvae`: the VQVAE decoder's large convolutions as static int8 convolutions on oneDNN's kernel.

Each converted convolution (`Int8Conv2d`) holds a symmetric per-output-channel int8 weight, pre-packed once
by `onednn::qconv_prepack`, and quantizes its input per tensor to uint8 with a scale and zero point fixed by
calibration: the decoder's own inputs (latents of a few generations of the pipeline it is given), the range
each convolution saw. `onednn::qconv2d_pointwise` then computes in int8 with int32 sums and writes the
decoder's dtype. These are the kernels Inductor lowers PT2E's x86 int8 convolutions to, called here eagerly.

Quantizing an activation in eager PyTorch costs several passes over it (scale, round, clamp, cast); on the
largest maps that cost about what int8 saves in the convolution. So the quantization is one generated
kernel (torch.compile of a small element-wise function, one graph per activation shape), done before the
nearest upsampling, which then copies bytes. GroupNorm and SiLU stay ATen's: Inductor's SiLU fused into the
quantization, and its channels-last GroupNorm, measured slower than ATen's kernels with the separate one.
The residual add stays an add: oneDNN's sum post-op copies its accumulator first, which costs as much.

Where: CPUs whose int8 dot products are native (the hardware table's `INT8_CONV`: AVX-512 VNNI, AMX), the
rest of the decoder as `bf16_vqvae` leaves it (bfloat16 where native, else float32). Elsewhere (AVX2,
AVX-512 without VNNI, GPUs) the pass is `bf16_vqvae` alone. conv_in, conv_out and the attention's 1x1
convolutions stay as they were: small maps, or 3 output channels, where int8 gains nothing.

Exactness: one image at a time on the CPU as before (the static scales make an image's int8 input
independent of its batch anyway), so an image is bitwise the same in any batch (tested). Accuracy against
float32 and the timings: docs/benchmarks.md, "The int8 decoder".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from app.compress.compiled import with_dynamo_budgets
from app.compress.decoder import PackedConv, PrepackedConv2d, bf16_vqvae, conv_input_shapes
from app.compress.hardware import int8_conv_native
from app.model.pipeline import VARPipeline
from app.model.vqvae import VQVAE, ResnetBlock, Upsample2x

_TINY = torch.finfo(torch.float32).tiny
CALIBRATION_SEED = 1_000_000


def _quantize(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() * inv_scale) + zero_point, 0, 255).to(torch.uint8)


# dynamic=False: one graph per activation shape (a decoder has a dozen), scales are tensors so never baked in
quantize = with_dynamo_budgets(torch.compile(_quantize, dynamic=False, fullgraph=True))


def input_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 (scale, zero point) covering [lo, hi] widened to hold 0 (exact zero padding)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255, _TINY)
    return scale, int(min(max(round(-lo / scale), 0), 255))


class Int8Conv2d(PackedConv):
    """A Conv2d as a static int8 convolution on oneDNN: int8 weight per output channel (symmetric, packed
    for one input shape), uint8 input per tensor (`input_scale`, `input_zero_point` from calibration),
    float32 bias, output in `out_dtype`. State dict: `weight` (int8, unpacked on demand), `bias`,
    `weight_scale`, `input_scale`, `input_zero_point`. It is saved, copied and pickled, never loaded into: the
    pass builds it from a float checkpoint, calibrating as it goes."""

    bias: nn.Parameter | None
    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    input_zero_point: torch.Tensor

    def __init__(
        self,
        conv: nn.Conv2d | PrepackedConv2d,
        input_shape: Sequence[int],
        x_range: tuple[float, float],
        out_dtype: torch.dtype,
    ):
        super().__init__()
        weight = conv.weight.detach().float()
        self.in_channels, self.out_channels = int(weight.shape[1]), int(weight.shape[0])
        self.kernel_size = tuple(weight.shape[2:])
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)
        if self.groups != 1:
            raise ValueError("only ungrouped convolutions are converted")
        self.input_shape, self.out_dtype = list(input_shape), out_dtype
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().float().clone(), False)
        scale, zero_point = input_qparams(*x_range)
        self.register_buffer("input_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.tensor(zero_point, dtype=torch.int64))
        w_scale = (weight.abs().amax(dim=(1, 2, 3)) / 127).clamp_min(_TINY)
        self.register_buffer("weight_scale", w_scale)
        self._w_zero_points = torch.zeros(self.out_channels, dtype=torch.int64)
        self._x_qparams = (scale, zero_point)  # as numbers for the kernel: no tensor reads per call
        self._packed = self._pack(torch.round(weight / w_scale[:, None, None, None]).clamp_(-127, 127).to(torch.int8))

    def _pack(self, qweight: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            qweight, self.weight_scale, float(self.input_scale), int(self.input_zero_point),
            self.stride, self.padding, self.dilation, self.groups, self.input_shape,
        )  # fmt: skip

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as this convolution's uint8 input."""
        return quantize(x, 1 / self.input_scale, self.input_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qforward(self.quantize(x))

    def qforward(self, qx: torch.Tensor) -> torch.Tensor:
        """The convolution of an already quantized input."""
        return torch.ops.onednn.qconv2d_pointwise(
            qx, self._x_qparams[0], self._x_qparams[1], self._packed, self.weight_scale, self._w_zero_points,
            self.bias, self.stride, self.padding, self.dilation, self.groups, 1.0, 0, self.out_dtype, "none", [], "",
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, input_scale={float(self.input_scale):.4g}"
        )


class Int8ResnetBlock(ResnetBlock):
    """A ResnetBlock (same submodules and keys) whose convolutions are `Int8Conv2d`: SiLU and quantization
    in one kernel, the shortcut added by the second convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, conv2 = cast(Int8Conv2d, self.conv1), cast(Int8Conv2d, self.conv2)
        h = conv1.qforward(conv1.quantize(F.silu(self.norm1(x))))
        # the residual added in place: oneDNN's sum post-op copies its accumulator first, no faster
        return conv2.qforward(conv2.quantize(F.silu(self.norm2(h)))).add_(self.nin_shortcut(x))


class Int8Upsample2x(Upsample2x):
    """An Upsample2x whose convolution is an `Int8Conv2d`: the input quantized before the nearest
    upsampling (a quarter of the elements; the same bytes after it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = cast(Int8Conv2d, self.conv)
        return conv.qforward(F.interpolate(conv.quantize(x), scale_factor=2, mode="nearest"))


def int8_targets(vqvae: VQVAE, min_macs: int = 0) -> dict[str, nn.Module]:
    """The decoder convolutions `int8_vqvae` converts, by module name: those of the residual blocks (a block's
    all or none, by its second convolution's multiply-adds per image) and of the upsampling with at least
    `min_macs` multiply-adds per image. conv_in, conv_out and attention stay (small maps or 3 channels)."""
    shapes = conv_input_shapes(vqvae.cfg)

    def macs(name: str) -> int:
        conv = vqvae.decoder.get_submodule(name)
        assert isinstance(conv, (nn.Conv2d, PrepackedConv2d)), f"{name} is a {type(conv).__name__}"
        kh, kw = conv.kernel_size
        return conv.out_channels * conv.in_channels * kh * kw * shapes[name][2] * shapes[name][3]  # stride 1

    targets: dict[str, nn.Module] = {}
    for name, module in vqvae.decoder.named_modules():
        if isinstance(module, ResnetBlock) and macs(f"{name}.conv2") >= min_macs:
            convs = ["conv1", "conv2"] + (["nin_shortcut"] if not isinstance(module.nin_shortcut, nn.Identity) else [])
            targets.update({f"{name}.{c}": module.get_submodule(c) for c in convs})
        elif isinstance(module, Upsample2x) and macs(f"{name}.conv") >= min_macs:
            targets[f"{name}.conv"] = module.conv
    return targets


def input_ranges(vqvae: VQVAE, modules: dict[str, nn.Module], f_hat: torch.Tensor) -> dict[str, tuple[float, float]]:
    """The (min, max) of each module's input over the decoding of `f_hat`, one image at a time."""
    ranges: dict[str, tuple[float, float]] = {}

    def recorder(name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            lo, hi = torch.aminmax(args[0].float())
            old = ranges.get(name, (lo.item(), hi.item()))
            ranges[name] = (min(old[0], lo.item()), max(old[1], hi.item()))

        return record

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in modules.items()]
    try:
        vqvae.fhat_to_img(f_hat)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def convert_decoder(vqvae: VQVAE, f_hat: torch.Tensor, min_macs: int = 0) -> None:
    """The decoder's `int8_targets` as `Int8Conv2d`, calibrated on decoding `f_hat` (CPU only); their blocks
    as `Int8ResnetBlock` and `Int8Upsample2x` (same submodules, so the same state-dict keys)."""
    targets = int8_targets(vqvae, min_macs)
    if not targets:
        return
    ranges, shapes = input_ranges(vqvae, targets, f_hat), conv_input_shapes(vqvae.cfg)
    out_dtype = vqvae.decoder.dtype
    for name, conv in targets.items():
        assert isinstance(conv, (nn.Conv2d, PrepackedConv2d))
        parent, _, child = name.rpartition(".")
        setattr(vqvae.decoder.get_submodule(parent), child, Int8Conv2d(conv, shapes[name], ranges[name], out_dtype))
    for module in vqvae.decoder.modules():
        if type(module) is ResnetBlock and isinstance(module.conv2, Int8Conv2d):
            module.__class__ = Int8ResnetBlock
        elif type(module) is Upsample2x and isinstance(module.conv, Int8Conv2d):
            module.__class__ = Int8Upsample2x


def calibration_latents(pipe: VARPipeline, images: int) -> torch.Tensor:
    """Latents of `images` generations of the pipeline (classes in turn, seeds from CALIBRATION_SEED):
    deterministic, and apart from the seeds requests and benchmarks start at."""
    labels = [i % pipe.num_classes for i in range(images)]
    return pipe.generate(labels, seeds=[CALIBRATION_SEED + i for i in range(images)]).f_hat


# Multiply-adds per image below which a convolution stays bfloat16: quantizing its input and oneDNN's int8 call
# cost more than int8 saves. Between the demo model's largest (3.8e7; its int8 decoder measured 1.45x slower than
# bf16) and d16's smallest converted (9.4e8; 1.8x faster in int8), not located more finely.
MIN_MACS = 10**8


@dataclass(frozen=True)
class Int8Decoder:
    """`int8_vqvae`'s options: how many generations' latents calibrate the input scales, and the multiply-adds
    per image a convolution needs to be converted."""

    calibration_images: int = 4
    min_macs: int = MIN_MACS


@torch.no_grad()
def int8_vqvae(pipe: VARPipeline, *, calibration_images: int = 4, min_macs: int = MIN_MACS) -> VARPipeline:
    """`bf16_vqvae`, then, where int8 convolutions are native (CPUs with VNNI or AMX), the decoder's residual
    block and upsampling convolutions of at least `min_macs` multiply-adds per image as static int8
    convolutions, calibrated on the latents of `calibration_images` generations of `pipe` as given. Elsewhere,
    or when no convolution is that large (the demo model), `bf16_vqvae` alone (bfloat16 where native, else
    float32). Run after moving the pipeline to its device, before compiling."""
    bf16_vqvae(pipe)
    if not int8_conv_native(pipe.device) or not int8_targets(pipe.vqvae, min_macs):
        return pipe
    convert_decoder(pipe.vqvae, calibration_latents(pipe, calibration_images), min_macs)
    return pipe
