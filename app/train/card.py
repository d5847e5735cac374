"""The demo model's card (MODEL_CARD.md): data, licence, command, steps, time, quality, codebook use, samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from app.model.checkpoint import load_folder
from app.model.checksums import write_sums
from app.model.pipeline import VARPipeline
from app.quality.classifier import load_classifier, predict
from app.quality.fashion_mnist import Split


@torch.no_grad()
def tokenizer_report(pipe: VARPipeline, test: Split, classifier_dir: Path) -> dict[str, Any]:
    """Codebook use over every scale of the test split, reconstruction PSNR, and how well the classifier still
    recognises reconstructed test images (the ceiling for generated ones)."""
    vqvae = pipe.vqvae
    used = torch.zeros(pipe.config.vqvae.vocab_size, dtype=torch.bool)
    recon = []
    for i in range(0, len(test), 500):
        idx_Bl = vqvae.img_to_idxBl(test.images[i : i + 500])
        for idx in idx_Bl:
            used[idx.flatten()] = True
        recon.append(vqvae.idxBl_to_img(idx_Bl))
    rec = torch.cat(recon)
    mse = (rec - test.images).square().mean().item()
    preds, _ = predict(load_classifier(classifier_dir), rec)
    return {
        "codes_used": int(used.sum()),
        "vocab_size": int(used.numel()),
        "reconstruction_psnr_db": round(10 * torch.log10(torch.tensor(4.0 / mse)).item(), 2),  # range [-1, 1]
        "classifier_accuracy_on_reconstructions": round(float((preds == test.labels).float().mean()), 4),
    }


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['seed_set']} | {r['images']} | {100 * r['class_accuracy']:.2f}% | {r['fid']:.3f} "
        f"| {r['precision']:.3f} | {r['recall']:.3f} |"
    )


def write_card(folder: Path, work: Path, classifier_dir: Path, test: Split) -> None:
    summary = json.loads((work / "summary.json").read_text())
    evals = json.loads((work / "eval.json").read_text()) + json.loads((work / "eval_early.json").read_text())
    pipe = load_folder(folder)
    tok = tokenizer_report(pipe, test, classifier_dir)
    classifier = json.loads((classifier_dir / "config.json").read_text())
    shutil.copy(work / "eval" / "demo_baseline.png", folder / "samples.png")
    cfg = pipe.config
    sampling = cfg.default_sampling
    lines = [
        "# Demo model: class-conditional VAR on Fashion-MNIST",
        "",
        "The embedded default model of the service: the same VQVAE and VAR code as the released models, small.",
        "",
        "## Data and licence",
        "Fashion-MNIST (Zalando Research, MIT licence): 60,000 train and 10,000 test 28x28 grayscale images in",
        "10 classes, read from Debian's `dataset-fashion-mnist` package, padded to 32x32. Trained on the train",
        f"split only ({summary['train_images']} images); the test split is only the reference of the evaluation.",
        "",
        "## Model",
        f"- VQVAE: ch {cfg.vqvae.ch}, ch_mult {list(cfg.vqvae.ch_mult)}, codebook {cfg.vqvae.vocab_size} x "
        f"{cfg.vqvae.z_channels}, 8x8 latent, scales {list(cfg.vqvae.patch_nums)} ({cfg.var.seq_len} tokens).",
        f"- VAR: depth {cfg.var.depth}, width {cfg.var.embed_dim}, {cfg.var.num_heads} heads, "
        f"{cfg.var.num_classes} classes: {', '.join(cfg.class_names)}.",
        f"- Recommended sampling (config.json): cfg {sampling.cfg}, top_k {sampling.top_k}, top_p {sampling.top_p}.",
        "",
        "## Training",
        "Command: `make demo-model` (resumable; log in `runs/demo/train.log`).",
        f"- VQVAE: {summary['vqvae_steps']} steps, VAR: {summary['var_steps']} steps, batch {summary['batch_size']}.",
        f"- Time on 2 CPU cores (minutes per stage): {summary['minutes']}.",
        "",
        "## Tokenizer (test split)",
        f"- Codebook use: {tok['codes_used']} of {tok['vocab_size']} codes.",
        f"- Reconstruction PSNR: {tok['reconstruction_psnr_db']} dB; the classifier recognises "
        f"{100 * tok['classifier_accuracy_on_reconstructions']:.2f}% of reconstructed test images "
        f"({100 * classifier['test_accuracy']:.2f}% of the originals).",
        "",
        "## Quality (`python -m app evaluate`, features of `model_store/demo_classifier`, vs the test split)",
        "`early` is the same run at 5% of the VAR steps; `noise-floor` is the final model on a second seed list.",
        "",
        "| model | seeds | images | class accuracy | FID | precision | recall |",
        "|---|---|---|---|---|---|---|",
        *[_row(r) for r in evals],
        "",
        "## Samples",
        "![one row per class](samples.png)",
        "",
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines))
    write_sums(folder)
