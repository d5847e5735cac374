"""Multi-scale VQVAE: convolutional encoder / decoder (LDM style) around the multi-scale quantizer.

Module and parameter names follow the official code so `vae_ch160v4096z32.pth` loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from app.model.config import VQVAEConfig
from app.model.row_stable import per_sample
from app.model.vector_quantizer import VectorQuantizer


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1, 1, 0) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, softmax scale C^-0.5."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # each B,HW,C
        h_BLC = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(h_BLC.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks (attention after each at the lowest resolution), then an
    optional 2x down- or upsampling (`down.{i}.downsample` / `up.{i}.upsample` in the state dict)."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], *, downsample: int = 0, upsample: int = 0):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.downsample = Downsample2x(downsample) if downsample else None
        self.upsample = Upsample2x(upsample) if upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for lvl in range(n):
            block_out = cfg.ch * mult[lvl]
            blocks: list[nn.Module] = [
                ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(cfg.num_res_blocks)
            ]
            block_in = block_out
            attn: list[nn.Module] = [AttnBlock(block_out) for _ in blocks] if lvl == n - 1 else []
            self.down.append(_Level(blocks, attn, downsample=block_out if lvl != n - 1 else 0))
        self.mid = _Mid(block_in)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        mult, n = cfg.ch_mult, len(cfg.ch_mult)
        block_in = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in)
        levels: list[nn.Module] = []
        for lvl in reversed(range(n)):
            block_out = cfg.ch * mult[lvl]
            blocks: list[nn.Module] = [
                ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(cfg.num_res_blocks + 1)
            ]
            block_in = block_out
            attn: list[nn.Module] = [AttnBlock(block_out) for _ in blocks] if lvl == n - 1 else []
            levels.insert(0, _Level(blocks, attn, upsample=block_out if lvl != 0 else 0))
        self.up = nn.ModuleList(levels)  # up[0] is the last one run, as in the official code
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the decoder computes in: that of its parameters (read off a normalisation layer, whose
        parameters every form of the decoder keeps as plain tensors)."""
        return self.norm_out.weight.dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Image (float32) of the latent, computed in the decoder's dtype."""
        h = self.mid(self.conv_in(z.to(self.dtype)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h))).float()


class VQVAE(nn.Module):
    """Images in [-1, 1] <-> multi-scale token maps; only the quantizer knows about scales."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)

    def use_channels_last(self) -> VQVAE:
        """Decoder convolutions in channels-last layout: faster on CPU (oneDNN; docs/benchmarks.md, "Single
        operations"), same numbers to ~1e-5."""
        # Module.to(memory_format=...) is documented but missing from the type stubs
        self.post_quant_conv.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.decoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return self

    def img_to_f(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        """Continuous latent `quant_conv(encoder(img))` of images in [-1, 1]."""
        return self.quant_conv(self.encoder(img_BCHW))

    def img_to_idxBl(self, img_BCHW: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl(self.img_to_f(img_BCHW))

    def fhat_to_img(
        self,
        f_hat_BChw: torch.Tensor,
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        per_image: bool = True,
    ) -> torch.Tensor:
        """Decoded images (float32) clamped to [-1, 1]; `decoder` runs in place of `self.decoder` (a compiled
        form). `per_image`: one image at a time on CPU (`per_sample`), which keeps an image independent of its
        batch, bitwise; False: the whole batch in one call, faster on CPU but not batch-invariant (measured in
        app/compress/decoder.py, which also says why the service keeps the default)."""
        decode = self.decoder if decoder is None else decoder

        def post_quant_and_decode(f: torch.Tensor) -> torch.Tensor:
            return decode(self.post_quant_conv(f))

        img = per_sample(post_quant_and_decode, f_hat_BChw) if per_image else post_quant_and_decode(f_hat_BChw)
        return img.contiguous().clamp_(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(ms_idx_Bl))

    def img_to_reconstructed_img(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.f_to_fhats(self.img_to_f(img_BCHW))[-1])
