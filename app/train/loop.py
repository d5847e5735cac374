"""What every training loop here shares: seeded batches, the learning-rate schedule, resumable checkpoints,
a log file and a progress bar."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

log = logging.getLogger("app.train")


def setup_logging(log_file: Path) -> None:
    """Log lines go to stderr and are appended to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if log.handlers:
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(), logging.FileHandler(log_file)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def lr_at(step: int, total: int, base: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from `base` to `final_ratio * base`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def batch_indices(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[torch.Tensor]:
    """Index batches drawn from shuffled epochs; batch i is the same whether or not the run was resumed."""
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for b in range(pos, per_epoch):
            yield perm[b * batch_size : (b + 1) * batch_size]
        step = (epoch + 1) * per_epoch


class Checkpoints:
    """`state.pt` in the work folder: model, optimiser and step, written atomically, read weights-only."""

    def __init__(self, folder: Path):
        self.path = folder / "state.pt"

    def load(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
        if not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log.info("resumed from %s at step %d", self.path, state["step"])
        return int(state["step"])

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, **extra: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, **extra}, tmp)
        tmp.replace(self.path)


class Progress:
    """A tqdm bar plus a log line every `log_every` steps with running means of the reported numbers."""

    def __init__(self, total: int, start: int, desc: str, log_every: int):
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=2.0)
        self.log_every, self.desc = log_every, desc
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t0 = time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        self.bar.update(1)
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if (step + 1) % self.log_every == 0:
            means = {k: v / self.count for k, v in self.sums.items()}
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
            sec = (time.perf_counter() - self.t0) / self.count
            shown = " ".join(f"{k}={v:.4f}" for k, v in means.items())
            log.info("%s step %d: %s (%.3f s/step)", self.desc, step + 1, shown, sec)
            self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def close(self) -> None:
        self.bar.close()
