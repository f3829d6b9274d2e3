"""The ImageNet-1k class list (WordNet ids and labels), shipped as package data.

``data/imagenet_classes.tsv`` holds one ``WNID<TAB>LABEL`` line per class in class-index
order (sorted WordNet id, index 0 = ``n01440764``); labels are the synset texts Hugging
Face ImageNet models use in ``config.id2label``.
"""

from __future__ import annotations

import functools
from importlib import resources

_RESOURCE = "data/imagenet_classes.tsv"


@functools.cache
def _classes() -> tuple[tuple[str, str], ...]:
    text = resources.files("visionbatch").joinpath(_RESOURCE).read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)
    if len(rows) != 1000:
        raise RuntimeError(f"{_RESOURCE}: expected 1000 classes, found {len(rows)}")
    return rows  # type: ignore[return-value]


def imagenet_classes() -> list[tuple[str, str]]:
    """Return ``[(wnid, label), ...]`` for the 1000 ImageNet-1k classes in index order."""
    return list(_classes())


def imagenet_wnids() -> list[str]:
    """Return the 1000 WordNet ids in class-index order."""
    return [wnid for wnid, _ in _classes()]


def imagenet_id2label() -> dict[int, str]:
    """Return ``{class_index: label}`` as used in a Hugging Face ``config.id2label``."""
    return {i: label for i, (_, label) in enumerate(_classes())}
