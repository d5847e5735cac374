"""Class names as requests give them: case-insensitive, any synonym, never a guess between classes.

A class has a name (what answers and GET /models call it) and optionally synonyms (ImageNet's WordNet
lemmas after the first: "goldfish" is also "Carassius auratus"). A query matches in two tiers: the classes
whose name it is, else the classes that list it as a synonym. So "partridge" is class 86 (its name), not
class 82 ("ruffed grouse", which lists "partridge" among its synonyms), while "crane", the name of both 134
(the bird) and 517 (the machine), matches two classes and is refused naming both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def normalized(name: str) -> str:
    """What matching compares: case folded, runs of white space as one space, none at the ends."""
    return " ".join(name.split()).casefold()


class ClassNames:
    """A model's class names (one per class) and synonyms (none, or one tuple per class), indexed for lookup."""

    def __init__(self, names: Sequence[str], synonyms: Sequence[Sequence[str]] = ()):
        if synonyms and len(synonyms) != len(names):
            raise ValueError(f"{len(synonyms)} synonym lists for {len(names)} class names")
        self.names = tuple(names)
        self.synonyms = tuple(tuple(group) for group in synonyms) or ((),) * len(names)
        self._by_name = _index((label, [name]) for label, name in enumerate(self.names))
        self._by_synonym = _index(enumerate(self.synonyms))
        self._spelled = {normalized(s): s for group in self.synonyms for s in group}  # normalized -> as listed
        self._spelled |= {normalized(name): name for name in self.names}

    def labels(self, query: str) -> tuple[int, ...]:
        """The classes `query` names: none (unknown), one, or several (ambiguous: the caller must not pick)."""
        key = normalized(query)
        return self._by_name.get(key) or self._by_synonym.get(key) or ()

    def unambiguous(self) -> tuple[str, ...]:
        """Every name and synonym, as listed, that names exactly one class: what a schema can enumerate (a
        request may also write them in another case or spacing)."""
        return tuple(s for key, s in self._spelled.items() if len(self.labels(key)) == 1)

    def closest(self, query: str, n: int = 5) -> tuple[str, ...]:
        """The names and synonyms most like `query`, as listed, for the message about an unknown name."""
        close = difflib.get_close_matches(normalized(query), list(self._spelled), n=n, cutoff=0.6)
        return tuple(self._spelled[c] for c in close)

    def describe(self, label: int) -> str:
        """`207 'golden retriever'`, with the synonyms when the class has any."""
        extra = self.synonyms[label]
        also = f" (also {', '.join(repr(s) for s in extra)})" if extra else ""
        return f"{label} {self.names[label]!r}{also}"


def _index(entries: Iterable[tuple[int, Iterable[str]]]) -> dict[str, tuple[int, ...]]:
    """normalized name -> the labels that carry it, each label once, in label order."""
    index: dict[str, list[int]] = {}
    for label, names in entries:
        for name in names:
            labels = index.setdefault(normalized(name), [])
            if label not in labels:
                labels.append(label)
    return {k: tuple(v) for k, v in index.items()}
