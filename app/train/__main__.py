"""`python -m app.train demo|classifier|card`: train the demo model or a quality classifier; write the card.

Every stage resumes from its work folder (`state.pt`), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from app.model.checkpoint import build_models, read_state_dict
from app.model.config import DEMO
from app.model.var import init_weights
from app.model.vqvae import VQVAE
from app.quality.classifier import ARCHITECTURES, save_classifier
from app.quality.fashion_mnist import DEFAULT_DIR, Split, load_split
from app.train.card import write_card
from app.train.classifier_trainer import ClassifierTraining, accuracy, train_classifier
from app.train.export import export_folder, save_weights
from app.train.loop import log, setup_logging
from app.train.var_trainer import VARTraining, tokenize, train_var
from app.train.vqvae_trainer import VQVAETraining, train_vqvae


class StageTimes:
    """Minutes per stage in `times.json`, kept across resumed runs (a stage's time counts when it finishes)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, stage: str, t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        self.path.write_text(json.dumps(self.seconds))
        log.info("%s done in %.1f min", stage, self.seconds[stage] / 60)

    def minutes(self) -> dict[str, float]:
        return {k: round(v / 60, 1) for k, v in self.seconds.items()}


def vqvae_stage(vqvae: VQVAE, train: Split, a: argparse.Namespace, times: StageTimes) -> None:
    """Train the VQVAE, or load it when an earlier run finished this stage."""
    vae_file = a.work / "vqvae" / "vae.safetensors"
    if vae_file.is_file():
        vqvae.load_state_dict(read_state_dict(vae_file))
        return
    t0 = time.perf_counter()
    vqvae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # ~20% faster convolutions
    train_vqvae(vqvae, train, a.work / "vqvae", VQVAETraining(steps=a.vqvae_steps, batch_size=a.batch_size))
    save_weights(vqvae, vae_file)
    times.add("vqvae", t0)


def train_demo(a: argparse.Namespace) -> int:
    setup_logging(a.work / "train.log")
    torch.manual_seed(a.seed)
    times = StageTimes(a.work / "times.json")
    train = load_split("train", a.data)
    if a.train_images:
        train = train.subset(a.train_images)
    log.info("training on %d Fashion-MNIST train images; work folder %s", len(train), a.work)
    var, vqvae = build_models(DEMO)
    init_weights(var)
    vqvae_stage(vqvae, train, a, times)
    t0 = time.perf_counter()
    tokens = tokenize(vqvae, train)
    times.add("tokenize", t0)
    t0 = time.perf_counter()
    train_var(var, tokens, a.work / "var", VARTraining(steps=a.var_steps, batch_size=a.batch_size))
    times.add("var", t0)
    export_folder(DEMO, var, vqvae, a.out)
    var.load_state_dict(torch.load(a.work / "var" / "early.pt", weights_only=True))
    export_folder(DEMO, var, vqvae, a.work / "early")
    summary = {
        "train_images": len(train),
        "vqvae_steps": a.vqvae_steps,
        "var_steps": a.var_steps,
        "batch_size": a.batch_size,
        "minutes": times.minutes(),
    }
    (a.work / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s (and the early snapshot %s): %s", a.out, a.work / "early", summary)
    return 0


# Per classifier kind: where it is saved, its work folder, epochs, peak learning rate and seed. The mixer's
# seed differs from the CNN's so that the two judges share no random draw (initialisation, batch order,
# augmentation); its learning rate comes from a trial on the last 10,000 train images held out (87.3% after
# 6 epochs at 4e-3), its epochs from the time a retraining may take (about 10 minutes on 2 shared cores).
CLASSIFIER_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {
        "out": Path("model_store/demo_classifier"),
        "work": Path("runs/classifier"),
        "epochs": 10,
        "lr": 2e-3,
        "seed": 0,
    },
    "mixer": {
        "out": Path("model_store/mixer_classifier"),
        "work": Path("runs/mixer_classifier"),
        "epochs": 10,
        "lr": 4e-3,
        "seed": 1,
    },
}


def train_demo_classifier(a: argparse.Namespace) -> int:
    for key, value in CLASSIFIER_DEFAULTS[a.architecture].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    setup_logging(a.work / "train.log")
    torch.manual_seed(a.seed)
    train, test = load_split("train", a.data), load_split("test", a.data)
    if a.train_images:
        train = train.subset(a.train_images)
    t0 = time.perf_counter()
    model = ARCHITECTURES[a.architecture]()
    model = train_classifier(model, train, a.work, ClassifierTraining(epochs=a.epochs, lr=a.lr, seed=a.seed))
    minutes = (time.perf_counter() - t0) / 60
    acc = accuracy(model, test)
    log.info("classifier: test accuracy %.4f on %d images, trained in %.1f min", acc, len(test), minutes)
    card = {
        "data": "Fashion-MNIST train split",
        "train_images": len(train),
        "epochs": a.epochs,
        "lr": a.lr,
        "seed": a.seed,
        "threads": torch.get_num_threads(),
        "test_accuracy": round(acc, 4),
        "train_minutes": round(minutes, 1),
    }
    save_classifier(model, a.out, card)
    return 0


def write_demo_card(a: argparse.Namespace) -> int:
    write_card(a.out, a.work, a.classifier, load_split("test", a.data))
    print(f"wrote {a.out / 'MODEL_CARD.md'} and {a.out / 'SHA256SUMS'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.train")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train the demo VQVAE + VAR on Fashion-MNIST and export the folder")
    d.add_argument("--data", type=Path, default=DEFAULT_DIR, help="folder with the Fashion-MNIST IDX files")
    d.add_argument("--work", type=Path, default=Path("runs/demo"), help="checkpoints, log and early snapshot")
    d.add_argument("--out", type=Path, default=Path("model_store/demo"))
    d.add_argument("--vqvae-steps", type=int, default=1200)
    d.add_argument("--var-steps", type=int, default=1400)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--train-images", type=int, default=0, help="use only the first N train images (0: all)")
    d.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("classifier", help="train a quality judge (the demo CNN or the mixer) and save it")
    c.add_argument("--architecture", choices=sorted(CLASSIFIER_DEFAULTS), default="cnn")
    c.add_argument("--data", type=Path, default=DEFAULT_DIR)
    c.add_argument("--work", type=Path, help="default: per architecture (CLASSIFIER_DEFAULTS)")
    c.add_argument("--out", type=Path, help="default: per architecture")
    c.add_argument("--epochs", type=int, help="default: per architecture")
    c.add_argument("--lr", type=float, help="peak learning rate; default: per architecture")
    c.add_argument("--train-images", type=int, default=0)
    c.add_argument("--seed", type=int, help="default: per architecture")
    k = sub.add_parser("card", help="write the demo model's MODEL_CARD.md from the training run and evaluation")
    k.add_argument("--data", type=Path, default=DEFAULT_DIR)
    k.add_argument("--work", type=Path, default=Path("runs/demo"))
    k.add_argument("--out", type=Path, default=Path("model_store/demo"))
    k.add_argument("--classifier", type=Path, default=Path("model_store/demo_classifier"))
    for p in (d, c, k):
        p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    commands = {"demo": train_demo, "classifier": train_demo_classifier, "card": write_demo_card}
    return commands[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
