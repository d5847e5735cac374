"""VQVAE training: reconstruction + the multi-scale residual quantizer's commitment losses.

The quantizer is trained as the official `VectorQuantizer2.forward` does (codebook and phi learn from
||f_hat - sg(f)||^2, the encoder from beta * ||sg(f_hat) - f||^2 and the straight-through decoder gradient),
plus two remedies for codebook collapse: the codebook starts from encoder residuals (data initialisation) and
codes unused for `restart_every` steps are restarted on residuals of the current batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from app.model.vector_quantizer import VectorQuantizer
from app.model.vqvae import VQVAE
from app.quality.fashion_mnist import Split
from app.train.loop import Checkpoints, Progress, batch_indices, log, lr_at, set_lr


@dataclass(frozen=True)
class VQVAETraining:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    beta: float = 0.25  # commitment weight, as the official quantizer
    restart_every: int = 100
    checkpoint_every: int = 250
    seed: int = 0


@dataclass
class Quantized:
    f_hat: torch.Tensor  # straight-through: the value of f_hat, the gradient of f
    vq_loss: torch.Tensor
    hits_V: torch.Tensor  # how often each code was chosen, over all scales
    residuals_NC: torch.Tensor  # what the codes were asked to approximate (for restarts)


def quantize_for_training(vq: VectorQuantizer, f_BChw: torch.Tensor, beta: float) -> Quantized:
    B, C, H, W = f_BChw.shape
    f_ng = f_BChw.detach()
    f_rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
    loss = f_BChw.new_zeros(())
    hits = torch.zeros(vq.embedding.num_embeddings, device=f_BChw.device)
    residuals = []
    last = len(vq.patch_nums) - 1
    for si, pn in enumerate(vq.patch_nums):
        z = f_rest if si == last else F.interpolate(f_rest, size=(pn, pn), mode="area")
        z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx_N = vq.nearest_codes(z_NC)
        hits += torch.bincount(idx_N, minlength=hits.numel())
        residuals.append(z_NC)
        h = vq.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2)
        if si != last:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = vq.phi(si)(h.contiguous())
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        loss = loss + beta * F.mse_loss(f_hat.detach(), f_BChw) + F.mse_loss(f_hat, f_ng)
    f_st = f_hat.detach() - f_ng + f_BChw
    return Quantized(f_st, loss / len(vq.patch_nums), hits, torch.cat(residuals))


@torch.no_grad()
def restart_codes(vq: VectorQuantizer, dead_V: torch.Tensor, residuals_NC: torch.Tensor, gen: torch.Generator) -> int:
    """Move the dead codes onto randomly chosen residual vectors (plus a little noise so they differ)."""
    n = int(dead_V.sum())
    if n:
        pick = torch.randint(residuals_NC.shape[0], (n,), generator=gen)
        new = residuals_NC[pick] + 0.01 * residuals_NC.std() * torch.randn(n, residuals_NC.shape[1], generator=gen)
        vq.embedding.weight[dead_V] = new
    return n


def reconstruction_loss(vqvae: VQVAE, img: torch.Tensor, beta: float) -> tuple[torch.Tensor, Quantized]:
    q = quantize_for_training(vqvae.quantize, vqvae.img_to_f(img), beta)
    rec = vqvae.decoder(vqvae.post_quant_conv(q.f_hat))
    return F.l1_loss(rec, img) + F.mse_loss(rec, img), q


def train_vqvae(vqvae: VQVAE, data: Split, work: Path, t: VQVAETraining) -> VQVAE:
    """Train in place, resuming from `work/state.pt` when present."""
    work.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(vqvae.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ckpt = Checkpoints(work)
    start = ckpt.load(vqvae, opt)
    gen = torch.Generator().manual_seed(t.seed + start)
    hits = torch.zeros(vqvae.quantize.embedding.num_embeddings)
    progress = Progress(t.steps, start, "vqvae", log_every=50)
    vqvae.train()
    for step, idx in zip(range(start, t.steps), batch_indices(len(data), t.batch_size, t.seed, start), strict=False):
        img = data.images[idx]
        if step == 0:  # data initialisation: every code starts on an encoder residual
            with torch.no_grad():
                residuals = quantize_for_training(vqvae.quantize, vqvae.img_to_f(img), t.beta).residuals_NC
            restart_codes(vqvae.quantize, torch.ones_like(hits, dtype=torch.bool), residuals, gen)
        set_lr(opt, lr_at(step, t.steps, t.lr, warmup=t.steps // 50))
        rec_loss, q = reconstruction_loss(vqvae, img, t.beta)
        opt.zero_grad(set_to_none=True)
        (rec_loss + q.vq_loss).backward()
        opt.step()
        hits += q.hits_V
        if (step + 1) % t.restart_every == 0:
            used = int((hits > 0).sum())
            restarted = restart_codes(vqvae.quantize, hits == 0, q.residuals_NC.detach(), gen)
            log.info(
                "vqvae step %d: %d codes used in the last %d steps, %d restarted",
                step + 1,
                used,
                t.restart_every,
                restarted,
            )
            hits.zero_()
        progress.update(step, rec=rec_loss.item(), vq=q.vq_loss.item())
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            ckpt.save(vqvae, opt, step + 1)
    progress.close()
    return vqvae.eval()
