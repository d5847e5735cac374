"""`bf16_vqvae`: the VQVAE's convolution weights stored in bfloat16, and the decoder in the fastest form measured
for the hardware with `python -m app.bench decoder` (app/bench/decoder.py).

Forms, by hardware:
- native bfloat16 on the CPU (AVX-512 BF16, AMX): a bfloat16 decoder end to end (weights, GroupNorm, SiLU,
  upsampling and attention in bfloat16, activations channels-last, no autocast), its convolution weights
  pre-packed once into the blocked layout oneDNN's kernel reads (`PrepackedConv2d`; unpacked, oneDNN
  reorders every weight on every call), eager;
- CUDA: the same bfloat16 decoder, unpacked (oneDNN is CPU only);
- CPUs without native bfloat16 (AVX2: emulated, several times slower than float32): float32 as before, from
  the weights stored in bfloat16 and upcast per call (`BF16WeightConv2d`).

The figures behind these choices are in docs/benchmarks.md, "The bfloat16 decoder". Autocast on the CPU
already ran GroupNorm and SiLU in bfloat16 on these bfloat16 weights, so the plain module alone gains
nothing over it; packing gains over it, most with 2 threads (alone, a large convolution's weight reorder
cost more than the convolution), and computes what the unpacked module computes, bitwise. Compiled forms
are slower than eager here: Inductor's GroupNorm over channels-last groups of 5 channels runs its Welford
loop on mostly masked vectors.

One image at a time on the CPU (`VQVAE.fhat_to_img`'s default), for bitwise batch invariance: decoding the
batch in one call is not invariant (ATen's channels-last GroupNorm in both dtypes and oneDNN's float32
convolutions at small spatial sizes round differently with the batch size), and it pays too little to give
that up (the decoder is about a third of a d16 generation, a small share of the demo model's). The weights
are packed for batch 1, what the decoder then always sees.

Accuracy against float32: tests/compress/test_decoder.py holds the demo model's pixels within 0.02 (max) and
0.002 (mean) of float32's; the measured differences are in the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from app.compress.hardware import bf16_native
from app.model.config import VQVAEConfig
from app.model.pipeline import VARPipeline
from app.model.vqvae import VQVAE, Decoder


class BF16WeightConv2d(nn.Conv2d):
    """Conv2d whose weight is stored in bfloat16: computed in the input's dtype, or in autocast's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


class PackedConv(nn.Module):
    """A convolution whose weight oneDNN holds packed (no storage): opaque to torch.compile, which leaves a
    decoder holding one eager. The packed tensor is the only copy of the weight: `weight`, state dicts (the
    `weight` key first, in Conv2d's order), copies and pickles unpack it; a subclass says how it packs."""

    _packed: torch.Tensor

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The weight in its plain layout, unpacked: a copy, never on the hot path."""
        return self._packed.to_dense()

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed weight, held outside parameters and buffers (`module_bytes` adds them)."""
        return self._packed.numel() * self._packed.element_size()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight  # before the bias, in Conv2d's order
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's packed tensors have no storage to copy or pickle: copies carry the plain weight, repacked
        state = dict(self.__dict__)
        state["_packed"] = self.weight
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._packed = self._pack(state["_packed"])


class PrepackedConv2d(PackedConv):
    """A Conv2d on oneDNN (CPU) with its weight packed once, for one input shape, into the blocked layout
    oneDNN's kernel reads; the same numbers as the Conv2d, bitwise. The packed tensor (in the weight's dtype)
    is the only copy of the weight: state dicts (same keys as Conv2d) and `weight` unpack it on demand.
    Other input shapes give the same numbers too, with the weight reordered per call again by oneDNN."""

    bias: nn.Parameter | None

    def __init__(self, conv: nn.Conv2d, input_shape: Sequence[int]):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero padding given as numbers can be packed, not {conv.padding!r}")
        self.in_channels, self.out_channels, self.groups = conv.in_channels, conv.out_channels, conv.groups
        self.kernel_size = conv.kernel_size
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.input_shape = list(input_shape)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._packed = self._pack(conv.weight)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().contiguous()
        return torch.ops.mkldnn._reorder_convolution_weight(
            w, self.padding, self.stride, self.dilation, self.groups, self.input_shape
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

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
        state_dict = dict(state_dict)
        weight = state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif tuple(weight.shape) != expected:
            error_msgs.append(f"{prefix}weight: expected shape {expected}, got {tuple(weight.shape)}")
        else:
            self._packed = self._pack(weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
            f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, packed_for={tuple(self.input_shape)}"
        )


def store_convs_in_bf16(vqvae: VQVAE) -> None:
    """Every plain convolution's weight in bfloat16, same state-dict keys; computed in its input's dtype."""
    for conv in vqvae.modules():
        if type(conv) is nn.Conv2d:
            conv.__class__ = BF16WeightConv2d  # same parameters and state-dict keys, only the forward differs
            conv.weight = nn.Parameter(conv.weight.to(torch.bfloat16), requires_grad=False)


def native_bf16_decoder(vqvae: VQVAE) -> None:
    """The decoder's parameters in bfloat16: it then runs in bfloat16 end to end (`Decoder.forward` casts its
    input and returns float32), activations channels-last."""
    vqvae.decoder.to(torch.bfloat16)


def conv_input_shapes(cfg: VQVAEConfig) -> dict[str, tuple[int, ...]]:
    """The input shape of each decoder convolution (by module name) when it decodes one image, found by
    running a weightless (meta device) twin of the decoder."""
    with torch.device("meta"):
        twin = Decoder(cfg)
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Any:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes[name] = tuple(args[0].shape)

        return record

    for name, module in twin.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(recorder(name))
    side = cfg.patch_nums[-1]
    twin(torch.empty(1, cfg.z_channels, side, side, device="meta"))
    return shapes


def prepack_decoder(vqvae: VQVAE) -> None:
    """Every decoder convolution as a `PrepackedConv2d`, packed for the shapes of one image (CPU only)."""
    for name, shape in conv_input_shapes(vqvae.cfg).items():
        parent, _, child = name.rpartition(".")
        conv = vqvae.decoder.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        setattr(vqvae.decoder.get_submodule(parent), child, PrepackedConv2d(conv, shape))


def onednn_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (it needs AVX-512 or AVX-NE-CONVERT): the real
    CPU, whatever level `VAR_CPU_ISA` forces; elsewhere a forced-native decoder stays unpacked."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def is_prepacked(decoder: nn.Module) -> bool:
    """Whether any convolution of `decoder` is packed by oneDNN (bfloat16 or int8)."""
    return any(isinstance(m, PackedConv) for m in decoder.modules())


@torch.no_grad()
def bf16_vqvae(pipe: VARPipeline) -> VARPipeline:
    """VQVAE convolution weights stored in bfloat16 (the encoder's too: generation never runs it); the
    decoder in bfloat16 end to end where that is native, its convolutions pre-packed for oneDNN on the CPU.

    On CPUs without native bfloat16 (AVX2) the weights are upcast per call and the decoder runs in float32.
    Run after moving the pipeline to its device (packed weights stay on the CPU).
    """
    store_convs_in_bf16(pipe.vqvae)
    if not bf16_native(pipe.device):
        return pipe
    native_bf16_decoder(pipe.vqvae)
    if pipe.device.type == "cpu" and onednn_bf16():
        prepack_decoder(pipe.vqvae)
    pipe.decode_dtype = torch.bfloat16
    return pipe
