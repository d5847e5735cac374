"""Looking up a class by name: case-insensitive, any synonym, names before synonyms, never a pick."""

from __future__ import annotations

import pytest

from app.model.classes import ClassNames
from app.model.config import FASHION_MNIST_CLASSES
from app.model.imagenet import imagenet_names, imagenet_synonyms

IMAGENET = ClassNames(imagenet_names(), imagenet_synonyms())


@pytest.mark.parametrize(
    "query, label",
    [
        ("golden retriever", 207),
        ("Goldfish", 1),
        ("carassius auratus", 1),
        ("GIANT PANDA", 388),
        ("  tabby   Cat ", 281),
        ("toilet paper", 999),
        ("partridge", 86),  # the name of 86, a synonym of 82 (ruffed grouse): the name wins
        ("crayfish", 124),  # the name of 124, a synonym of 123 (spiny lobster)
    ],
)
def test_imagenet_names_and_synonyms_find_their_class(query: str, label: int) -> None:
    assert IMAGENET.labels(query) == (label,)


@pytest.mark.parametrize(
    "query, labels",
    [("crane", (134, 517)), ("Cardigan", (264, 474)), ("panda", (387, 388)), ("grass snake", (55, 57))],
)
def test_a_name_of_several_classes_returns_them_all(query: str, labels: tuple[int, ...]) -> None:
    assert IMAGENET.labels(query) == labels


def test_an_unknown_name_finds_nothing_and_suggests_the_closest() -> None:
    assert IMAGENET.labels("golden retreiver") == ()
    assert IMAGENET.closest("golden retreiver")[0] == "golden retriever"
    assert IMAGENET.closest("zzzzzzzz") == ()


def test_names_without_synonyms_match_case_insensitively() -> None:
    demo = ClassNames(FASHION_MNIST_CLASSES)
    assert demo.labels("ankle BOOT") == (9,) and demo.labels("t-shirt/top") == (0,)
    assert demo.labels("Boot") == ()


def test_description_names_the_synonyms() -> None:
    assert IMAGENET.describe(1) == "1 'goldfish' (also 'Carassius auratus')"
    assert IMAGENET.describe(134) == "134 'crane'"


def test_synonym_lists_must_match_the_names() -> None:
    with pytest.raises(ValueError, match="2 synonym lists for 3 class names"):
        ClassNames(("a", "b", "c"), (("x",), ()))
