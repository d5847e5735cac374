"""Classifiers that judge generated images: 32x32 grayscale images in [-1, 1] (the demo model's output format).

A classifier judges images twice: its prediction gives class accuracy (does the image show the class that
was asked for?) and its penultimate activations are the feature space of FID, KID, precision and recall.
Two kinds, so that two independent feature spaces can be asked: the demo classifier (`cnn`, below) and an
MLP-Mixer (`mixer`, app/quality/mixer.py). A folder's config.json names its kind; none named is the CNN.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.model.checkpoint import CheckpointError, check_state_dict, read_state_dict
from app.model.checksums import SUMS_FILE, sums_mismatches, write_sums
from app.quality.feature_classifier import FeatureClassifier
from app.quality.mixer import MixerClassifier


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(FeatureClassifier):
    architecture = "cnn"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.body = nn.Sequential(
            *_conv(in_channels, 32), nn.MaxPool2d(2),  # 16x16
            *_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2),  # 8x8
            *_conv(64, 128), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, feature_dim),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) in [-1, 1] -> (B, feature_dim): the space FID and precision/recall are measured in."""
        return self.body(x)


Classifier = FashionClassifier | MixerClassifier
ARCHITECTURES: dict[str, type[Classifier]] = {"cnn": FashionClassifier, "mixer": MixerClassifier}


def build_classifier(config: dict[str, Any]) -> Classifier:
    """The classifier a config.json describes (its card's keys, such as `test_accuracy`, are left aside)."""
    cls = ARCHITECTURES[config.get("architecture", "cnn")]
    arguments = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in config.items() if k in arguments})


def save_classifier(model: Classifier, folder: Path, card: dict) -> None:
    """config.json (shape and card), classifier.safetensors and the SHA256SUMS of both."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**model.config(), **card}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "classifier.safetensors"))
    write_sums(folder)


def load_classifier(folder: str | Path) -> Classifier:
    """Strict load (safetensors) of a folder that matches its SHA256SUMS: a wrong file gets the list of
    differing keys, a changed one the name of the file."""
    folder = Path(folder)
    if problems := sums_mismatches(folder):
        raise CheckpointError(f"{folder} does not match its {SUMS_FILE}:\n  " + "\n  ".join(problems))
    model = build_classifier(json.loads((folder / "config.json").read_text()))
    sd = read_state_dict(folder / "classifier.safetensors")
    check_state_dict(model, sd, part="classifier", preset=folder.name)
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and features (N, D) of images in [-1, 1]."""
    preds, feats = [], []
    for i in range(0, images.shape[0], chunk):
        f = model.features(images[i : i + chunk])
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)
