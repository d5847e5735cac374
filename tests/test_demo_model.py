"""The embedded demo model as shipped: integrity, strict loading, size, class names, recognisable samples."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from app.model.checkpoint import load_folder
from app.model.config import DEMO, FASHION_MNIST_CLASSES
from app.quality.classifier import load_classifier, predict

STORE = Path(__file__).parents[1] / "model_store"


def test_files_match_their_sha256_sums_and_fit_the_size_budget() -> None:
    folder = STORE / "demo"
    listed = set()
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
        listed.add(name)
    assert listed == {p.name for p in folder.iterdir()} - {"SHA256SUMS"}  # every file is covered
    assert {"config.json", "var.safetensors", "vae.safetensors", "MODEL_CARD.md", "samples.png"} <= {
        p.name for p in folder.iterdir()
    }
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 40 * 2**20


def test_demo_model_loads_strictly_with_its_class_names() -> None:
    pipe = load_folder(STORE / "demo")
    assert pipe.config == DEMO
    assert pipe.config.class_names == FASHION_MNIST_CLASSES


def test_samples_show_the_requested_class() -> None:
    pipe = load_folder(STORE / "demo")
    labels = [c for c in range(10) for _ in range(3)]
    images = pipe.generate(labels, seeds=list(range(len(labels)))).images
    preds, _ = predict(load_classifier(STORE / "demo_classifier"), images * 2 - 1)
    assert float((preds == torch.tensor(labels)).float().mean()) >= 0.8
