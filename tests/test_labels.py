from __future__ import annotations

import pytest

from visionbatch.imagenet import imagenet_id2label
from visionbatch.labels import build_resolver, folder_of


def test_wordnet_ids_map_through_the_imagenet_index():
    resolve = build_resolver(imagenet_id2label())
    assert resolve("n01440764") == "tench, Tinca tinca"
    assert resolve("n03888605") == "parallel bars, bars"
    assert resolve("n99999999") is None


def test_names_match_case_insensitively_and_by_first_synonym():
    resolve = build_resolver({0: "tench, Tinca tinca", 1: "Golden Retriever", 2: "cat"})
    assert resolve("Tench") == "tench, Tinca tinca"
    assert resolve("golden retriever") == "Golden Retriever"
    assert resolve("CAT") == "cat"
    assert resolve("dog") is None


def test_wordnet_ids_match_other_label_sets_by_name():
    """Zero-shot labels (any number) match ImageNet folders by the class's name."""
    resolve = build_resolver({0: "tench", 1: "Cassette Player", 2: "cat"})
    assert resolve("n01440764") == "tench" and resolve("n02979186") == "Cassette Player"
    assert resolve("n02102040") is None  # English springer: not among the labels


def test_label_map_overrides():
    resolve = build_resolver({0: "cat", 1: "dog"}, "folder,label\nkitties,cat\npuppies,Dog\n")
    assert resolve("kitties") == "cat" and resolve("puppies") == "dog"
    with pytest.raises(ValueError, match="not one of the model's labels"):
        build_resolver({0: "cat"}, "x,horse\n")


def test_folder_of():
    assert folder_of("s3://bucket/val/n01440764/a.jpg") == "n01440764"
    assert folder_of("/data/x/b.png") == "x"
