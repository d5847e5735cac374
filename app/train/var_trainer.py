"""VAR training: teacher-forced next-scale prediction on the tokens of a trained VQVAE.

As the official trainer: cross-entropy over all L tokens under the block-causal mask, the class replaced by
the null class with probability `cond_drop` (what classifier-free guidance needs), AdamW with
betas (0.9, 0.95), weight decay 0.05, gradient clipping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from app.model.var import VAR
from app.model.vqvae import VQVAE
from app.quality.fashion_mnist import Split
from app.train.loop import Checkpoints, Progress, batch_indices, log, lr_at, set_lr


@dataclass(frozen=True)
class VARTraining:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    cond_drop: float = 0.1
    grad_clip: float = 2.0
    checkpoint_every: int = 250
    snapshot_frac: float = 0.05  # a copy of the weights at this share of the steps, the "early model"
    seed: int = 0


@dataclass
class TokenSet:
    """A data split as the transformer sees it: targets (N, L) and teacher-forcing inputs (N, L - 1, Cvae)."""

    tokens_NL: torch.Tensor
    inputs_NLC: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def tokenize(vqvae: VQVAE, data: Split, chunk: int = 500) -> TokenSet:
    """Encode every image once; training then never touches the VQVAE."""
    vqvae.eval()
    tokens, inputs = [], []
    for i in range(0, len(data), chunk):
        idx_Bl = vqvae.img_to_idxBl(data.images[i : i + chunk])
        tokens.append(torch.cat(idx_Bl, dim=1).to(torch.int16))
        inputs.append(vqvae.quantize.idxBl_to_var_input(idx_Bl))
    return TokenSet(torch.cat(tokens), torch.cat(inputs), data.labels)


def token_loss(var: VAR, labels: torch.Tensor, inputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    logits = var(labels, inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1).long())


def _param_groups(var: VAR, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms' scales, embeddings of positions and the attention temperature."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in var.named_parameters():
        (decay if p.ndim >= 2 and "pos_" not in name and "scale_mul" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_var(var: VAR, data: TokenSet, work: Path, t: VARTraining) -> VAR:
    """Train in place, resuming from `work/state.pt`; writes `work/early.pt` at `snapshot_frac` of the steps."""
    work.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(_param_groups(var, t.weight_decay), lr=t.lr, betas=(0.9, 0.95))
    ckpt = Checkpoints(work)
    start = ckpt.load(var, opt)
    gen = torch.Generator().manual_seed(t.seed * 7919 + start)
    snapshot_step = max(1, round(t.steps * t.snapshot_frac))
    progress = Progress(t.steps, start, "var", log_every=50)
    var.train()
    for step, idx in zip(range(start, t.steps), batch_indices(len(data), t.batch_size, t.seed, start), strict=False):
        labels = data.labels[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < t.cond_drop] = var.num_classes
        set_lr(opt, lr_at(step, t.steps, t.lr, warmup=t.steps // 20))
        loss = token_loss(var, labels, data.inputs_NLC[idx], data.tokens_NL[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(var.parameters(), t.grad_clip)
        opt.step()
        progress.update(step, loss=loss.item(), grad_norm=float(grad_norm))
        if step + 1 == snapshot_step:
            torch.save(var.state_dict(), work / "early.pt")
            log.info("var step %d: saved the early snapshot (%.0f%% of the steps)", step + 1, 100 * t.snapshot_frac)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
            ckpt.save(var, opt, step + 1)
    progress.close()
    return var.eval()
