"""Quality of a generator variant: class accuracy, FID, precision/recall and greedy-token agreement.

Every variant sees the same (class, seed) list, so differences between variants are the variants' own; a
second seed list for the baseline gives the noise floor (how much the numbers move from sampling alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.quality.classifier import load_classifier, predict
from app.quality.fashion_mnist import load_split
from app.quality.metrics import fid, precision_recall

NOISE_FLOOR_SEED_OFFSET = 1_000_000  # the second seed list: far from the first, same classes


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


def load_reference(path: Path, split: str = "test") -> torch.Tensor:
    """Reference images in [-1, 1]: a folder of Fashion-MNIST IDX files (`split`) or a safetensors file
    holding `images` (N, C, H, W), uint8 in [0, 255] or float in [-1, 1]."""
    if path.is_dir():
        return load_split(split, path).images
    from safetensors.torch import load_file

    images = load_file(str(path))["images"]
    return images.float().div(127.5).sub(1) if images.dtype == torch.uint8 else images.float()


@dataclass(frozen=True)
class Judge:
    """What every variant of one evaluation is judged with: the feature network and the reference's features."""

    features: FeatureNetwork
    reference_feats: torch.Tensor

    @staticmethod
    def open(features: Path, reference: Path, split: str = "test") -> Judge:
        network = open_feature_network(features)
        return Judge(network, network(load_reference(reference, split))[1])


@dataclass(frozen=True)
class EvalRun:
    """How images are generated for an evaluation: the sampling settings, the batch size, the model's label."""

    params: SamplingParams
    batch_size: int
    label: str


def evaluate_variant(
    name: str, pipe: VARPipeline, prompts: Prompts, run: EvalRun, judge: Judge, seed_set: str
) -> tuple[dict[str, Any], torch.Tensor]:
    """The variant's record (metrics, speed) on `prompts`, and its images in [0, 1]."""
    images, seconds = generate_all(pipe, prompts, run.params, run.batch_size)
    record: dict[str, Any] = {"model": run.label, "variant": name, "seed_set": seed_set, "images": len(prompts.labels)}
    record |= image_metrics(images, prompts.labels, judge.features, judge.reference_feats)
    record |= {"seconds": round(seconds, 2), "images_per_second": round(len(prompts.labels) / seconds, 2)}
    return record, images
