"""Label Studio, both ways: the tasks and labeling config an export writes, and the
reviewed labels that come back in Label Studio's JSON export of those tasks.

Out: a task per image (``data.image``, ``data.path``: the original path, ``data.true_label``)
with the model's answer as a pre-annotation (a ``choices`` result from the config's
<Choices name="label"> to its <Image name="image">), and the config those fit.

Back: Label Studio's JSON export (https://labelstud.io/guide/export, "JSON"; the task
format: https://labelstud.io/guide/task_format) is a list of tasks as imported (``data``),
each with its ``annotations``: per annotation a ``result`` list (our answer: a ``choices``
item from ``label``), ``was_cancelled`` (the task was skipped) and ``created_at`` /
``updated_at``. Per original path the latest answering annotation that was not cancelled
wins; skipped and unanswered tasks give no label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable
from xml.sax.saxutils import quoteattr

import pyarrow as pa

from visionbatch.errors import SourceError, UsageError
from visionbatch.storage import Storage, describe

IMAGE_NAME, CHOICES_NAME = "image", "label"  # the config's <Image> and <Choices>, which every result names
REVIEWED_LABEL = "reviewed_label"  # the column the reviewed labels join result rows as


def task(image_url: str, row: dict, model: str) -> dict:
    """A task to import: the image, its original path and true label, and the model's
    answer as a pre-annotation."""
    data = {IMAGE_NAME: image_url, "path": row["path"]}
    if row.get("true_label") is not None:
        data["true_label"] = row["true_label"]
    return {"data": data, "predictions": [{
        "model_version": model, "score": row["score"],
        "result": [{"from_name": CHOICES_NAME, "to_name": IMAGE_NAME, "type": "choices",
                    "value": {"choices": [row["label"]]}}]}]}


def predicted_labels(tasks: Iterable[dict]) -> set[str]:
    return {choice for item in tasks for choice in item["predictions"][0]["result"][0]["value"]["choices"]}


def labeling_config(labels: Iterable[str]) -> str:
    """The labeling interface that :func:`task`'s pre-annotations fit, a <Choice> per label
    (sorted). Label Studio accepts a config whose names or choices match nothing, silently."""
    choices = "".join(f"\n    <Choice value={quoteattr(label)}/>" for label in sorted(labels))
    return (f'<View>\n  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}"/>\n  <Choices name="{CHOICES_NAME}" '
            f'toName="{IMAGE_NAME}" choice="single" showInLine="true">{choices}\n  </Choices>\n</View>\n')


@dataclass(frozen=True)
class Reviews:
    """The reviewed labels of a Label Studio JSON export."""

    labels: pa.Table  # path, reviewed_label: one row per original path, by path
    tasks: int  # tasks in the export
    skipped: int  # tasks whose every annotation was cancelled
    unanswered: int  # tasks with no annotation that gives one label

    def unknown(self, classes: Iterable[str]) -> dict[str, int]:
        """Reviewed labels that are none of ``classes`` (the model's), with their counts."""
        known = set(classes)
        counts: dict[str, int] = {}
        for label in self.labels.column(REVIEWED_LABEL).to_pylist():
            if label not in known:
                counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def lookup(self, paths: pa.Array) -> pa.Array:
        """Each path's reviewed label, null where it was not reviewed."""
        import pyarrow.compute as pc

        return self.labels.column(REVIEWED_LABEL).take(pc.index_in(paths, value_set=self.labels.column("path")))


def _answer(annotation: dict) -> str | None:
    """The one label an annotation chose in our <Choices>, if it chose exactly one."""
    for item in annotation.get("result") or []:
        if item.get("type") == "choices" and item.get("from_name") == CHOICES_NAME:
            choices = (item.get("value") or {}).get("choices") or []
            return choices[0] if len(choices) == 1 else None
    return None


def read_reviews(source: str, storage: Storage) -> Reviews:
    """The reviewed labels of a Label Studio JSON export (a file or URI) of tasks that a
    visionbatch export made; a file that cannot be read or is not one is a UsageError saying why."""
    try:
        tasks = json.loads(storage.read(source))
    except (OSError, SourceError, ValueError) as err:
        raise UsageError(f"cannot read the reviews in {source} ({describe(err)}): give Label Studio's JSON "
                         "export of the project") from None
    if not isinstance(tasks, list):
        raise UsageError(f"{source} is not a Label Studio JSON export (a list of tasks)")
    latest: dict[str, tuple[str, int, int, str]] = {}  # path -> (when, task's and annotation's position, label)
    skipped = unanswered = 0
    for position, item in enumerate(tasks):
        path = (item.get("data") or {}).get("path") if isinstance(item, dict) else None
        if not isinstance(path, str):
            raise UsageError(f"{source}: task {position} has no data.path: not a task that visionbatch export wrote")
        annotations = item.get("annotations") or []
        answered = [(annotation.get("updated_at") or annotation.get("created_at") or "", position, index, label)
                    for index, annotation in enumerate(annotations) if not annotation.get("was_cancelled")
                    for label in [_answer(annotation)] if label is not None]
        if not answered:
            if annotations and all(annotation.get("was_cancelled") for annotation in annotations):
                skipped += 1
            else:
                unanswered += 1
            continue
        # ISO 8601 times in UTC, as Label Studio writes them, order as text; ties go to the later in the file.
        latest[path] = max([*answered, *([latest[path]] if path in latest else [])])
    paths = sorted(latest)
    labels = pa.table({"path": pa.array(paths, pa.string()),
                       REVIEWED_LABEL: pa.array([latest[path][-1] for path in paths], pa.string())})
    return Reviews(labels, len(tasks), skipped, unanswered)
