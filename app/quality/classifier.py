"""The demo classifier: a small CNN over 32x32 grayscale images in [-1, 1] (the demo model's output format).

It judges generated images twice: its prediction gives class accuracy (does the image show the class that
was asked for?) and its 128-d penultimate activations are the feature space of FID, precision and recall.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from app.model.checkpoint import check_state_dict, read_state_dict


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "feature_dim": self.feature_dim}


def save_classifier(model: FashionClassifier, folder: Path, card: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**model.config(), **card}, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "classifier.safetensors"))


def load_classifier(folder: str | Path) -> FashionClassifier:
    """Strict load (safetensors): a wrong file gets the list of differing keys."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    model = FashionClassifier(cfg["in_channels"], cfg["num_classes"], cfg["feature_dim"])
    sd = read_state_dict(folder / "classifier.safetensors")
    check_state_dict(model, sd, part="classifier", preset=folder.name)
    model.load_state_dict(sd)
    return model.eval()


@torch.no_grad()
def predict(model: FashionClassifier, images: torch.Tensor, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (N,) and features (N, D) of images in [-1, 1]."""
    preds, feats = [], []
    for i in range(0, images.shape[0], chunk):
        f = model.features(images[i : i + chunk])
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)
