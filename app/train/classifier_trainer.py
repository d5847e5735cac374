"""Training of a judging classifier (app.quality.classifier: the demo CNN or the mixer) on the Fashion-MNIST
train split.

Augmentation: random horizontal flips and shifts of up to 2 pixels (both keep the class). The test split is
only used to report accuracy at the end, never to choose anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from app.quality.classifier import Classifier, predict
from app.quality.fashion_mnist import Split
from app.train.loop import Checkpoints, Progress, batch_indices, lr_at, set_lr


@dataclass(frozen=True)
class ClassifierTraining:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    max_shift: int = 2
    checkpoint_every: int = 500
    seed: int = 0


def augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift per image (padding with the background value -1)."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, B), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def accuracy(model: Classifier, data: Split) -> float:
    model.eval()
    preds, _ = predict(model, data.images)
    return float((preds == data.labels).float().mean())


def train_classifier(model: Classifier, data: Split, work: Path, t: ClassifierTraining) -> Classifier:
    work.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps = t.epochs * (len(data) // t.batch_size)
    ckpt = Checkpoints(work)
    start = ckpt.load(model, opt)
    gen = torch.Generator().manual_seed(t.seed * 31 + start)
    progress = Progress(steps, start, "classifier", log_every=100)
    model.train()
    for step, idx in zip(range(start, steps), batch_indices(len(data), t.batch_size, t.seed, start), strict=False):
        set_lr(opt, lr_at(step, steps, t.lr, warmup=steps // 50, final_ratio=0.01))
        x = augment(data.images[idx], t.max_shift, gen)
        loss = F.cross_entropy(model(x), data.labels[idx], label_smoothing=t.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss=loss.item())
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == steps:
            ckpt.save(model, opt, step + 1)
    progress.close()
    return model.eval()
