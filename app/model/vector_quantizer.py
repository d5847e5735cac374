"""Multi-scale residual vector quantizer with the phi (quant_resi) convolutions.

Tokens within a scale are row-major. f_hat lives at the largest scale (pn_last x pn_last); each scale
adds phi(bicubic_up(codes)); the next scale's input is the area-downsampled running f_hat.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.model.config import VQVAEConfig
from app.model.row_stable import per_sample


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h): the residual refinement of upsampled codes."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        conv = per_sample(lambda h: self._conv_forward(h, self.weight, self.bias), h_BChw)
        return h_BChw.mul(1 - self.resi_ratio) + conv.mul_(self.resi_ratio)


class PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls


def phi_indices(num_phis: int, num_scales: int) -> list[int]:
    """Which phi each scale uses: the tick nearest to si / (K - 1), in float64 like the official code.

    float32 would resolve the exact ties at 2/9 and 7/9 differently ([0,0,0,1,1,2,2,2,3,3]).
    """
    k = num_phis
    lo = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(lo, 1 - lo, k)
    denom = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - si / denom))) for si in range(num_scales)]


class VectorQuantizer(nn.Module):
    """`VectorQuantizer2` of the official code, inference side (no losses, no EMA updates)."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.Cvae = cfg.z_channels
        self.using_znorm = cfg.using_znorm
        num_scales = len(cfg.patch_nums)

        def make() -> nn.Module:
            return Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()

        phis: list[nn.Module]
        self.quant_resi: nn.Module
        if cfg.share_quant_resi == 0:  # one phi per scale
            phis = [make() for _ in range(cfg.default_qresi_counts or num_scales)]
            self.quant_resi = nn.ModuleList(phis)
        elif cfg.share_quant_resi == 1:  # one phi for all scales
            phis = [make()]
            self.quant_resi = PhiShared(phis[0])
        else:  # K phis, each scale takes the nearest
            phis = [make() for _ in range(cfg.share_quant_resi)]
            self.quant_resi = PhiPartiallyShared(nn.ModuleList(phis))
        index = phi_indices(len(phis), num_scales)
        self._phi_per_scale = [phis[i] for i in index]
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def phi(self, si: int) -> nn.Module:
        return self._phi_per_scale[si]

    def nearest_codes(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector (squared Euclidean; cosine with z-norm)."""
        w = self.embedding.weight
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=1) @ F.normalize(w, dim=1).T, dim=1)
        d = z_NC.square().sum(dim=1, keepdim=True) + w.square().sum(dim=1)
        d.addmm_(z_NC, w.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def _residual_quantize(self, f_BChw: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx_N = self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            if si != last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            h_BChw = self.phi(si)(h_BChw.contiguous())
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, pn * pn))
        return out

    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Continuous latent -> one (B, pn*pn) token tensor per scale."""
        return self._residual_quantize(f_BChw, to_fhat=False)

    def f_to_fhats(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Continuous latent -> the running f_hat after each scale."""
        return self._residual_quantize(f_BChw, to_fhat=True)

    def _codes_BChw(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def idxBl_to_fhat(self, ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Tokens of every scale -> final f_hat (B, Cvae, pn_last, pn_last)."""
        f_hat: torch.Tensor | None = None
        for si, (idx_Bl, pn) in enumerate(zip(ms_idx_Bl, self.patch_nums, strict=True)):
            h_BChw = self._codes_BChw(idx_Bl, pn)
            f_hat = self.add_scale(si, f_hat, h_BChw)
        assert f_hat is not None
        return f_hat

    def add_scale(self, si: int, f_hat: torch.Tensor | None, h_BChw: torch.Tensor) -> torch.Tensor:
        """f_hat += phi_si(bicubic_up(h)) (no upsampling at the last scale); in place when f_hat is given."""
        H = self.patch_nums[-1]
        h_BChw = h_BChw.contiguous()  # a channels-last view would take batch-dependent kernels
        if f_hat is None:
            f_hat = h_BChw.new_zeros(h_BChw.shape[0], self.Cvae, H, H, dtype=torch.float32)
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode="bicubic")
        return f_hat.add_(self.phi(si)(h_BChw))

    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """Add scale si's codes to f_hat (in place); return the next scale's input map (B, Cvae, pn', pn')."""
        self.add_scale(si, f_hat, h_BChw)
        if si == len(self.patch_nums) - 1:
            return f_hat
        pn_next = self.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def idxBl_to_var_input(self, ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input: area-downsampled running f_hat for scales 1.., as (B, L - first_l, Cvae)."""
        f_hat: torch.Tensor | None = None
        inputs = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = self.add_scale(si, f_hat, self._codes_BChw(ms_idx_Bl[si], self.patch_nums[si]))
            pn_next = self.patch_nums[si + 1]
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
            inputs.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)
