"""Quality of a generator variant: class accuracy, FID, KID, precision/recall and greedy-token agreement.

Every variant sees the same (class, seed) list, so differences between variants are the variants' own; a
second seed list for the baseline gives the noise floor (how much the numbers move from sampling alone).
Images are judged in one or more feature spaces (judges): a variant that looks free in one network's features
can cost quality in another's, so a variant passes as free only when every space finds it so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from app.quality.bootstrap import bootstrap_interval, resample_indices
from app.quality.classifier import load_classifier, predict
from app.quality.fashion_mnist import load_split
from app.quality.metrics import Gaussian, kid, precision_recall

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


@dataclass(frozen=True)
class Uncertainty:
    """How the metrics' uncertainty is estimated: bootstrap resamples of the generated images (0: none) for
    class accuracy and FID, and random subsets for KID."""

    resamples: int = 200
    level: float = 0.95
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0


def bootstrap_metrics(
    correct: torch.Tensor | None, feats: torch.Tensor, reference: Gaussian, fid: float, u: Uncertainty
) -> dict[str, list[float] | None]:
    """Intervals of class accuracy (`correct`: 1 where the prediction is the requested class) and FID."""
    if u.resamples == 0:
        return {"class_accuracy_ci": None, "fid_ci": None}
    rows = resample_indices(feats.shape[0], u.resamples, u.seed)
    accuracy_ci = None
    if correct is not None:
        accuracy_ci = list(bootstrap_interval(lambda r: float(correct[r].mean()), rows, float(correct.mean()), u.level))
    low, high = bootstrap_interval(lambda r: reference.fid(feats[r]), rows, fid, u.level)
    # moving the interval back by the bias can cross 0 for a handful of images; FID is a squared distance
    return {"class_accuracy_ci": accuracy_ci, "fid_ci": [max(low, 0.0), high]}


def space_metrics(
    preds: torch.Tensor | None,
    feats: torch.Tensor,
    labels: list[int],
    reference_feats: torch.Tensor,
    u: Uncertainty = Uncertainty(),
) -> dict[str, Any]:
    """Every metric of one feature space: class accuracy, FID (with intervals), KID (with its standard
    error), precision and recall."""
    correct = None if preds is None else (preds == torch.tensor(labels)).double()
    reference = Gaussian.of(reference_feats)
    fid = reference.fid(feats)
    # the prompts hold the same number of images per class: KID weights the class pairs accordingly
    kid_value, kid_se = kid(feats, reference_feats, u.kid_subsets, u.kid_subset_size, u.seed, torch.tensor(labels))
    # the k-NN manifolds compare sets of equal size: a fixed random subset of the reference
    pick = torch.randperm(reference_feats.shape[0], generator=torch.Generator().manual_seed(0))[: feats.shape[0]]
    precision, recall = precision_recall(reference_feats[pick], feats)
    return {
        "class_accuracy": None if correct is None else float(correct.mean()),
        "fid": fid,
        "kid": kid_value,
        "kid_se": kid_se,
        "precision": precision,
        "recall": recall,
    } | bootstrap_metrics(correct, feats, reference, fid, u)


def image_metrics(
    images01: torch.Tensor,
    labels: list[int],
    features: FeatureNetwork,
    reference_feats: torch.Tensor,
    u: Uncertainty = Uncertainty(),
) -> dict[str, Any]:
    """The metrics of images in [0, 1] in the feature space of `features`."""
    preds, feats = features(images01.mul(2).sub(1))
    return space_metrics(preds, feats, labels, reference_feats, u)


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


def space_name(features: Path) -> str:
    """A feature space is named after its network: the classifier folder's or the program file's name."""
    return features.name if features.is_dir() else features.stem


@dataclass(frozen=True)
class Judge:
    """What every variant of one evaluation is judged with in one feature space: the network, the reference's
    features and the space's name (the key of the space's metrics in the records)."""

    features: FeatureNetwork
    reference_feats: torch.Tensor
    name: str = "features"

    @staticmethod
    def open(features: Path, reference: Path, split: str = "test") -> Judge:
        return open_judges([features], reference, split)[0]


def open_judges(features: Sequence[Path], reference: Path, split: str = "test") -> list[Judge]:
    """One judge per feature network, all against the same reference images (read once)."""
    names = [space_name(f) for f in features]
    if len(set(names)) != len(names):
        raise ValueError(f"feature networks need distinct names, got {names}")
    images = load_reference(reference, split)
    judges = []
    for path, name in zip(features, names, strict=True):
        network = open_feature_network(path)
        judges.append(Judge(network, network(images)[1], name))
    return judges


@dataclass(frozen=True)
class EvalRun:
    """How images are generated for an evaluation: the sampling settings, the batch size, the model's label."""

    params: SamplingParams
    batch_size: int
    label: str


FIRST_SPACE_FIELDS = ("class_accuracy", "fid", "precision", "recall")  # also at the record's top level


def evaluate_variant(
    name: str,
    pipe: VARPipeline,
    prompts: Prompts,
    run: EvalRun,
    judges: Judge | Sequence[Judge],
    seed_set: str,
    uncertainty: Uncertainty = Uncertainty(),
) -> tuple[dict[str, Any], torch.Tensor]:
    """The variant's record (metrics per feature space, speed) on `prompts`, and its images in [0, 1].

    `spaces` holds each judge's metrics under its name; the first judge's class accuracy, FID, precision and
    recall are also top-level fields, as records had them before there were several spaces."""
    judges = [judges] if isinstance(judges, Judge) else list(judges)  # one judge: the sensitivity study's
    images, seconds = generate_all(pipe, prompts, run.params, run.batch_size)
    record: dict[str, Any] = {"model": run.label, "variant": name, "seed_set": seed_set, "images": len(prompts.labels)}
    spaces = {j.name: image_metrics(images, prompts.labels, j.features, j.reference_feats, uncertainty) for j in judges}
    record |= {k: spaces[judges[0].name][k] for k in FIRST_SPACE_FIELDS} | {"spaces": spaces}
    record |= {"seconds": round(seconds, 2), "images_per_second": round(len(prompts.labels) / seconds, 2)}
    return record, images
