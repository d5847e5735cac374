"""Quality of a generator variant: class accuracy, FID, precision/recall and greedy-token agreement.

Every variant sees the same (class, seed) list, so differences between variants are the variants' own; a
second seed list for the baseline gives the noise floor (how much the numbers move from sampling alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.quality.classifier import load_classifier, predict
from app.quality.metrics import fid, precision_recall


class FeatureNetwork(Protocol):
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Images in [-1, 1] -> (predicted classes or None, features)."""
        ...


@dataclass
class ClassifierFeatures:
    """Our classifier folder: predictions and penultimate features."""

    folder: Path

    def __post_init__(self) -> None:
        self.model = load_classifier(self.folder)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return predict(self.model, images)


@dataclass
class ExportedFeatures:
    """A `torch.export` program (.pt2, dynamic batch) mapping images in [-1, 1] to features, e.g. an Inception
    network: no class accuracy then. The format holds a graph and tensors, no pickled code."""

    path: Path

    def __post_init__(self) -> None:
        self.model = torch.export.load(str(self.path)).module()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, torch.cat([self.model(images[i : i + 100]) for i in range(0, images.shape[0], 100)])


def open_feature_network(path: Path) -> FeatureNetwork:
    return ClassifierFeatures(path) if path.is_dir() else ExportedFeatures(path)


@dataclass(frozen=True)
class Prompts:
    """The (class, seed) pairs every variant generates: `per_class` images of each class."""

    labels: list[int]
    seeds: list[int]

    @staticmethod
    def make(num_classes: int, per_class: int, first_seed: int) -> Prompts:
        labels = [c for c in range(num_classes) for _ in range(per_class)]
        return Prompts(labels, [first_seed + i for i in range(len(labels))])


def generate_all(
    pipe: VARPipeline, prompts: Prompts, params: SamplingParams, batch_size: int
) -> tuple[torch.Tensor, float]:
    """All images (in [0, 1]) and the seconds generation took."""
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts.labels), batch_size):
        sl = slice(i, i + batch_size)
        images.append(pipe.generate(prompts.labels[sl], params, seeds=prompts.seeds[sl]).images)
    return torch.cat(images), time.perf_counter() - t0


def image_metrics(
    images01: torch.Tensor, labels: list[int], features: FeatureNetwork, reference_feats: torch.Tensor
) -> dict[str, float | None]:
    preds, feats = features(images01.mul(2).sub(1))
    # the k-NN manifolds compare sets of equal size: a fixed random subset of the reference
    pick = torch.randperm(reference_feats.shape[0], generator=torch.Generator().manual_seed(0))[: feats.shape[0]]
    precision, recall = precision_recall(reference_feats[pick], feats)
    accuracy = None if preds is None else float((preds == torch.tensor(labels)).float().mean())
    return {"class_accuracy": accuracy, "fid": fid(feats, reference_feats), "precision": precision, "recall": recall}


def greedy_agreement(
    pipe: VARPipeline, base: VARPipeline, prompts: Prompts, cfg: float, batch_size: int
) -> list[float]:
    """Per scale, the share of tokens that greedy decoding (top-1) picks identically in both pipelines."""
    greedy = SamplingParams(cfg=cfg, top_k=1, top_p=0.0)
    same: list[float] = [0.0] * len(pipe.config.var.patch_nums)
    for i in range(0, len(prompts.labels), batch_size):
        sl = slice(i, i + batch_size)
        a = pipe.generate(prompts.labels[sl], greedy, seeds=prompts.seeds[sl]).tokens
        b = base.generate(prompts.labels[sl], greedy, seeds=prompts.seeds[sl]).tokens
        for si, (ta, tb) in enumerate(zip(a, b, strict=True)):
            same[si] += float((ta == tb).float().mean()) * len(prompts.labels[sl])
    return [s / len(prompts.labels) for s in same]
