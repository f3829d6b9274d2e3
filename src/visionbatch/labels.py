"""Labels: the true class of each file, from the folder it sits in, in the model's terms.

Rules, in order: an explicit ``--label-map`` CSV (folder,label); WordNet ids
(``n01440764``, the ImageNet/Imagenette layout) through the ImageNet-1k class index:
by class index when the model has the 1000 ImageNet classes, else by the class's name
(so zero-shot labels such as ``tench`` match ImageNet folders); otherwise folder names
that match a model label case-insensitively, whole or by its first comma-separated
synonym (``tench`` matches ``tench, Tinca tinca``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from visionbatch.errors import UsageError
from visionbatch.imagenet import imagenet_classes, imagenet_wnids


class ClassName(str):
    """A label value that names its class, matched as folder names are even where it
    reads as a number: a Hugging Face ``ClassLabel``'s name for its integer."""


@dataclass(frozen=True)
class LabelResolver:
    """Maps a folder name to a model label (or None)."""

    by_folder: dict[str, str]
    labels: tuple[str, ...] = ()  # the model's labels by class index

    def __call__(self, folder: str | None) -> str | None:
        if not folder:
            return None
        return self.by_folder.get(folder) or self.by_folder.get(folder.lower())

    def of_value(self, value) -> str | None:
        """A label column's value (or a WebDataset member's text): a class index into
        the model's labels, or a name matched as folder names are."""
        if value is None:
            return None
        if isinstance(value, ClassName):
            return self(value)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            return self.labels[index] if 0 <= index < len(self.labels) else None
        return self(text)


def folder_of(path: str) -> str:
    """The name of the folder a file sits in ('' at a root)."""
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def _label_index(labels: list[str]) -> dict[str, str]:
    index: dict[str, str] = {}
    for label in labels:  # whole names win over synonyms, first label wins a tie
        index.setdefault(label.lower(), label)
    for label in labels:
        index.setdefault(label.split(",")[0].strip().lower(), label)
    return index


def _find(index: dict[str, str], name: str) -> str | None:
    """The model label ``name`` names, whole or by its first synonym."""
    return index.get(name.lower()) or index.get(name.split(",")[0].strip().lower())


def build_resolver(id2label: dict[int, str], label_map_text: str | None = None) -> LabelResolver:
    labels = [id2label[i] for i in sorted(id2label)]
    index = _label_index(labels)
    by_folder: dict[str, str] = dict(index)
    if len(labels) == 1000:
        by_folder.update(zip(imagenet_wnids(), labels))
    else:
        by_folder.update((wnid, label) for wnid, name in imagenet_classes() if (label := _find(index, name)))
    if label_map_text is not None:
        for row in csv.reader(io.StringIO(label_map_text)):
            if len(row) < 2 or row[0].strip().lower() == "folder":
                continue
            folder, label = row[0].strip(), row[1].strip()
            resolved = _find(index, label)
            if resolved is None:
                raise UsageError(f"--label-map: label {label!r} (folder {folder!r}) is not one of the model's labels")
            by_folder[folder] = resolved
    return LabelResolver(by_folder, tuple(labels))
