"""The shipped judges (the demo CNN and the mixer): strict, checksummed loading and accuracy on real test images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.model.checkpoint import CheckpointError, CheckpointMismatch
from app.quality.classifier import FashionClassifier, load_classifier, predict, save_classifier
from app.quality.fashion_mnist import load_split
from app.quality.mixer import MixerClassifier
from app.train.classifier_trainer import accuracy

CLASSIFIER = Path(__file__).parents[2] / "model_store" / "demo_classifier"
MIXER = Path(__file__).parents[2] / "model_store" / "mixer_classifier"


@pytest.mark.data
def test_shipped_classifier_is_accurate_on_a_test_subset() -> None:
    test = load_split("test").subset(3000)
    assert accuracy(load_classifier(CLASSIFIER), test) >= 0.92


def test_a_classifier_file_with_other_keys_is_refused_with_the_keys(tmp_path: Path) -> None:
    sd = load_file(str(CLASSIFIER / "classifier.safetensors"))
    sd["extra.weight"] = sd.pop("head.weight")
    save_file(sd, str(tmp_path / "classifier.safetensors"))
    (tmp_path / "config.json").write_text((CLASSIFIER / "config.json").read_text())
    with pytest.raises(CheckpointMismatch, match=r"missing key: head.weight[\s\S]*unexpected key: extra.weight"):
        load_classifier(tmp_path)


@pytest.mark.data
def test_shipped_mixer_is_a_mixer_accurate_on_a_test_subset_with_its_own_feature_space() -> None:
    test = load_split("test").subset(3000)
    mixer = load_classifier(MIXER)
    assert isinstance(mixer, MixerClassifier)
    preds, feats = predict(mixer, test.images[:50])
    assert preds.shape == (50,) and feats.shape == (50, mixer.feature_dim)
    assert accuracy(mixer, test) >= 0.88
    assert json.loads((MIXER / "config.json").read_text())["seed"] != 0  # the CNN's seed was 0


def test_a_changed_classifier_file_is_refused_by_its_checksums(tmp_path: Path) -> None:
    folder = tmp_path / "mixer"
    shutil.copytree(MIXER, folder)
    load_classifier(folder)  # the copy matches its SHA256SUMS
    weights = load_file(str(folder / "classifier.safetensors"))
    weights["head.bias"] = weights["head.bias"] + 1  # same keys and shapes: only the checksum can tell
    save_file(weights, str(folder / "classifier.safetensors"))
    with pytest.raises(CheckpointError, match=r"classifier.safetensors: SHA-256 differs from SHA256SUMS"):
        load_classifier(folder)


@pytest.mark.parametrize("model", [FashionClassifier(feature_dim=16), MixerClassifier(feature_dim=8, depth=1)])
def test_a_saved_classifier_loads_as_its_own_kind_with_the_same_outputs(
    tmp_path: Path, model: FashionClassifier | MixerClassifier
) -> None:
    save_classifier(model.eval(), tmp_path, {"test_accuracy": 0.5})
    assert (tmp_path / "SHA256SUMS").read_text().count("\n") == 2  # config.json and the weights
    loaded = load_classifier(tmp_path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(predict(loaded, images)[1], predict(model, images)[1])
