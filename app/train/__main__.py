"""`python -m app.train demo|classifier`: train the embedded demo model or the quality classifier.

Every stage resumes from its work folder (`state.pt`), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from app.fashion_mnist import DEFAULT_DIR, load_split
from app.model.checkpoint import build_models, read_state_dict
from app.model.config import DEMO
from app.model.var import init_weights
from app.quality.classifier import FashionClassifier, save_classifier
from app.train.card import write_card
from app.train.classifier_trainer import ClassifierTraining, accuracy, train_classifier
from app.train.export import export_folder, save_weights, write_sums
from app.train.loop import log, setup_logging
from app.train.var_trainer import VARTraining, tokenize, train_var
from app.train.vqvae_trainer import VQVAETraining, train_vqvae


def _timed(times: dict[str, float], stage: str, t0: float) -> None:
    times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
    log.info("%s done in %.1f min", stage, times[stage] / 60)


def train_demo(a: argparse.Namespace) -> int:
    work: Path = a.work
    setup_logging(work / "train.log")
    torch.manual_seed(a.seed)
    times_file = work / "times.json"
    times: dict[str, float] = json.loads(times_file.read_text()) if times_file.is_file() else {}
    train = load_split("train", a.data)
    if a.train_images:
        train = train.subset(a.train_images)
    log.info("training on %d Fashion-MNIST train images; work folder %s", len(train), work)
    var, vqvae = build_models(DEMO)
    init_weights(var)
    vae_file = work / "vqvae" / "vae.safetensors"
    t0 = time.perf_counter()
    if vae_file.is_file():
        vqvae.load_state_dict(read_state_dict(vae_file))
    else:
        vqvae.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        train_vqvae(vqvae, train, work / "vqvae", VQVAETraining(steps=a.vqvae_steps, batch_size=a.batch_size))
        save_weights(vqvae, vae_file)
        _timed(times, "vqvae", t0)
    times_file.write_text(json.dumps(times))
    t0 = time.perf_counter()
    tokens = tokenize(vqvae, train)
    _timed(times, "tokenize", t0)
    t0 = time.perf_counter()
    train_var(var, tokens, work / "var", VARTraining(steps=a.var_steps, batch_size=a.batch_size))
    _timed(times, "var", t0)
    times_file.write_text(json.dumps(times))
    export_folder(DEMO, var, vqvae, a.out)
    early = work / "early"
    var.load_state_dict(torch.load(work / "var" / "early.pt", weights_only=True))
    export_folder(DEMO, var, vqvae, early)
    summary = {
        "train_images": len(train),
        "vqvae_steps": a.vqvae_steps,
        "var_steps": a.var_steps,
        "batch_size": a.batch_size,
        "minutes": {k: round(v / 60, 1) for k, v in times.items()},
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("wrote %s (and the early snapshot %s): %s", a.out, early, summary)
    return 0


def train_demo_classifier(a: argparse.Namespace) -> int:
    setup_logging(a.work / "train.log")
    torch.manual_seed(a.seed)
    train, test = load_split("train", a.data), load_split("test", a.data)
    if a.train_images:
        train = train.subset(a.train_images)
    t0 = time.perf_counter()
    model = train_classifier(FashionClassifier(), train, a.work, ClassifierTraining(epochs=a.epochs, seed=a.seed))
    minutes = (time.perf_counter() - t0) / 60
    acc = accuracy(model, test)
    log.info("classifier: test accuracy %.4f on %d images, trained in %.1f min", acc, len(test), minutes)
    card = {
        "data": "Fashion-MNIST train split",
        "train_images": len(train),
        "epochs": a.epochs,
        "test_accuracy": round(acc, 4),
        "train_minutes": round(minutes, 1),
    }
    save_classifier(model, a.out, card)
    write_sums(a.out)
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
    c = sub.add_parser("classifier", help="train the demo classifier (quality judge) and save it")
    c.add_argument("--data", type=Path, default=DEFAULT_DIR)
    c.add_argument("--work", type=Path, default=Path("runs/classifier"))
    c.add_argument("--out", type=Path, default=Path("model_store/demo_classifier"))
    c.add_argument("--epochs", type=int, default=5)
    c.add_argument("--train-images", type=int, default=0)
    c.add_argument("--seed", type=int, default=0)
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
