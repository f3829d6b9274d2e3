"""Reviews come back from Label Studio: the tasks our labelstudio export wrote, answered as
Label Studio's JSON export gives them back (https://labelstud.io/guide/export, "JSON";
https://labelstud.io/guide/task_format), read into reviewed labels per original path, then
``evaluate --reviewed`` and the corrected ImageFolder (``export --reviewed``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_export import _export, _median, images, job  # noqa: F401 (images, job: the fixtures of a finished DEST)
from visionbatch.cli import main
from visionbatch.destination import METRICS_FILE
from visionbatch.evaluate import REVIEWED
from visionbatch.export import METADATA, TASKS, safe_name

NOT_A_CLASS = "not one of the model's classes"


def _annotation(task_id: int, number: int, label: str | None, when: str, cancelled: bool = False) -> dict:
    """An annotation as Label Studio exports it: a "choices" result from our <Choices> (none when skipped)."""
    result = [] if label is None else [{"id": f"r{task_id}-{number}", "type": "choices", "origin": "manual",
                                        "from_name": "label", "to_name": "image", "value": {"choices": [label]}}]
    return {"id": task_id * 10 + number, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": when, "updated_at": when, "lead_time": 3.5, "task": task_id, "completed_by": 1}


def _reviewed_export(tasks: list[dict], other_label) -> tuple[list[dict], dict[str, str]]:
    """Label Studio's JSON export of our ``tasks`` after a review, and the reviewed label per
    path it should give: accepted predictions, changed labels, a task answered twice (the
    later answer counts) and then skipped, skipped and untouched tasks, a label that is
    none of the model's classes."""
    exported, expected = [], {}
    for i, task in enumerate(tasks):
        path, predicted = task["data"]["path"], task["predictions"][0]["result"][0]["value"]["choices"][0]
        annotations = []
        if i == 0:
            pass  # not reviewed
        elif i == 1:
            annotations = [_annotation(i, 0, None, "2025-05-01T10:00:00.000000Z", cancelled=True)]
        elif i == 2:
            annotations = [_annotation(i, 0, predicted, "2025-05-01T10:05:00.000000Z"),
                           _annotation(i, 1, other_label(predicted), "2025-05-01T11:00:00.000000Z"),
                           _annotation(i, 2, predicted, "2025-05-01T12:00:00.000000Z", cancelled=True)]
            expected[path] = other_label(predicted)
        elif i == 3:
            annotations = [_annotation(i, 0, NOT_A_CLASS, "2025-05-01T10:06:00.000000Z")]
            expected[path] = NOT_A_CLASS
        else:
            label = predicted if i % 2 else other_label(predicted)
            annotations = [_annotation(i, 0, label, f"2025-05-01T10:{i:02d}:00.000000Z")]
            expected[path] = label
        exported.append({"id": i, "data": task["data"], "annotations": annotations, "drafts": [],
                         "predictions": [{"id": i, "task": i, **task["predictions"][0]}], "project": 1,
                         "created_at": "2025-05-01T09:00:00.000000Z", "updated_at": "2025-05-01T12:00:00.000000Z"})
    return exported, expected


