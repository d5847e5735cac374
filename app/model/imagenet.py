"""The 1000 ImageNet (ILSVRC-2012) classes the released VAR models were trained on.

`imagenet_classes.txt` beside this module holds one line per class in label order: the WordNet id, then the
synset's lemmas separated by ", " (`n01443537 goldfish, Carassius auratus`). Label i is the i-th WordNet id
in sorted order, the order of the ILSVRC-2012 class folders that training read, so the ids being sorted is
the check that the order is right. The first lemma is the class's name, the others its synonyms.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")
NUM_IMAGENET_CLASSES = 1000


@cache
def imagenet_synsets() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(WordNet id, lemmas) per class, in label order."""
    synsets = []
    for line in IMAGENET_CLASSES_FILE.read_text().splitlines():
        wnid, _, lemmas = line.partition(" ")
        synsets.append((wnid, tuple(lemmas.split(", "))))
    return tuple(synsets)


def imagenet_names() -> tuple[str, ...]:
    """Each class's first lemma: "tench", "goldfish", ..., "toilet tissue"."""
    return tuple(lemmas[0] for _, lemmas in imagenet_synsets())


def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """Each class's other lemmas ("Carassius auratus" for "goldfish"; none for "golden retriever")."""
    return tuple(lemmas[1:] for _, lemmas in imagenet_synsets())
