"""The ImageNet class list: 1000 classes in the ILSVRC-2012 order, and who gets them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from app.model.checkpoint import folder_config
from app.model.config import PRESETS
from app.model.imagenet import imagenet_names, imagenet_synonyms, imagenet_synsets
from tests.conftest import DEMO, TINY


def test_exactly_1000_classes_in_sorted_wordnet_id_order() -> None:
    wnids = [wnid for wnid, _ in imagenet_synsets()]
    assert len(wnids) == len(set(wnids)) == 1000
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(wnids)  # the label order is the order of the ILSVRC-2012 class folders
    assert (wnids[0], wnids[207], wnids[999]) == ("n01440764", "n02099601", "n15075141")


@pytest.mark.parametrize(
    "label, name",
    [(0, "tench"), (1, "goldfish"), (207, "golden retriever"), (281, "tabby"), (388, "giant panda"),
     (517, "crane"), (999, "toilet tissue")],
)  # fmt: skip
def test_known_labels_have_their_names(label: int, name: str) -> None:
    assert imagenet_names()[label] == name


def test_synonyms_are_the_other_wordnet_lemmas() -> None:
    synonyms = imagenet_synonyms()
    assert synonyms[1] == ("Carassius auratus",)
    assert synonyms[207] == ()
    assert synonyms[281] == ("tabby cat",)
    assert synonyms[388] == ("panda", "panda bear", "coon bear", "Ailuropoda melanoleuca")
    assert synonyms[999] == ("toilet paper", "bathroom tissue")
    assert all(s and s == s.strip() for group in synonyms for s in group)


@pytest.mark.parametrize("preset", ["d16", "d20", "d24", "d30", "d36"])
def test_released_presets_are_named_with_imagenet_classes(preset: str) -> None:
    config = PRESETS[preset]
    assert config.class_names == imagenet_names() and config.class_synonyms == imagenet_synonyms()


def test_an_official_folder_gets_imagenet_names_and_ours_keeps_its_own(tmp_path: Path) -> None:
    assert folder_config(TINY).class_names[207] == "golden retriever"  # official config.json, 1000 classes
    assert folder_config(DEMO).class_names[3] == "Dress"  # our config.json with Fashion-MNIST names
    assert PRESETS["tiny"].class_names == ()  # a shape alone names nothing
    released = tmp_path / "var_d16"
    released.mkdir()
    for name in ("var_d16.pth", "vae_ch160v4096z32.pth"):
        (released / name).write_bytes(b"")
    assert folder_config(released).class_names[1] == "goldfish"
    ours = tmp_path / "ours"
    shutil.copytree(DEMO, ours)
    assert folder_config(ours).class_synonyms == ()
