"""The shipped demo classifier: strict loading and its accuracy on real test images."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from app.model.checkpoint import CheckpointMismatch
from app.quality.classifier import load_classifier
from app.quality.fashion_mnist import load_split
from app.train.classifier_trainer import accuracy

CLASSIFIER = Path(__file__).parents[2] / "model_store" / "demo_classifier"


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
