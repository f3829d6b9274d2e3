"""The ImageNet-1k class list shipped as package data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from visionbatch.imagenet import imagenet_classes, imagenet_id2label, imagenet_wnids

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-sample-200"


def test_resource_is_packaged_next_to_the_module():
    assert resources.files("visionbatch").joinpath("data/imagenet_classes.tsv").is_file()


def test_1000_classes_in_sorted_wnid_order():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000
    assert len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # ImageNet class index order is sorted WordNet id order
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)


def test_labels_match_hugging_face_id2label():
    classes = imagenet_classes()
    assert classes[0] == ("n01440764", "tench, Tinca tinca")
    assert classes[1] == ("n01443537", "goldfish, Carassius auratus")
    assert classes[-1] == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")
    id2label = imagenet_id2label()
    assert list(id2label) == list(range(1000))
    assert id2label[134] == id2label[517] == "crane"  # the bird and the machine, as on the Hub
    assert all(label == label.strip() and "\t" not in label for label in id2label.values())
    assert all(id2label.values())


def test_results_are_fresh_copies():
    imagenet_classes().clear()
    imagenet_wnids().clear()
    assert len(imagenet_classes()) == len(imagenet_wnids()) == 1000


def test_sample_folders_are_imagenet_classes():
    if not SAMPLE.is_dir():
        pytest.skip(f"ImageNet sample images not found at {SAMPLE} (see shared/data/README.md)")
    folders = {p.name for p in SAMPLE.iterdir() if p.is_dir()}
    assert len(folders) == 200
    assert folders <= set(imagenet_wnids())