@pytest.fixture(scope="module")
def reviewed(job, tiny_vit, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A reviewed Label Studio export of the tasks of our own labelstudio export of ``job``."""
    dest, table = job
    work = tmp_path_factory.mktemp("reviews")
    _export(dest, work / "review", "--format", "labelstudio", "--where", f"score < {_median(table)}")
    tasks = json.loads((work / "review" / TASKS).read_text())
    assert len(tasks) >= 8
    classes = json.loads((Path(tiny_vit) / "config.json").read_text())["id2label"]
    true_labels = sorted({row["true_label"] for row in table.to_pylist()})

    def other_label(predicted: str) -> str:
        """A reviewer's correction: a true class the model did not give (else another class)."""
        return next(label for label in [*true_labels, *classes.values()] if label != predicted)

    exported, expected = _reviewed_export(tasks, other_label)
    file = work / "project-1-at-2025-05-01.json"
    file.write_text(json.dumps(exported))
    return file, expected


def test_evaluate_against_reviewed_labels(job, reviewed, capfd):
    dest, table = job
    file, expected = reviewed
    rows = {row["path"]: row for row in table.to_pylist()}
    model_right = sum(rows[path]["label"] == label for path, label in expected.items())
    given_right = sum(rows[path]["true_label"] == label for path, label in expected.items())
    assert 0 < model_right < len(expected) and 0 < given_right < len(expected)  # the figures can tell right from wrong
    assert main(["evaluate", str(dest), "--reviewed", str(file)]) == 0
    out, err = capfd.readouterr()
    assert f"reviewed           {len(expected)} rows ({len(expected)} paths reviewed of {len(expected) + 2} tasks: " \
           "1 skipped, 1 unanswered; 0 not in DEST)" in out
    assert f"model right      {100 * model_right / len(expected):.1f}%  ({model_right}/{len(expected)})" in out
    assert f"given right      {100 * given_right / len(expected):.1f}%  ({given_right}/{len(expected)} " in out
    assert f"not the model's  {NOT_A_CLASS!r} (1)" in out
    figures = json.loads((dest / METRICS_FILE).read_text())[REVIEWED]
    assert figures == {"tasks": len(expected) + 2, "skipped": 1, "unanswered": 1, "reviewed": len(expected),
                       "rows": len(expected), "not_in_dest": 0, "model_right": model_right,
                       "model_accuracy": pytest.approx(model_right / len(expected)), "given": len(expected),
                       "given_right": given_right, "given_accuracy": pytest.approx(given_right / len(expected)),
                       "unknown_labels": {NOT_A_CLASS: 1}}
    # Without --reviewed, evaluate is as it was.
    assert main(["evaluate", str(dest)]) == 0
    assert "reviewed" not in capfd.readouterr().out and REVIEWED not in json.loads((dest / METRICS_FILE).read_text())


def test_the_corrected_imagefolder(job, reviewed, tmp_path, capfd):
    """Reviewed images under their reviewed label (what torchvision's ImageFolder reads),
    each with its reviewed_label in metadata.jsonl (what datasets' imagefolder reads); the
    other rows as before, under their predicted label."""
    import datasets

    dest, table = job
    file, expected = reviewed
    out = tmp_path / "corrected"
    _export(dest, out, "--format", "imagefolder", "--reviewed", file, "--where", "reviewed_label IS NOT NULL")
    assert f"reviewed labels that are none of the model's classes: {NOT_A_CLASS!r} (1)" in capfd.readouterr().err
    by_bytes = {Path(path).read_bytes(): label for path, label in expected.items()}
    files = [path for path in out.rglob("*.jpg")]
    assert sorted(by_bytes[path.read_bytes()] for path in files) == sorted(expected.values())
    assert all(path.parent.name == safe_name(by_bytes[path.read_bytes()]) for path in files)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert {sample["path"]: sample["reviewed_label"] for sample in ds} == expected

    everything = tmp_path / "all"
    _export(dest, everything, "--format", "imagefolder", "--reviewed", file)
    lines = [json.loads(line) for line in (everything / METADATA).read_text().splitlines()]
    assert len(lines) == table.num_rows
    for line in lines:
        label = expected.get(line["path"], line["label"])
        assert line.get("reviewed_label") == expected.get(line["path"])
        assert line["file_name"].split("/")[0] == safe_name(label)
        assert (everything / line["file_name"]).read_bytes() == Path(line["path"]).read_bytes()


def test_what_is_not_a_label_studio_export(job, tmp_path, capfd):
    dest, _ = job
    for name, text in (("not-json.json", "{"), ("object.json", '{"tasks": []}'),
                       ("other-tasks.json", '[{"data": {"image": "x.jpg"}, "annotations": []}]')):
        (tmp_path / name).write_text(text)
        assert main(["evaluate", str(dest), "--reviewed", str(tmp_path / name)]) == 2
        assert f"{tmp_path / name}" in capfd.readouterr().err
